"""``--target qnn-htp``: static-shape QDQ graphs compiled to QNN EPContext models for Hexagon NPUs.

What ships to the phone, per graph (``prefill`` and ``decode``):
``<graph>_ctx.onnx`` (an EPContext node) + ``<graph>_qnn.bin`` (the QNN context binary for
the SoC in the device profile), plus the QDQ model it was compiled from.

- Shapes are static, as HTP requires: prefill takes exactly ``PREFILL_LEN`` tokens
  (right-padded) and returns their logits and K/V; decode takes one token, its position, an
  additive mask over a fixed ``CACHE_LEN`` KV cache plus itself, and returns the logits and
  that token's K/V (the host writes them into its cache slot).
- The float graphs come from a small functional re-statement of the llama/qwen2 forward in
  torch over the merged model's own modules, because the genai builder's graph uses
  GroupQueryAttention/contrib ops HTP does not run and has dynamic shapes.
- QDQ: ``onnxruntime.quantization`` with QNN's config, uint16 activations, uint8 weights.
- Compile: the onnxruntime-qnn plugin EP on the HTP backend (a simulator on x86-64), with CPU
  fallback disabled; if that fails, a second compile with fallback allowed names the nodes
  HTP did not take.

Not supported here, stated plainly: separate (swappable) adapters on HTP need QNN's own
LoRA tooling (Qualcomm AI Hub / QAIRT LoRA), which is not available in this environment;
``--mode separate --target qnn-htp`` is refused. 4-bit weights are not offered either.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgepeft import atomic
from edgepeft.errors import EdgepeftError, IntegrityError
from edgepeft.export import ExportResult
from edgepeft.keys import ONNX_SIDECAR as MANIFEST
from edgepeft.keys import QNN_CACHE_LEN, QNN_DECODE_GRAPH, QNN_MASK_NEG, QNN_PREFILL_GRAPH, QNN_PREFILL_LEN
from edgepeft.runtimes.qnn_htp import HtpTarget, htp_session, resolve_target

PREFILL_LEN, CACHE_LEN, MASK_NEG = QNN_PREFILL_LEN, QNN_CACHE_LEN, QNN_MASK_NEG  # the contract, from core


def check(req) -> HtpTarget:
    if req.mode == "separate":
        raise EdgepeftError("--mode separate is not supported for --target qnn-htp: swappable adapters on HTP "
                            "need QNN's own LoRA tooling, which is not available here",
                            "Use --mode merged for qnn-htp, or --mode separate with --target cpu")
    if not req.static_shapes:
        raise EdgepeftError("--target qnn-htp needs static shapes; dynamic shapes were requested",
                            f"Drop the dynamic-shape option (prefill {PREFILL_LEN}, KV cache {CACHE_LEN} are fixed)")
    return resolve_target(req.device)


def export(req) -> ExportResult:
    target = check(req)
    from edgepeft.export import verify as V
    from edgepeft.export.onnx import _record, load_plans
    from edgepeft.models import resolve_base

    base = resolve_base(req.base)
    base.require_tokenizer()
    plans = load_plans(req, base)
    reference = V.Reference(base, merged=plans, merge_target="original" if req.merge_into == "auto" else req.merge_into)
    if req.verify:  # the PyTorch side, in its child, while the graphs are exported, quantized and compiled
        reference.prefetch([None], "qnn", req.quant)
    t0 = time.perf_counter()
    with atomic.atomic_dir(req.out) as tmp:
        record = build(base, plans, tmp, target, req, reference)
        record["build_s"] = round(time.perf_counter() - t0, 2)
        record["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        base_record = _record(req, base, plans, tmp)
        record = {**base_record, **record, "files": base_record["files"]}
        atomic.write_json(tmp / MANIFEST, record)
    record["files"] = [str(req.out / f) for f in record["files"]] + [str(req.out / MANIFEST)]
    return ExportResult.of(record)


def build(base, plans, out: Path, target: HtpTarget, req, reference) -> dict:
    from edgepeft.export.merge import merged_state_dict

    model = base.load_model().eval()
    if plans:
        sd = merged_state_dict(base, plans, "original" if req.merge_into == "auto" else req.merge_into)
        missing = set(model.load_state_dict(sd, strict=False).missing_keys)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if missing - tied:  # a tied lm_head is the embedding, which the state dict holds
            raise IntegrityError(f"merged weights lack {min(missing - tied)}", "Report it with --debug")
    tok = base.load_tokenizer()
    tok.save_pretrained(out)
    graphs, report = {}, {"soc_model": target.soc_model, "htp_arch": target.htp_arch, "profile": target.profile,
                          "prefill_len": PREFILL_LEN, "cache_len": CACHE_LEN, "activations": "uint16",
                          "weights": "uint8", "cpu_fallback": "disabled", "graphs": {}}
    calib = calibration_feeds(model, tok)
    for kind in ("prefill", "decode"):
        float_path = out / f"{kind}.float.onnx"
        export_static(StaticLM(model, kind), kind, float_path)
        qdq_path = out / f"{kind}.qdq.onnx"
        quantize_qdq(float_path, qdq_path, calib[kind])
        float_path.unlink()
        ctx = compile_htp(qdq_path, out / {"prefill": QNN_PREFILL_GRAPH, "decode": QNN_DECODE_GRAPH}[kind], target)
        report["graphs"][kind] = {"qdq": qdq_path.name, "ctx": ctx.name, **context_nodes(ctx)}
        graphs[kind] = ctx
    del model
    record = {"qnn": report, "runtime": "onnxruntime-qnn"}
    _verify(req, record, out, reference)
    return record


def _verify(req, record: dict, out: Path, reference) -> None:
    """The one verifier: both compiled graphs in the HTP simulator (runtimes/ort.py) vs PyTorch fp32."""
    import json

    from edgepeft.export import verify as V
    from edgepeft.runtimes.base import Artifact

    if not req.verify:
        V.attach(record, [V.skipped("--no-verify", "qnn-htp", "prefill_ctx.onnx")])
        return
    # the runtime reads the compiled target (SoC, HTP arch) from the manifest, as on a device
    (out / MANIFEST).write_text(json.dumps({"qnn": record["qnn"]}))
    records = V.verify(Artifact(out, "onnx-static", out, {}, "qnn-ctx"), reference, fmt="qnn", quant=req.quant,
                       label="prefill_ctx.onnx", runtime="onnxruntime")
    for r in records:
        r["runtime"] = "qnn-htp"
    V.attach(record, records)
    V.require_passed(records, f"qnn-htp {req.quant} export")


# ------------------------------------------------------------------ static graphs
class StaticLM:
    """Llama/Qwen2 decoder with fixed shapes, reusing the HF modules' weights (projections, norms, MLP)."""

    def __new__(cls, hf_model, kind: str):
        import torch

        class _M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                cfg = hf_model.config
                self.hf = hf_model
                self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
                self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
                pos = torch.arange(PREFILL_LEN + CACHE_LEN)[None]
                x = torch.zeros(1, 1, cfg.hidden_size)
                cos, sin = hf_model.model.rotary_emb(x, pos)  # HF's own RoPE (incl. any scaling), tabulated
                self.register_buffer("cos", cos[0].detach())
                self.register_buffer("sin", sin[0].detach())
                causal = torch.full((PREFILL_LEN, PREFILL_LEN), MASK_NEG).triu(1)
                self.register_buffer("causal", causal[None, None])

            def forward(self, input_ids, *rest):
                if kind == "prefill":
                    return self.prefill(input_ids)
                return self.decode(input_ids, *rest)

            def prefill(self, input_ids):
                cos, sin = self.cos[:PREFILL_LEN][None, None], self.sin[:PREFILL_LEN][None, None]
                return self.run(input_ids, cos, sin, self.causal, None)

            def decode(self, input_ids, position, mask, *past):
                cos = self.cos[position.reshape(-1)][None, None]  # (1, 1, 1, hd)
                sin = self.sin[position.reshape(-1)][None, None]
                pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
                return self.run(input_ids, cos, sin, mask, pairs)

            def run(self, input_ids, cos, sin, mask, past):
                m = self.hf.model
                h = m.embed_tokens(input_ids)
                kv = []
                for i, layer in enumerate(m.layers):
                    a, k, v = self.attn(layer.self_attn, layer.input_layernorm(h), cos, sin, mask,
                                        None if past is None else past[i])
                    h = h + a
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
                    kv += [k, v]
                return (self.hf.lm_head(m.norm(h)), *kv)

            def attn(self, sa, x, cos, sin, mask, past):
                seq = x.shape[1]
                q = sa.q_proj(x).reshape(1, seq, self.nh, self.hd).transpose(1, 2)
                k = sa.k_proj(x).reshape(1, seq, self.kvh, self.hd).transpose(1, 2)
                v = sa.v_proj(x).reshape(1, seq, self.kvh, self.hd).transpose(1, 2)
                q, k = rope(q, cos, sin), rope(k, cos, sin)
                keys, vals = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
                rep = self.nh // self.kvh
                keys = keys[:, :, None].expand(-1, -1, rep, -1, -1).reshape(1, self.nh, -1, self.hd)
                vals = vals[:, :, None].expand(-1, -1, rep, -1, -1).reshape(1, self.nh, -1, self.hd)
                scores = q @ keys.transpose(2, 3) * (self.hd ** -0.5) + mask
                o = (scores.softmax(-1) @ vals).transpose(1, 2).reshape(1, seq, self.nh * self.hd)
                return sa.o_proj(o), k, v

        return _M().eval()


