"""Third-party chatter off: the one place edgepeft decides what libraries may print.

Called once by the CLI before any heavy library is imported (``edgepeft.cli.main``), unless
``--debug`` asks to see everything. It imports nothing heavy itself: loggers are configured by
name (a library's module loggers inherit the level set on its top-level logger), and the
libraries that read their verbosity from the environment at import time get it there.

What is silenced gives the user nothing to do. Examples: bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community" on CPUs with AVX-512 BF16 (a hub download that cannot
work offline and that edgepeft does not use, see :mod:`edgepeft.train.kernels`), transformers'
per-tensor progress bars and deprecation notes, and Python warnings from every library.
Errors still reach the user: as one ``edgepeft: error:`` line when edgepeft can name the fix,
or as that library's own exception otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings

# Top-level loggers of libraries that log warnings a user cannot act on. Their module loggers
# (``bitsandbytes.backends.cpu.ops``, ``transformers.modeling_utils``, ...) inherit the level.
LIBRARY_LOGGERS = ("bitsandbytes", "transformers", "peft", "trl", "accelerate", "datasets", "torch",
                   "huggingface_hub", "onnxruntime", "onnxscript", "onnx_ir", "matplotlib", "urllib3")
# Libraries that read their verbosity from the environment when first imported.
ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # its fork warning after the tokenizer child process
    # bars drawn with plain tqdm, past transformers' switch: its GGUF loader's "Converting and de-quantizing
    # GGUF tensors" on the first use of an alias (edgepeft's own progress is rich, never tqdm)
    "TQDM_DISABLE": "1",
}


def silence_libraries() -> None:
    """Silence library warnings and log lines; idempotent, cheap, imports nothing heavy."""
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # some log through the root logger itself (onnxruntime.quantization's logging.warning("Please consider
    # to run pre-processing ..."), six lines per QNN export); edgepeft logs nothing, so the root may be quiet
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def silence_progress_bars() -> None:
    """transformers/datasets progress bars, for libraries already imported (best effort)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
