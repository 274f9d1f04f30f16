"""Run the real ``edgepeft`` CLI with one deliberate writer defect injected (tests only).

    python tests/broken_writer.py DEFECT export --format gguf ...

The defect is patched into the writer modules of this process before the CLI runs; nothing in
edgepeft reads an environment variable or option for it. Each defect is one a real writer
could have, and each must make the export's own verification fail (tests/test_verify.py):

- ``qk_permutation``: GGUF Q/K rows written in Hugging Face order (llama.cpp's rope wants them permuted);
- ``lora_scale``: every writer applies alpha/r where the adapter asks for alpha/sqrt(r) (rsLoRA),
  which is what llama.cpp's convert_lora_to_gguf.py does;
- ``tokenizer``: the tokenizer written with two vocabulary entries swapped (" the" and " of");
- ``bias``: q/k/v biases (qwen2) written as zeros;
- ``adapter_lost``: the merged writers merge nothing (what a 4-bit grid does to an adapter smaller than its step:
  merged at q4_1 onto its own Q4_1 grid, the demo adapter rounded back to the base).

QNN HTP (``--target qnn-htp``) gets the same defects where its writer has them: the scale (through the
shared merge), the tokenizer file, the biases of the model its static graphs are traced from.
"""

from __future__ import annotations

import dataclasses
import sys

SWAP = ("Ġthe", "Ġof")


def _wrong_scale(module):
    return dataclasses.replace(module, scale=module.alpha / module.rank)


def qk_permutation() -> None:
    from edgepeft.export import gguf_tensors

    gguf_tensors.permute_qk = lambda w, hf_name, arch, cfg: w


def lora_scale() -> None:
    from edgepeft.export import gguf, merge, onnx_adapters

    by_weight = merge._deltas_by_weight  # both merged writers (GGUF stream, ONNX folder) merge through it
    merge._deltas_by_weight = lambda plans: {k: [(p, _wrong_scale(m)) for p, m in v]
                                             for k, v in by_weight(plans).items()}
    gguf.fold_factor = lambda scale, rank, alpha: 1.0  # separate GGUF: llama.cpp applies alpha/r
    params = onnx_adapters.plan_parameters
    onnx_adapters.plan_parameters = lambda plan, slots: params(dataclasses.replace(
        plan, modules={t: _wrong_scale(m) for t, m in plan.modules.items()}), slots)


def _swap_vocab(vocab: dict) -> None:
    a, b = SWAP
    vocab[a], vocab[b] = vocab[b], vocab[a]


def tokenizer() -> None:
    import json

    from edgepeft.export import gguf_tokenizer, onnx

    token_list = gguf_tokenizer.token_list

    def swapped_list(tokenizer_json, vocab_size):
        tj = json.loads(json.dumps(tokenizer_json))
        _swap_vocab(tj["model"]["vocab"])
        return token_list(tj, vocab_size)

    gguf_tokenizer.token_list = swapped_list
    build = onnx.build_genai

    def build_swapped(hf_dir, out, **kw):
        build(hf_dir, out, **kw)
        tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        _swap_vocab(tj["model"]["vocab"])
        (out / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")

    onnx.build_genai = build_swapped
    _before_qnn_verify(lambda out: _swap_file_vocab(out / "tokenizer.json"))


def _swap_file_vocab(path) -> None:
    import json

    tj = json.loads(path.read_text(encoding="utf-8"))
    _swap_vocab(tj["model"]["vocab"])
    path.write_text(json.dumps(tj), encoding="utf-8")


def _before_qnn_verify(defect) -> None:
    """QNN HTP: ``defect(out)`` once the graphs and tokenizer are written, right before the export verifies them."""
    from edgepeft.export import qnn

    verify = qnn._verify

    def broken_verify(req, record, out, *rest):
        defect(out)
        return verify(req, record, out, *rest)

    qnn._verify = broken_verify


def _qnn_model_defect(defect) -> None:
    """QNN HTP: ``defect(hf_model)`` on the model the static graphs are traced from."""
    from edgepeft.export import qnn

    static = qnn.StaticLM

    class Broken:
        def __new__(cls, hf_model, kind):
            defect(hf_model)
            return static(hf_model, kind)

    qnn.StaticLM = Broken


def _zero_biases(model) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()


def bias() -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from edgepeft.export import gguf, onnx

    stream = gguf._tensor_stream

    def no_bias(base, plans, target):
        for name, w in stream(base, plans, target):
            yield name, (w * 0 if name.endswith(".bias") else w)

    gguf._tensor_stream = no_bias
    build = onnx.build_genai

    def build_no_bias(hf_dir, out, **kw):
        from safetensors.torch import load_file, save_file

        with tempfile.TemporaryDirectory() as d:
            copy = Path(d) / "hf"
            shutil.copytree(hf_dir, copy)
            for f in copy.glob("*.safetensors"):
                sd = load_file(str(f))
                save_file({k: v * 0 if k.endswith(".bias") else v for k, v in sd.items()}, str(f),
                          metadata={"format": "pt"})
            build(copy, out, **kw)

    onnx.build_genai = build_no_bias
    _qnn_model_defect(_zero_biases)


def adapter_lost() -> None:
    from edgepeft.export import merge

    merge._deltas_by_weight = lambda plans: {}  # both merged writers (GGUF stream, ONNX folder) merge through it


DEFECTS = {"qk_permutation": qk_permutation, "lora_scale": lora_scale, "tokenizer": tokenizer, "bias": bias,
           "adapter_lost": adapter_lost}

if __name__ == "__main__":
    DEFECTS[sys.argv[1]]()
    from edgepeft.cli import main

    main(sys.argv[2:])
