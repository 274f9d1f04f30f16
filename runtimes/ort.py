"""Plain onnxruntime: our own KV-cache loop, adapters through ``RunOptions.add_active_adapter``.

This is the path for QNN/EPContext artifacts (and any decoder ONNX with the genai I/O
names: input_ids, attention_mask, optional position_ids, past_key_values.N.key/value ->
logits, present.N.key/value). An adapter's tensors override the model's LoRA inputs;
with no adapter active the model's own initializers (zero B) apply.

QNN ships as a plugin EP (onnxruntime-qnn): it is registered from its library and bound
with ``add_provider_for_devices`` instead of the classic ``providers=[...]`` list.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.fit import check_onnx_adapter_fits
from edgepeft.keys import QNN_CACHE_LEN, QNN_DECODE_GRAPH, QNN_MASK_NEG, QNN_PREFILL_GRAPH, QNN_PREFILL_LEN
from edgepeft.runtimes.base import Artifact, check_adapter_name

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


def _register_qnn(ort, so, options: dict) -> bool:
    """Bind the QNN plugin EP to the session options; False when it is not installed."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return False
    name = onnxruntime_qnn.get_ep_name() if hasattr(onnxruntime_qnn, "get_ep_name") else "QNNExecutionProvider"
    try:
        ort.register_execution_provider_library(name, onnxruntime_qnn.get_library_path())
    except Exception as e:  # already registered in this process
        if "already" not in str(e).lower():
            raise
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        return False
    so.add_provider_for_devices(devices[:1], {k: str(v) for k, v in options.items() if k != "backend_path"})
    return True


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self):
        self.sess = None
        self.adapters: dict[str, object] = {}
        self.active: str | None = None

    def load(self, artifact: Artifact, device, n_ctx: int = 1024) -> None:
        import onnxruntime as ort

        self._ort = ort
        if artifact.format == "onnx-static":
            self._static = StaticGraphs(artifact, device, n_ctx)
            self.load_ms, self.providers = self._static.load_ms, ["QNNExecutionProvider"]
            self.tokenizer = _tokenizer(artifact.model)
            return
        self._static = None
        model_file = artifact.model / "model.onnx" if artifact.model.is_dir() else artifact.model
        folder = model_file.parent
        for name, path in artifact.adapters.items():
            check_onnx_adapter_fits(folder, path)
        t0 = time.perf_counter()  # engine load only; our fit checks above are reported apart
        spec = device.runtimes.get(self.name) if device is not None else None
        wanted = list(spec.providers) if spec else ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        providers, opts = [], []
        available = set(ort.get_available_providers())
        for p in wanted:
            po = dict(spec.provider_options.get(p, {})) if spec else {}
            if p == "QNNExecutionProvider" and p not in available and _register_qnn(ort, so, po):
                continue
            if p in available:
                providers.append(p)
                opts.append({k: str(v) for k, v in po.items()})
        if not providers and not so.has_providers():
            raise EdgepeftError(f"none of the device's execution providers ({', '.join(wanted)}) is available here",
                                f"Available: {', '.join(sorted(available))}")
        try:
            self.sess = ort.InferenceSession(str(model_file), so, providers=providers or None,
                                             provider_options=opts or None)
        except Exception as e:
            raise IntegrityError(f"onnxruntime could not load {model_file}: {e}",
                                 "Re-export it, or check the execution providers in the device profile") from e
        self.providers = self.sess.get_providers()
        ins = {i.name: i for i in self.sess.get_inputs()}
        if "input_ids" not in ins:
            raise IntegrityError(f"{model_file} has no input_ids input; it is not a decoder model",
                                 "Pass a decoder exported by `edgepeft export --format onnx`")
        self._past = {n: i for n, i in ins.items() if _PAST.match(n)}
        self._kv_dtype = _NP.get(next(iter(self._past.values())).type, np.float32) if self._past else np.float32
        self._has_pos = "position_ids" in ins
        self._has_mask = "attention_mask" in ins
        self._ids_dtype = _NP.get(ins["input_ids"].type, np.int64)
        self.max_length = n_ctx
        for name, path in artifact.adapters.items():
            try:
                self.adapters[name] = ort.LoraAdapter()
                self.adapters[name].Load(str(path))
            except Exception as e:
                raise MismatchError(f"onnxruntime refused adapter {name} ({path}): {e}",
                                    "Export the adapter together with this model") from e
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.tokenizer = _tokenizer(folder)
        self._kv_shape = _kv_shape(folder)
        self.reset()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise EdgepeftError("no tokenizer.json next to the ONNX model", "Export with the tokenizer files")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def reset(self) -> None:
        if self._static is not None:
            self._static.reset()
            return
        self.kv = {}
        for n, i in self._past.items():
            shape = [d if isinstance(d, int) and d > 0 else None for d in i.shape]
            shape = [1, shape[1] or self._kv_shape[0], 0, shape[3] or self._kv_shape[1]]  # (batch, kv_heads, seq, head_dim): empty history
            self.kv[n] = np.zeros(shape, dtype=self._kv_dtype)
        self.pos = 0
        self._logits = None
        self._run_opts = self._ort.RunOptions()
        if self.active is not None:
            self._run_opts.add_active_adapter(self.adapters[self.active])

    def _run(self, tokens: Sequence[int], all_logits: bool) -> None:
        if self._static is not None:
            self._logits = self._static.run(list(tokens), all_logits)
            return
        n = len(tokens)
        if self.pos + n > self.max_length:
            raise EdgepeftError(f"sequence of {self.pos + n} tokens exceeds {self.max_length}",
                                "Lower --prompt-tokens/--gen-tokens")
        feed = {"input_ids": np.asarray([tokens], dtype=self._ids_dtype)}
        if self._has_mask:
            feed["attention_mask"] = np.ones((1, self.pos + n), dtype=np.int64)
        if self._has_pos:
            feed["position_ids"] = np.arange(self.pos, self.pos + n, dtype=np.int64)[None]
        feed.update(self.kv)
        outs = self.sess.run(None, feed, self._run_opts)
        names = [o.name for o in self.sess.get_outputs()]
        for name, val in zip(names, outs):
            if name.startswith("present."):
                self.kv["past_key_values." + name[len("present."):]] = val
        logits = outs[names.index("logits")][0]
        self._logits = logits if all_logits else logits[-1:]
        self.pos += n

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        self._run(list(tokens), all_logits)

    def decode(self, n: int, tokens: Sequence[int] | None = None) -> list[int]:
        fed = []
        for i in range(n):
            t = tokens[i] if tokens is not None else int(np.argmax(self._logits[-1]))
            self._run([t], False)
            fed.append(t)
        return fed

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise EdgepeftError("no logits yet", "Call prefill first")
        return np.asarray(self._logits, dtype=np.float32)

    def set_adapter(self, name: str | None) -> None:
        check_adapter_name(self.name, self.adapters, name)
        self.active = name
        self.reset()

    def close(self) -> None:
        self._static = None
        self.sess = None
        self.adapters = {}


