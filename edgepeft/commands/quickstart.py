"""edgepeft quickstart [--fast] [--out DIR]"""

from __future__ import annotations

import click

from edgepeft.ui import edgepeft_command, info, print_json


@edgepeft_command("quickstart", json_option=True)
@click.option("--out", default="edgepeft-quickstart", show_default=True, type=click.Path(),
              help="New directory for every artifact of the run.")
@click.option("--fast", is_flag=True, help="Tiny run for CI: a few training steps, one short benchmark pass.")
@click.option("--base", default="smollm2-135m", show_default=True, help="Base model (the embedded default).")
def command(out, fast, base, as_json):
    """Train the demo adapter (QLoRA 4-bit), evaluate, export GGUF + ONNX merged and separate,
    benchmark them on llama.cpp and onnxruntime-genai, print the table, write the chart and a bundle.

    CPU only; about 20 minutes on 2 cores (--fast: a few minutes).
    """
    import json
    from pathlib import Path

    from edgepeft.quickstart import print_table, run

    summary = run(Path(out), fast=fast, base=base)
    if as_json:
        print_json(summary)
        return
    print_table(json.loads(Path(summary["bench"]).read_text()))
    from edgepeft.ui import result_console
    from edgepeft.verification_view import render

    console = result_console()
    for name, record in summary["exports"].items():
        if record.get("verify") is not None or record.get("verification") or record.get("verifications"):
            render(record, console, folder=Path(out) / name)
    if not summary["plan"]["verify_exports"]:
        click.echo("exports not verified against PyTorch in --fast (edgepeft export verifies by default)")
    ev = summary["evaluate"]
    click.echo(f"demo exact match (PyTorch, every row above scored on the same {ev['adapter']['total']} examples): "
               f"base {ev['base']['accuracy']:.0%} -> adapter {ev['adapter']['accuracy']:.0%}")
    click.echo("demo exact match with the adapter: " + ", ".join(
        f"{a['artifact']} {a['accuracy']:.0%}" + (f" ({a['points_vs_pytorch']:+.0f} pt)" if a["points_vs_pytorch"] is not None
                                                  else "") for a in summary["accuracy"]))
    info(f"chart {summary['chart']}, bundle {summary['bundle']} (verified), total {summary['seconds']['total']:.0f} s")
