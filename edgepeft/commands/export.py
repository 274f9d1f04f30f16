"""edgepeft export --format gguf|onnx ..."""

from __future__ import annotations

import click

from edgepeft.export.request import GGUF_QUANTS, ONNX_QUANTS
from edgepeft.ui import edgepeft_command, print_json


@edgepeft_command("export", json_option=True)
@click.option("--format", "fmt", default="gguf", show_default=True, help="gguf | onnx")
@click.option("--base", required=True, help="Base model: HF folder, .gguf, hub id, or alias (smollm2-135m).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(), help="PEFT adapter folder (repeatable).")
@click.option("--name", "names", multiple=True, help="Name for each --adapter, in order (default: folder name).")
@click.option("--mode", default="merged", show_default=True, help="merged | separate")
@click.option("--quant", default=None, help=f"gguf: {' '.join(GGUF_QUANTS)}; onnx: {' '.join(ONNX_QUANTS)}")
@click.option("--adapter-type", default="f16", show_default=True, help="GGUF adapter tensors: f16 | q8_0")
@click.option("--prune", default=None,
              help="auto | energy=0.99 | rank=8 | size=2MB, optionally ,drop=1e-4 ,modules=q_proj+v_proj. auto: the "
                   "smallest modules+rank whose task accuracy stays within 1 point (,tolerance=P ,examples=N)")
@click.option("--merge-into", default="auto", show_default=True, help="auto | dequantized | original")
@click.option("--calib", type=click.Path(), default=None,
              help="JSONL calibration set (training formats) for the importance matrix and --merge-into auto.")
@click.option("--imatrix", default="auto", show_default=True,
              help="gguf block types: auto (the adapter's training data, --calib, else the bundled wikitext-2 slice) "
                   "| none | an imatrix .gguf to reuse")
@click.option("--keep-delta", default=None,
              help="gguf: keep the adapter-touched weights with the largest relative change at q8_0, within this "
                   "many extra bytes (e.g. 4MB)")
@click.option("--force", is_flag=True, help="Accept an adapter whose recorded base fingerprint differs (shapes are still checked).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a pickle (.bin) adapter. Unsafe with untrusted files.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against the PyTorch reference.")
@click.option("--block-size", default=32, show_default=True, type=int, help="onnx int4 block size")
@click.option("--accuracy-level", default=4, show_default=True, type=int, help="onnx MatMulNBits accuracy level")
@click.option("--quant-algo", default="auto", show_default=True,
              help="onnx int4/int8 weight algorithm: auto | k_quant_last | rtn_last | k_quant | rtn | k_quant_mixed | "
                   "default | gptq_last | gptq | gptq_mixed | source_grid (*_last: lm_head at int8; gptq*: int4 calibrated "
                   "on the adapter's training data or --calib plus generic text; gptq_mixed: also attn_v and ffn_down "
                   "of the layers Q4_K_M keeps at more bits at int8; source_grid: --mode separate int4 that keeps "
                   "a 4-bit GGUF base's grid exactly; auto: source_grid where it applies, gptq_mixed for merged int4 "
                   "with task data, else k_quant_last)")
@click.option("--target", default="cpu", show_default=True, help="onnx target: cpu | cuda | qnn-htp")
@click.option("--device", default=None, help="Device profile name or YAML path (onnx qnn-htp).")
@click.option("--dynamic-shapes", is_flag=True, help="onnx: dynamic shapes (cpu/cuda graphs already are; qnn-htp refuses them).")
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
def command(fmt, base, adapters, names, mode, quant, adapter_type, prune, merge_into, calib, imatrix, keep_delta,
            force, allow_pickle,
            no_verify, block_size, accuracy_level, quant_algo, target, device, dynamic_shapes, out, as_json):
    """Prune/merge an adapter and write GGUF or ONNX artifacts, verified against PyTorch."""
    from edgepeft.export import export
    from edgepeft.export.request import ExportRequest

    req = ExportRequest(format=fmt, base=base, adapters=list(adapters), names=list(names), out=out, mode=mode,
                        quant=quant, adapter_type=adapter_type, prune=prune, merge_into=merge_into, calib=calib,
                        imatrix=imatrix, keep_delta=keep_delta,
                        force=force, allow_pickle=allow_pickle, verify=not no_verify, block_size=block_size,
                        accuracy_level=accuracy_level, quant_algo=quant_algo, target=target, device=device,
                        static_shapes=not dynamic_shapes)
    from edgepeft.ui import native_stdout_to_stderr

    with native_stdout_to_stderr(as_json):  # the QNN simulator and runtimes print from C++ to fd 1
        result = export(req)
    if as_json:
        print_json(result.record)
    else:
        from edgepeft.ui import info, result_console
        from edgepeft.verification_view import render

        for f in result.files:
            info(f"wrote {f}")
        render(result.record, result_console(), folder=out)  # the result, on stdout: every export ends with it