def _kv_shape(folder: Path) -> tuple[int, int]:
    """(kv_heads, head_dim) from genai_config.json, for models whose KV inputs have symbolic dims."""
    import json

    try:
        dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        return int(dec["num_key_value_heads"]), int(dec["head_size"])
    except (OSError, KeyError, ValueError):
        return 1, 1


def _compiled_target(folder: Path):
    import json

    from edgepeft.keys import ONNX_SIDECAR
    from edgepeft.runtimes.qnn_htp import HtpTarget, resolve_target

    try:
        q = json.loads((folder / ONNX_SIDECAR).read_text())["qnn"]
        return HtpTarget(str(q["soc_model"]), str(q["htp_arch"]))
    except (OSError, KeyError, ValueError, TypeError):
        return resolve_target(None)


def _tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


class StaticGraphs:
    """The QNN export's two static EPContext graphs (prefill_ctx.onnx, decode_ctx.onnx) driven as one decoder.

    Shapes are fixed (the contract in edgepeft.keys, which export/qnn.py writes): prefill takes PREFILL_LEN
    right-padded tokens; decode takes one token, its position and an additive mask over a
    CACHE_LEN KV cache, and returns that token's K/V, which we write into its cache slot.
    """

    def __init__(self, artifact: Artifact, device, n_ctx: int):
        from edgepeft.runtimes.qnn_htp import htp_session, resolve_target

        if n_ctx > QNN_CACHE_LEN:
            raise EdgepeftError(f"the QNN static graphs hold {QNN_CACHE_LEN} tokens (prefill {QNN_PREFILL_LEN}), "
                                f"the benchmark needs {n_ctx}",
                                f"Use --prompt-tokens <= {QNN_PREFILL_LEN} and --gen-tokens/--ppl-tokens that fit")
        if device is not None and device.source:
            target = resolve_target(device.source)
        else:  # no device profile: the SoC the graphs were compiled for, from the export's manifest
            target = _compiled_target(artifact.model)
        t0 = time.perf_counter()
        try:
            self.pre = htp_session(artifact.model / QNN_PREFILL_GRAPH, target)
            self.dec = htp_session(artifact.model / QNN_DECODE_GRAPH, target)
        except Exception as e:
            raise IntegrityError(f"QNN could not load the EPContext graphs in {artifact.model}: {e}",
                                 "Re-export with --target qnn-htp for this device's soc_model/htp_arch") from e
        self.load_ms = (time.perf_counter() - t0) * 1e3
        past = [i for i in self.dec.get_inputs() if i.name.startswith("past_")]
        self.past_shapes = {i.name: i.shape for i in past}
        self.reset()

    def reset(self) -> None:
        self.cache = {n: np.zeros(s, np.float32) for n, s in self.past_shapes.items()}
        self.pos = 0

    def run(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        rows = []
        if self.pos == 0 and len(tokens) > 1:
            n = min(len(tokens), QNN_PREFILL_LEN)
            ids = np.zeros((1, QNN_PREFILL_LEN), np.int32)
            ids[0, :n] = tokens[:n]
            outs = self.pre.run(None, {"input_ids": ids})
            names = [o.name for o in self.pre.get_outputs()]
            for name, val in zip(names[1:], outs[1:]):
                self.cache["past_" + name][:, :, :n] = val[:, :, :n]
            rows.append(outs[0][0, :n])
            self.pos, tokens = n, tokens[n:]
        for t in tokens:
            if self.pos >= QNN_CACHE_LEN:
                raise EdgepeftError(f"the QNN static KV cache is full ({QNN_CACHE_LEN} tokens)",
                                    "Use fewer prompt/generated tokens")
            mask = np.full((1, 1, 1, QNN_CACHE_LEN + 1), QNN_MASK_NEG, np.float32)
            mask[..., : self.pos] = 0
            mask[..., -1] = 0
            feed = {"input_ids": np.array([[t]], np.int32), "position": np.array([[self.pos]], np.int32),
                    "mask": mask, **self.cache}
            outs = self.dec.run(None, feed)
            names = [o.name for o in self.dec.get_outputs()]
            for name, val in zip(names[1:], outs[1:]):
                self.cache["past_" + name][:, :, self.pos] = val[:, :, 0]
            rows.append(outs[0][0, -1:])
            self.pos += 1
        logits = np.concatenate(rows, axis=0)
        return logits if all_logits else logits[-1:]
