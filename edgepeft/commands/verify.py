"""edgepeft verify BUNDLE (directory or .tar)"""

from __future__ import annotations

import click

from edgepeft.ui import echo, edgepeft_command, info, print_json


@edgepeft_command("verify", json_option=True)
@click.argument("bundle", type=click.Path())
def command(bundle, as_json):
    """Check every hash, every header, and that each adapter fits the base (fingerprint, names, shapes).

    Exit 0 when all checks pass, 2 with the first failure named otherwise.
    """
    from edgepeft.bundle import verify_path

    checked = verify_path(bundle)
    m = checked.manifest
    if as_json:
        print_json({"ok": True, "bundle": str(bundle), "base_fingerprint": m["base_fingerprint"],
                    "files": len(m["files"]), "bytes": sum(f["size"] for f in m["files"].values()),
                    "adapters": [a["name"] for a in m["adapters"]], "onnx": [o["name"] for o in m["onnx"]],
                    "warnings": checked.warnings})
        return
    for w in checked.warnings:
        info(f"warning: {w}")
    echo(f"OK {bundle}: {len(m['files'])} files hashed, "
         f"adapters fit: {', '.join(a['name'] for a in m['adapters']) or 'none'}"
         + (f"; ONNX: {', '.join(o['name'] for o in m['onnx'])}" if m["onnx"] else ""))
    echo(f"base fingerprint {m['base_fingerprint']}")  # in full, on its own line: the one to compare
