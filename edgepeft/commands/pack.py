"""edgepeft pack --base BASE.gguf --adapter A.gguf [--adapter B.gguf] [--onnx DIR] --out BUNDLE [--tar]"""

from __future__ import annotations

import click

from edgepeft.ui import edgepeft_command, info, print_json


@edgepeft_command("pack", json_option=True)
@click.option("--base", type=click.Path(), default=None, help="Base model .gguf (needed for a new bundle).")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(), help="GGUF LoRA adapter (repeatable).")
@click.option("--name", "names", multiple=True, help="Name for each --adapter, in order (default: its recorded name).")
@click.option("--onnx", "onnx", multiple=True, type=click.Path(), help="ONNX folder from edgepeft export (repeatable).")
@click.option("--out", required=True, type=click.Path(), help="Bundle directory (new, or an existing bundle to add to).")
@click.option("--tar", is_flag=True, help="Also write OUT.tar.")
def command(base, adapters, names, onnx, out, tar, as_json):
    """Bundle a base with swappable adapters; every file is hashed in manifest.json.

    Pointing --out at an existing bundle adds the new adapters: only the new files and the
    manifest are written.
    """
    from pathlib import Path

    from edgepeft.bundle import PackInput, pack

    inp = PackInput(base=Path(base) if base else None, adapters=[Path(a) for a in adapters], names=list(names),
                    onnx=[Path(d) for d in onnx])
    manifest = pack(inp, Path(out), tar=tar)
    if as_json:
        print_json(manifest)
        return
    info(f"bundle {out}: base {manifest['base']['path']}, {len(manifest['adapters'])} adapter(s), "
         f"{len(manifest['onnx'])} ONNX folder(s), {len(manifest['files'])} files hashed")
    info(f"base fingerprint {manifest['base_fingerprint']}")
    if tar:
        info(f"wrote {Path(out).with_name(Path(out).name + '.tar')}")
