"""onnxruntime-genai: ``og.Model`` + ``og.Generator``, adapters through ``og.Adapters``.

og binds an adapter to a generator, so a swap builds a fresh generator (which also
starts an empty KV cache) and activates the adapter on it; that is what an app does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.fit import check_onnx_adapter_fits
from edgepeft.runtimes.base import Artifact, check_adapter_name

# profile provider names -> og provider names (og calls the CPU "cpu" and appends nothing for it)
_OG_PROVIDERS = {"cpu": None, "cuda": "cuda", "qnn": "qnn", "dml": "dml", "webgpu": "webgpu",
                 "tensorrt": "NvTensorRtRtx"}


class OrtGenaiRuntime:
    name = "onnxruntime-genai"

    def __init__(self):
        self.model = self.gen = self._adapters = None
        self.adapters: dict[str, object] = {}
        self.active: str | None = None
        self._special: dict[int, str] = {}

    def load(self, artifact: Artifact, device, n_ctx: int = 1024) -> None:
        import onnxruntime_genai as og

        self._og = og
        folder = artifact.model
        cfg_path = folder / "genai_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{cfg_path} is missing or not JSON ({e})",
                                 "Pass a folder written by `edgepeft export --format onnx`") from e
        for name, path in artifact.adapters.items():
            check_onnx_adapter_fits(folder, path)
        self.max_length = min(n_ctx, int(cfg["model"].get("context_length") or n_ctx))
        self._special = _special_tokens(folder / "tokenizer.json")
        t0 = time.perf_counter()  # engine load only; our fit checks above are reported apart
        config = og.Config(str(folder))
        spec = device.runtimes.get(self.name) if device is not None else None
        providers = list(spec.providers) if spec else ["cpu"]
        config.clear_providers()
        for p in providers:
            og_name = _OG_PROVIDERS.get(p, p)
            if og_name is None:
                break  # CPU is og's fallback; nothing to append
            config.append_provider(og_name)
            for k, v in (spec.provider_options.get(p, {}) if spec else {}).items():
                config.set_provider_option(og_name, str(k), str(v))
        try:
            self.model = og.Model(config)
        except Exception as e:  # og raises RuntimeError with ORT's message
            raise IntegrityError(f"onnxruntime-genai could not load {folder}: {e}",
                                 "Re-export it, or check the execution providers in the device profile") from e
        self.tokenizer = og.Tokenizer(self.model)
        if artifact.adapters:
            self._adapters = og.Adapters(self.model)
            for name, path in artifact.adapters.items():
                try:
                    self._adapters.load(str(path), name)
                except Exception as e:
                    raise MismatchError(f"onnxruntime-genai refused adapter {name} ({path}): {e}",
                                        "Export the adapter together with this model folder") from e
                self.adapters[name] = path
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self._new_generator()

    def _new_generator(self) -> None:
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False, batch_size=1)
        self.gen = og.Generator(self.model, params)
        if self.active is not None:
            self.gen.set_active_adapter(self._adapters, self.active)
        self.pos = 0
        self._rows = None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def detokenize(self, tokens: Sequence[int]) -> str:
        # og's decode drops special tokens; the protocol keeps them as text, so that an
        # end-of-turn marker (<|im_end|>) ends a generation here as it does in llama.cpp
        out, run = [], []
        for t in map(int, tokens):
            if t in self._special:
                if run:
                    out.append(self.tokenizer.decode(np.asarray(run, dtype=np.int32)))
                    run = []
                out.append(self._special[t])
            else:
                run.append(t)
        if run:
            out.append(self.tokenizer.decode(np.asarray(run, dtype=np.int32)))
        return "".join(out)

    def _append(self, tokens: Sequence[int]) -> None:
        if self.pos + len(tokens) > self.max_length:
            raise EdgepeftError(f"sequence of {self.pos + len(tokens)} tokens exceeds max_length {self.max_length}",
                                "Lower --prompt-tokens/--gen-tokens")
        self.gen.append_tokens(np.asarray([tokens], dtype=np.int32))
        self.pos += len(tokens)

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        self._append(list(tokens))
        # the raw "logits" output of the last run holds every position of the prefill
        self._rows = np.asarray(self.gen.get_output("logits"))[0] if all_logits else None

    def decode(self, n: int, tokens: Sequence[int] | None = None) -> list[int]:
        fed = []
        for i in range(n):
            t = tokens[i] if tokens is not None else int(np.argmax(self.gen.get_logits()[0, -1]))
            self._append([t])
            fed.append(t)
        self._rows = None
        return fed

    def logits(self) -> np.ndarray:
        if self._rows is not None:
            return np.asarray(self._rows, dtype=np.float32).reshape(-1, self._rows.shape[-1])
        last = np.asarray(self.gen.get_logits(), dtype=np.float32)
        return last.reshape(-1, last.shape[-1])[-1:]

    def set_adapter(self, name: str | None) -> None:
        check_adapter_name(self.name, self.adapters, name)
        self.active = name
        self._new_generator()

    def reset(self) -> None:
        self._new_generator()

    def close(self) -> None:
        self.gen = None
        self._adapters = None
        self.model = None
        self.adapters = {}


def _special_tokens(tokenizer_json: Path) -> dict[int, str]:
    """id -> text of the special added tokens (what og's decode leaves out)."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {int(a["id"]): a["content"] for a in data.get("added_tokens") or [] if a.get("special")}