def rope(x, cos, sin):
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def io_names(n_layers: int, kind: str) -> tuple[list[str], list[str]]:
    kv_out = [f"{t}.{i}" for i in range(n_layers) for t in ("key", "value")]
    if kind == "prefill":
        return ["input_ids"], ["logits", *kv_out]
    past = [f"past_{t}.{i}" for i in range(n_layers) for t in ("key", "value")]
    return ["input_ids", "position", "mask", *past], ["logits", *kv_out]


def dummy_inputs(model, kind: str):
    import torch

    cfg = model.hf.config
    if kind == "prefill":
        return (torch.zeros(1, PREFILL_LEN, dtype=torch.int32),)
    past = [torch.zeros(1, model.kvh, CACHE_LEN, model.hd) for _ in range(2 * cfg.num_hidden_layers)]
    return (torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, 1, 1, CACHE_LEN + 1), *past)


def export_static(model, kind: str, path: Path) -> None:
    import torch

    ins, outs = io_names(model.hf.config.num_hidden_layers, kind)
    with torch.no_grad():
        torch.onnx.export(model, dummy_inputs(model, kind), str(path), input_names=ins, output_names=outs,
                          opset_version=17, dynamo=False)


def calibration_feeds(model, tok, n: int = 4) -> dict[str, list[dict]]:
    """Real activations for QDQ calibration: prefill on fixed prompts, then the decode step after each."""
    import numpy as np
    import torch

    from edgepeft.export.verify import PROMPTS

    prompts = list(PROMPTS) + ["Send 3 small red mugs to Pia in Riga."]
    pre, dec = [], []
    for p in prompts[:n]:
        ids = tok(p)["input_ids"][: PREFILL_LEN - 1]
        padded = np.zeros((1, PREFILL_LEN), np.int32)
        padded[0, : len(ids)] = ids
        pre.append({"input_ids": padded})
        static = StaticLM(model, "prefill")
        with torch.no_grad():
            outs = static(torch.tensor(padded))
        n_ctx = len(ids)
        past = {}
        for i in range(model.config.num_hidden_layers):
            for j, t in enumerate(("key", "value")):
                buf = np.zeros((1, static.kvh, CACHE_LEN, static.hd), np.float32)
                buf[:, :, :n_ctx] = outs[1 + 2 * i + j][:, :, :n_ctx].numpy()
                past[f"past_{t}.{i}"] = buf
        mask = np.full((1, 1, 1, CACHE_LEN + 1), MASK_NEG, np.float32)
        mask[..., :n_ctx] = 0
        mask[..., -1] = 0  # the new token attends to itself
        next_id = int(outs[0][0, n_ctx - 1].argmax())
        dec.append({"input_ids": np.array([[next_id]], np.int32), "position": np.array([[n_ctx]], np.int32),
                    "mask": mask, **past})
    return {"prefill": pre, "decode": dec}


