"""Swappable LoRA for ONNX Runtime: overridable graph inputs plus ``.onnx_adapter`` files.

The model builder emits a LoRA module as two float MatMuls whose weights are plain
initializers (``model.layers.0.attn.q_proj.lora_A.MatMul.weight``, B already scaled).
:func:`make_lora_inputs` turns each of those into an initializer that is *also* a graph
input, renamed to the Hugging Face target (``model.layers.0.self_attn.q_proj.lora_A.weight``),
with the rank dimension symbolic (``lora_r``) and a rank-0 default: with no adapter active
A is (in, 0) and B is (0, out), so the LoRA branch adds exact zeros and the model is the
plain base. This is what Olive's ExtractAdapters pass does (``make_inputs``,
``dynamic_lora_r``, ``optional_inputs``); olive-ai itself pins an older ORT stack, so the
rewrite is done here in a few lines of ``onnx``.

An ``.onnx_adapter`` (``onnxruntime.AdapterFormat``) then holds, per module, A as (in, r)
and scale·B as (r, out), named exactly like the graph inputs. Names and shapes are checked
when the file is written and again by :func:`edgepeft.fit.check_onnx_adapter_fits` before it is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgepeft.errors import EdgepeftError, IntegrityError, MismatchError
from edgepeft.fit import check_onnx_adapter_fits, check_parameters, model_slots  # noqa: F401 - the one fit check

RANK_DIM = "lora_r"
MODEL_FILE = "model.onnx"

# builder sub-block name -> Hugging Face module name (names as data, not string replaces)
BUILDER_BLOCKS = {"attn": "self_attn", "mlp": "mlp"}
_HF_BLOCKS = {v: k for k, v in BUILDER_BLOCKS.items()}
_BUILDER_LORA = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<proj>\w+)\.lora_(?P<ab>[AB])\.MatMul\.weight$")
# fused Hugging Face modules (Phi-3) that the builder emits as separate projections; a LoRA on
# the fused module becomes one LoRA per part: the same A, and B's rows cut at the parts' sizes
# (ΔW = B·A row-sliced is exactly each part's ΔW), so nothing is approximated
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_HF_TARGET = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<proj>\w+)$")


def param_name(target: str, ab: str) -> str:
    """The graph input / adapter parameter name of one LoRA matrix ("A" or "B")."""
    return f"{target}.lora_{ab}.weight"


def split_target(target: str) -> list[str]:
    """The projections the builder emits for ``target`` (itself, or the parts of a fused module)."""
    head, _, leaf = target.rpartition(".")
    return [f"{head}.{part}" for part in FUSED[leaf]] if leaf in FUSED else [target]


def builder_node(target: str, ab: str) -> str:
    """The builder's node name for a LoRA MatMul (used to keep it out of int4 quantization)."""
    m = _HF_TARGET.match(target)
    if not m or m["block"] not in _HF_BLOCKS:
        raise EdgepeftError(f"LoRA target {target} is not a decoder-layer projection the ONNX builder emits",
                            "Target attention/MLP projections (q/k/v/o_proj, gate/up/down_proj)")
    return f"/model/layers.{m['layer']}/{_HF_BLOCKS[m['block']]}/{m['proj']}/lora_{ab}/MatMul"


def _hf_target(builder_init: str) -> tuple[str, str] | None:
    m = _BUILDER_LORA.match(builder_init)
    if not m:
        return None
    block = BUILDER_BLOCKS.get(m["block"], m["block"])
    return f"model.layers.{m['layer']}.{block}.{m['proj']}", m["ab"]


