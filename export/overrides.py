"""``--keep-delta BUDGET``: mixed precision through llama.cpp's tensor-type overrides (``tt_overrides``).

The weights an adapter changed most, relative to their size (‖ΔW‖_F / ‖W‖_F, from the surgery's
factored ΔW and the base's norms, both already computed by the pruner), are kept at Q8_0 while the
rest of the file takes ``--quant``'s types; weights are added in that order until the extra bytes
would pass BUDGET. The quantizer gets one exact-name regex per kept weight. An option, not a
default: benchmarks/bench_imatrix.py measures it against the importance matrix alone.
"""

from __future__ import annotations

import re

from edgepeft.errors import ConfigError

KEEP_TYPE = "q8_0"
# the ggml type most tensors of each file type take (llama-quant.cpp llama_ftype_get_default_type);
# bytes per weight come from gguf-py's GGML_QUANT_SIZES
_DEFAULT_TYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "iq4_xs": "IQ4_XS",
                 "q3_k_m": "Q3_K", "q2_k": "Q2_K", "iq3_xxs": "IQ3_XXS"}


def parse_budget(text: str) -> int:
    """``4MB`` / ``512KiB`` / ``1e6`` -> bytes (the ``--prune size=`` spelling)."""
    from edgepeft.export.prune import _parse_value

    n = _parse_value("size", str(text).strip(), str(text))
    if n < 1:
        raise ConfigError("--keep-delta", text, "a positive byte budget such as 4MB")
    return n


def bytes_per_weight(type_name: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return size / block


def choose(base, plans, quant: str, budget: str) -> tuple[dict[str, str], list[dict]]:
    """(regex -> type for llama_model_quantize, the kept weights with their relative delta and extra bytes)."""
    from edgepeft.export import gguf_tensors as gt
    from edgepeft.export.prune import factor, weight_norms

    if quant not in _DEFAULT_TYPE:
        raise ConfigError("--keep-delta with --quant", quant, ", ".join(_DEFAULT_TYPE))
    limit = parse_budget(budget)
    per_weight = bytes_per_weight(KEEP_TYPE) - bytes_per_weight(_DEFAULT_TYPE[quant])
    tmap = gt.name_map(base.arch, base.config["num_hidden_layers"])
    delta: dict[str, float] = {}
    numel: dict[str, int] = {}
    for plan in plans:
        for target, m in plan.modules.items():
            key = target + ".weight"
            delta[key] = (delta.get(key, 0.0) ** 2 + factor(m).norm ** 2) ** 0.5  # several adapters: combined norm
            numel[key] = m.in_features * m.out_features
    norms = weight_norms(base.path, sorted(delta))
    ranked = sorted(delta, key=lambda k: delta[k] / max(norms[k], 1e-30), reverse=True)
    kept, used = [], 0
    for key in ranked:
        extra = int(numel[key] * per_weight)
        if used + extra > limit:
            continue  # a smaller weight further down may still fit
        used += extra
        kept.append({"weight": gt.map_name(tmap, key), "rel_delta": round(delta[key] / max(norms[key], 1e-30), 6),
                     "extra_bytes": extra})
    return {f"^{re.escape(k['weight'])}$": KEEP_TYPE for k in kept}, kept
