"""llama.cpp through llama-cpp-python's low-level C API (no high-level ``Llama`` wrapper).

The high-level wrapper samples, caches and re-tokenizes behind our back; the C API lets
the benchmark time exactly ``llama_decode`` and swap LoRA adapters with
``llama_set_adapters_lora`` + ``llama_memory_clear``, as an app on the device would.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence

import numpy as np

from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.runtimes.base import Artifact, check_adapter_name

_LOG: list[str] = []
_LOG_CB = None  # keep the ctypes callback alive for the process lifetime


def quiet_logs(llama_cpp) -> None:
    """Route llama.cpp's log to a ring buffer: stderr stays one line, errors can quote it.

    Process-wide; the GGUF exporter's verification calls it too (lora init logs one line per tensor)."""
    global _LOG_CB
    if _LOG_CB is not None:
        return

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        if text:
            _LOG.append(text.decode("utf-8", "replace").rstrip())
            del _LOG[:-20]

    _LOG_CB = cb
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))


def last_error() -> str:
    for line in reversed(_LOG):
        if "error" in line.lower() or "failed" in line.lower():
            return line.strip()
    return _LOG[-1].strip() if _LOG else "no log"


def amx_build(llama_cpp) -> bool:
    """True when this llama.cpp build runs its AMX kernels (an Intel CPU with AMX, built native)."""
    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode("utf-8", "replace")


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(self):
        self.model = self.ctx = self.vocab = None
        self.adapters: dict[str, object] = {}
        self.active: str | None = None
        self.n_ctx = 0

    # ------------------------------------------------------------------ load
    def load(self, artifact: Artifact, device, n_ctx: int = 1024) -> None:
        import llama_cpp

        from edgepeft.fit import check_adapter_fits, read_gguf

        self._ll = llama_cpp
        quiet_logs(llama_cpp)
        base = read_gguf(artifact.model)  # bounded header walk, once
        for path in artifact.adapters.values():  # fingerprint, names, shapes
            check_adapter_fits(base, read_gguf(path), require_fingerprint=False)
        spec = device.runtimes.get(self.name) if device is not None else None
        opts = dict(spec.options) if spec else {}
        t0 = time.perf_counter()  # engine load only; our fit checks above are reported apart
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = int(opts.get("n_gpu_layers", 0))
        # llama-cpp-python 0.3.36 built native on a Xeon with amx_int8 segfaults in llama_decode on any
        # prompt of 2+ tokens once weights sit in the AMX buffer (SmolLM2's Q4_1 file, a Q8_0 tiny
        # Qwen2; its own high-level Llama.eval too). One token works, so the crash waits for the first
        # real prompt. There the extra buffers (weight repacking; llama-bench's --repack 0) stay
        # off; everywhere else they are llama.cpp's fast path and stay on.
        mp.use_extra_bufts = not amx_build(llama_cpp)
        self.model = llama_cpp.llama_model_load_from_file(str(artifact.model).encode(), mp)
        if not self.model:
            raise IntegrityError(f"llama.cpp could not load {artifact.model} ({last_error()})",
                                 "Re-export it with `edgepeft export --format gguf` or check the llama.cpp version")
        threads = int(opts.get("n_threads", 0)) or physical_cores()
        cp = llama_cpp.llama_context_default_params()
        self.n_ctx = cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = min(512, n_ctx)
        # sliding-window layers (Gemma 3) keep window + ubatch cells, not the whole context:
        # llama-cli's default, and what bench's KV estimate assumes
        cp.swa_full = False
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise EdgepeftError(f"llama.cpp could not create a {n_ctx}-token context ({last_error()})",
                                "Lower --prompt-tokens/--gen-tokens or free memory")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        for name, path in artifact.adapters.items():
            ad = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
            if not ad:
                self.close()
                raise MismatchError(f"llama.cpp refused adapter {name} ({path}): {last_error()}",
                                    "Export the adapter against this base GGUF")
            self.adapters[name] = ad
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.threads = threads
        self.pos = 0
        self._rows = 0

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        data = text.encode()
        buf = (self._ll.llama_token * (len(data) + 8))()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, special)
        if n < 0:
            raise EdgepeftError("llama.cpp tokenizer overflow", "Use a shorter text")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self._ll.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, True)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    # ------------------------------------------------------------ inference
    def _run(self, tokens: Sequence[int], all_logits: bool) -> None:
        if self.pos + len(tokens) > self.n_ctx:
            raise EdgepeftError(f"sequence of {self.pos + len(tokens)} tokens exceeds the {self.n_ctx}-token context",
                                "Lower --prompt-tokens/--gen-tokens")
        b = self.batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self.pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (all_logits or i == n - 1) else 0
        b.n_tokens = n
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgepeftError(f"llama_decode failed with status {rc} ({last_error()})",
                                "Lower --prompt-tokens or free memory")
        self.pos += n
        self._rows = n if all_logits else 1
        self._first = 0 if all_logits else n - 1

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        self._run(list(tokens), all_logits)

    def decode(self, n: int, tokens: Sequence[int] | None = None) -> list[int]:
        fed = []
        for i in range(n):
            t = tokens[i] if tokens is not None else int(np.argmax(self._last_row()))
            self._run([t], False)
            fed.append(t)
        return fed

    def _last_row(self) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits(self) -> np.ndarray:
        if self._rows == 0:
            raise EdgepeftError("no logits yet", "Call prefill first")
        # llama.cpp keeps the output rows of one batch contiguous, in batch order (get_logits_ith(j) is
        # logits + j * n_vocab): one copy of the block. Row by row plus a stack was two copies and a
        # Python loop, 1.2-1.7 s for 64 rows of Gemma 3's 262k vocabulary on the loaded machine.
        block = self._ll.llama_get_logits_ith(self.ctx, self._first)
        return np.ctypeslib.as_array(block, shape=(self._rows, self.n_vocab)).copy()

    # -------------------------------------------------------------- adapters
    def set_adapter(self, name: str | None) -> None:
        check_adapter_name(self.name, self.adapters, name)
        ll = self._ll
        if name is None:
            rc = ll.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            arr = (ll.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            scales = (ctypes.c_float * 1)(1.0)
            rc = ll.llama_set_adapters_lora(self.ctx, arr, 1, scales)
        if rc != 0:
            raise EdgepeftError(f"llama.cpp could not activate adapter {name} (status {rc})", last_error())
        self.active = name
        self.reset()

    def reset(self) -> None:
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self.ctx), True)
        self.pos = 0
        self._rows = 0

    def close(self) -> None:
        ll = getattr(self, "_ll", None)
        if ll is None:
            return
        if getattr(self, "batch", None) is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        # adapters are freed together with their model
        self.adapters = {}
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None