# ------------------------------------------------------------------ graph rewrite
def make_lora_inputs(model_path: Path) -> dict[str, dict]:
    """Rewrite ``model_path`` in place; return the slots ``{param: {"shape": [...], "dtype": ...}}``.

    ``shape`` has ``None`` in the rank position. Raises if the builder left no float LoRA
    MatMul to rewrite (e.g. it was quantized), since the adapters would then have no slot.
    """
    import onnx
    from onnx import helper, numpy_helper

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=True)
    g = model.graph
    slots = {}
    for init in g.initializer:
        hit = _hf_target(init.name)
        if hit is None:
            continue
        target, ab = hit
        new = param_name(target, ab)
        arr = numpy_helper.to_array(init)
        rank_axis = 1 if ab == "A" else 0  # builder stores the MatMul weight transposed: A (in, r), B (r, out)
        shape = list(arr.shape)
        shape[rank_axis] = 0
        init.CopyFrom(numpy_helper.from_array(arr.reshape(-1)[:0].reshape(shape), new))
        # One symbolic rank per module: a shared name tells ORT's memory planner that every
        # module has the same rank, and pruned adapters (ranks differ per module) then fail
        # with "Shape mismatch attempting to re-use buffer".
        dims = [d if i != rank_axis else f"{RANK_DIM}.{target}" for i, d in enumerate(arr.shape)]
        g.input.append(helper.make_tensor_value_info(new, init.data_type, dims))
        slots[new] = {"shape": [None if i == rank_axis else int(d) for i, d in enumerate(arr.shape)],
                      "dtype": helper.tensor_dtype_to_np_dtype(init.data_type).name, "target": target}
    # the initializers were renamed in place above; point the consumers at the new names
    old_names = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            hit = _hf_target(name)
            if hit is not None:
                node.input[i] = param_name(*hit)
                old_names[name] = node.input[i]
            elif "lora_" in name and node.op_type == "MatMulNBits":
                raise EdgepeftError(f"LoRA MatMul {node.name} was quantized to MatMulNBits, so it cannot take adapters",
                                    "This is a bug in the ONNX export (LoRA matmuls must stay float); rerun with --debug")
    if not slots:
        raise EdgepeftError(f"{model_path} has no float LoRA MatMul to turn into adapter inputs",
                            "This is a bug in the ONNX export; rerun with --debug")
    # Stale shape info for the old names, and the builder's static rank on the LoRA
    # intermediates (x @ A), would make ORT plan one buffer size for every adapter rank.
    lora_outputs = {o for node in g.node if any(i in slots for i in node.input) for o in node.output}
    for vi in list(g.value_info):
        if vi.name in old_names or vi.name in lora_outputs:
            g.value_info.remove(vi)
    save_rewritten(model, model_path)
    return slots


def save_rewritten(model, model_path: Path) -> None:
    """Save a graph rewrite of ``model_path`` (loaded with its external data) back in place, its tensors in
    ``<name>.data`` beside it. onnx appends to an existing data file, so the old one is removed first."""
    import onnx

    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)


# ------------------------------------------------------------------ adapter files
def plan_parameters(plan, slots: dict[str, dict]) -> dict:
    """``{param: np.ndarray}`` for one AdapterPlan, checked against the model's slots."""
    import numpy as np

    params = {}
    for target, mod in plan.modules.items():
        a = mod.a.float().T.contiguous().numpy()  # (in, r)
        b = (mod.b.float() * mod.scale).T.contiguous().numpy()  # (r, out); scale folded like the builder does
        start = 0
        for part in split_target(target):
            name_b = param_name(part, "B")
            width = (slots.get(name_b) or {"shape": [None, b.shape[1] - start]})["shape"][1]
            for ab, arr in (("A", a), ("B", b[:, start:start + width])):
                name = param_name(part, ab)
                slot = slots.get(name)
                if slot is None:
                    raise MismatchError(f"adapter {plan.name}: module {target} has no LoRA slot in the ONNX base "
                                        f"(no graph input {name})",
                                        f"Export the base with this adapter among --adapter so the slot exists "
                                        f"({len(slots) // 2} modules have slots)")
                params[name] = np.ascontiguousarray(arr).astype(np.dtype(slot["dtype"]))
            start += width
        if start != b.shape[1]:
            raise MismatchError(f"adapter {plan.name}: {target} has {b.shape[1]} output rows, the ONNX slots for "
                                f"its parts cover {start}", "Re-export the adapter against this base")
    check_parameters({k: (v.shape, str(v.dtype)) for k, v in params.items()}, slots, where=f"adapter {plan.name}")
    return params


def write_onnx_adapter(params: dict, path: Path) -> None:
    """Write ``{param: ndarray}`` as an ORT ``.onnx_adapter`` (the caller owns atomicity of ``path``)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))


def read_onnx_adapter(path: Path) -> dict:
    """``{param: ndarray}`` from an ``.onnx_adapter`` file."""
    import onnxruntime as ort

    from edgepeft.security import check_onnx_adapter

    path = Path(path)
    if not path.is_file():
        raise EdgepeftError(f"adapter file {path} does not exist", "Check the path")
    check_onnx_adapter(path)  # bounded header check before the file reaches ORT's C++ reader
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        return {k: v.numpy() for k, v in fmt.get_parameters().items()}
    except Exception as e:
        raise IntegrityError(f"{path} is not a readable .onnx_adapter ({type(e).__name__})",
                             "Re-export it with edgepeft export --format onnx --mode separate") from e