def quantize_qdq(float_path: Path, qdq_path: Path, feeds: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    cfg = get_qnn_qdq_config(str(float_path), Reader(), activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QUInt8)
    quantize(str(float_path), str(qdq_path), cfg)


def compile_htp(qdq: Path, ctx: Path, target: HtpTarget) -> Path:
    try:
        htp_session(qdq, target, ctx_out=ctx)
    except Exception as e:  # ORT raises a generic Fail; find out which nodes HTP refused
        unmapped = unmapped_nodes(qdq, target)
        raise EdgepeftError(f"QNN HTP could not take the whole {qdq.stem} graph with CPU fallback disabled "
                            f"({len(unmapped)} nodes did not map: {', '.join(unmapped[:5]) or str(e)[:200]})",
                            "Report it; these op types need a rewrite before HTP can run them") from e
    if not ctx.is_file() or not list(ctx.parent.glob(f"{ctx.stem}*.bin")):
        raise IntegrityError(f"QNN compile wrote no EPContext model/context binary for {qdq.name}", "Rerun with --debug")
    return ctx


def unmapped_nodes(qdq: Path, target: HtpTarget) -> list[str]:
    """Compile with CPU fallback allowed: whatever is left outside EPContext nodes did not map to HTP."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        ctx = Path(d) / "probe_ctx.onnx"
        htp_session(qdq, target, ctx_out=ctx, fallback=True)
        # no context model at all means no node mapped
        g = onnx.load(str(ctx if ctx.is_file() else qdq), load_external_data=False).graph
        return [f"{n.op_type}:{n.name or n.output[0]}" for n in g.node if n.op_type != "EPContext"]


def context_nodes(ctx: Path) -> dict:
    """What the compiled EPContext model holds: anything but one EPContext node did not map to HTP."""
    import onnx

    g = onnx.load(str(ctx), load_external_data=False).graph
    return {"unmapped_nodes": [f"{n.op_type}:{n.name}" for n in g.node if n.op_type != "EPContext"],
            "ctx_nodes": len(g.node)}
