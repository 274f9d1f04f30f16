"""Qualcomm HTP through onnxruntime-qnn: the SoC target and an HTP session, CPU fallback off.

The QNN exporter compiles and checks its EPContext graphs with these sessions, and the
``onnxruntime`` runtime runs them; the static shapes both agree on are in :mod:`edgepeft.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import EdgepeftError


@dataclass(frozen=True)
class HtpTarget:
    soc_model: str
    htp_arch: str
    profile: str | None = None


def resolve_target(device: str | None) -> HtpTarget:
    """SoC from a device profile (name or YAML) or ``soc=57,htp=75``; default: a generic v73 target."""
    if device is None:
        return HtpTarget("60", "73")
    if "=" in device:
        kv = dict(part.split("=", 1) for part in device.split(",") if "=" in part)
        soc, htp = kv.get("soc") or kv.get("soc_model"), kv.get("htp") or kv.get("htp_arch")
        if not (soc and htp and soc.isdigit() and htp.isdigit()):
            raise EdgepeftError(f"--device {device!r} does not name a SoC", "Use soc=<number>,htp=<arch>, e.g. soc=57,htp=75")
        return HtpTarget(soc, htp)
    from edgepeft.profiles import load_profile

    prof = load_profile(device)
    opts = {}
    for spec in prof.runtimes.values():
        opts.update(spec.provider_options.get("QNNExecutionProvider", {}))
    if "soc_model" not in opts or "htp_arch" not in opts:
        raise EdgepeftError(f"device {prof.name} has no QNN HTP (no QNNExecutionProvider soc_model/htp_arch in "
                            f"{prof.source})", "Pick a Snapdragon profile, e.g. --device snapdragon-8-gen-3")
    return HtpTarget(str(opts["soc_model"]), str(opts["htp_arch"]), prof.name)


def _qnn_device():
    import onnxruntime as ort

    try:
        import onnxruntime_qnn as oq
    except ImportError as e:
        raise EdgepeftError("--target qnn-htp needs onnxruntime-qnn", "pip install onnxruntime-qnn") from e
    name = oq.get_ep_names()[0]
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, oq.get_library_path())
    dev = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not dev:
        raise EdgepeftError("onnxruntime-qnn registered no QNN device", "Check the onnxruntime-qnn install")
    return dev[0], oq.get_qnn_htp_path()


def htp_session(model_path: Path, target: HtpTarget, ctx_out: Path | None = None, fallback: bool = False):
    import onnxruntime as ort

    dev, htp = _qnn_device()
    ort.set_default_logger_severity(4)  # errors reach the user as one EdgepeftError line, not ORT log spew
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if ctx_out is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(ctx_out))
        so.add_session_config_entry("ep.context_embed_mode", "0")  # separate .bin: the context binary ships as is
    so.add_provider_for_devices([dev], {"backend_path": htp, "soc_model": target.soc_model,
                                        "htp_arch": target.htp_arch})
    from edgepeft.ui import native_quiet

    with native_quiet():  # the HTP libraries' "# LIBNATIVE: ..." banner on fd 1
        return ort.InferenceSession(str(model_path), so)
