"""Force bitsandbytes' CPU feature check (AVX-512 BF16) in every Python process of a test run.

Put this folder on PYTHONPATH and set EDGEPEFT_TEST_AVX512BF16=1 (or 0): bitsandbytes' native
``has_avx512bf16_cpu()`` then answers that value, before bitsandbytes registers its CPU kernels
or builds a ``Linear4bit``. So a machine without AVX-512 BF16 exercises the code path (kernel
registration, the kernels-community log line, per-module ``support_avx512bf16_for_cpu``) that such
CPUs take, and the reverse. Forcing 1 where the CPU lacks the instructions is safe only because
edgepeft never lets the fused kernel run (edgepeft/train/kernels.py); that is what the tests show.
Test-only: nothing in the package reads this variable.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_FORCE = os.environ.get("EDGEPEFT_TEST_AVX512BF16")


class _ForcedLib:
    def __init__(self, lib, value: bool):
        self._lib, self._value = lib, value

    def has_avx512bf16_cpu(self):
        return self._value

    def __getattr__(self, name):
        return getattr(self._lib, name)


class _PatchCextension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module.lib = _ForcedLib(module.lib, _FORCE == "1")

        spec.loader.exec_module = patched
        return spec


if _FORCE in ("0", "1"):
    sys.meta_path.insert(0, _PatchCextension())
