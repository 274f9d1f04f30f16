"""Pruning (rank reduction via QR + small SVD, module dropping) and --merge-into auto.

Reference values are computed independently here by forming ΔW and calling
torch.linalg.svdvals in float64; tolerances: relative errors agree to 1e-6 absolute.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_clean_error
from test_surgery import TARGETS, make_adapter, resolved

from edgepeft.errors import ConfigError, EdgepeftError

TOL = 1e-6


@pytest.fixture(scope="module")
def decaying_plan(tiny_llama, tmp_path_factory):
    """An adapter whose modules have different singular-value decays, so energy picks different ranks."""
    from edgepeft.export.adapter import load_adapter

    _, path = make_adapter(tiny_llama, tmp_path_factory.mktemp("prune") / "adapter", seed=3)
    plan = load_adapter(path, resolved(tiny_llama))
    for i, m in enumerate(plan.modules.values()):
        decay = 0.3 + 0.6 * (i % 5) / 4  # 0.3 .. 0.9 per module
        m.b.mul_(decay ** torch.arange(m.rank, dtype=torch.float32))
        with torch.no_grad():
            qa, _ = torch.linalg.qr(m.a.T)  # orthonormal A rows: B's column norms become the spectrum
            m.a.copy_(qa.T)
    return plan


def svals(m) -> torch.Tensor:
    return torch.linalg.svdvals(m.delta().double())


def test_energy_one_leaves_adapter_unchanged(decaying_plan):
    from edgepeft.export.prune import prune

    out = prune(decaying_plan, "energy=1.0")
    assert list(out.modules) == list(decaying_plan.modules)
    for t, m in decaying_plan.modules.items():
        assert torch.equal(out.modules[t].a, m.a) and torch.equal(out.modules[t].b, m.b)
        assert out.modules[t].scale == m.scale
    rep = out.prune_report
    assert rep["bytes_before"] == rep["bytes_after"] and rep["max_rel_error"] == 0.0


@pytest.mark.parametrize("energy", [0.95, 0.8])
def test_energy_error_equals_discarded_energy(decaying_plan, energy):
    """‖ΔW − ΔW'‖/‖ΔW‖ measured on the full matrices == √(discarded σ² / Σσ²), per module."""
    from edgepeft.export.prune import prune

    out = prune(decaying_plan, f"energy={energy}")
    rows = out.prune_report["modules"]
    for t, m in decaying_plan.modules.items():
        s2 = svals(m) ** 2
        k = int((torch.cumsum(s2, 0) / s2.sum() < energy - 1e-12).sum()) + 1  # fewest keeping >= energy
        new = out.modules[t]
        assert new.rank == k == rows[t]["new_rank"], t
        measured = float((m.delta().double() - new.delta().double()).norm() / m.delta().double().norm())
        discarded = math.sqrt(float(s2[k:].sum() / s2.sum()))
        assert measured == pytest.approx(discarded, abs=TOL), t
        assert rows[t]["rel_error"] == pytest.approx(discarded, abs=TOL), t
        assert new.scale == m.scale and new.alpha == m.alpha
    ranks = set(out.ranks.values())
    assert len(ranks) > 1, ranks  # ranks really differ per module
    assert out.prune_report["bytes_after"] < out.prune_report["bytes_before"]


def test_rank_cap_and_report(decaying_plan):
    from edgepeft.export.prune import prune

    out = prune(decaying_plan, "rank=3")
    assert set(out.ranks.values()) == {3}
    rep = out.prune_report
    assert rep["bytes_after"] == sum(3 * (m.in_features + m.out_features) * 2 for m in decaying_plan.modules.values())
    assert rep["modules"]["model.layers.0.self_attn.q_proj"]["old_rank"] == 8


def test_size_budget(decaying_plan):
    from edgepeft.export.prune import prune

    budget = decaying_plan.nbytes() // 3
    out = prune(decaying_plan, f"size={budget}B")
    worst = max((m.in_features + m.out_features) * 2 for m in decaying_plan.modules.values())
    assert budget - worst < out.nbytes() <= budget
    assert len(set(out.ranks.values())) > 1


def test_drop_negligible_module(tiny_llama, tmp_path):
    from edgepeft.export.adapter import load_adapter
    from edgepeft.export.prune import prune

    _, path = make_adapter(tiny_llama, tmp_path / "a")
    plan = load_adapter(path, resolved(tiny_llama))
    plan.modules["model.layers.1.mlp.down_proj"].b.mul_(1e-6)
    out = prune(plan, "drop=1e-4")  # ‖W‖ read from plan.base_path
    assert "model.layers.1.mlp.down_proj" not in out.modules
    assert len(out.modules) == 2 * len(TARGETS) - 1
    row = out.prune_report["modules"]["model.layers.1.mlp.down_proj"]
    assert row["dropped"] == "drop" and row["new_rank"] == 0 and row["delta_over_w"] < 1e-4
    with pytest.raises(EdgepeftError, match="removes every module"):
        prune(plan, "drop=0.99")


@pytest.mark.parametrize("text,needle", [
    ("energy=1.5", "0 < energy <= 1"), ("rank=0", ">= 1"), ("foo=1", "energy=0<E<=1"),
    ("energy=0.9,rank=4", "one of energy/rank/size"), ("size=2XB", "size"), ("", "energy"), ("rank=2,rank=3", "twice"),
])
def test_spec_validation(text, needle):
    from edgepeft.export.prune import PruneSpec

    with pytest.raises(ConfigError, match=needle.replace("*", r"\*").replace("(", r"\(")):
        PruneSpec.parse(text)


def test_spec_parse():
    from edgepeft.export.prune import PruneSpec

    assert PruneSpec.parse("size=2MB").size == 2_000_000
    assert PruneSpec.parse("size=1.5MiB,drop=1e-4") == PruneSpec(size=int(1.5 * 2**20), drop=1e-4)
    assert str(PruneSpec.parse(" energy=0.99 , drop=0.001")) == "energy=0.99,drop=0.001"


def test_merge_auto_picks_lower_loss(tiny_llama, tmp_path):
    from edgepeft.export.adapter import load_adapter
    from edgepeft.export.merge import MERGE_RECORD, choose_merge_target, torch_loss_evaluator

    _, path = make_adapter(tiny_llama, tmp_path / "a")
    base = resolved(tiny_llama)
    plan = load_adapter(path, base)
    pairs = [("Parse this order: Ana wants 2 red mugs.", '{"to":"Oslo","who":"Ana","n":2}'), ("", "hello world")]
    seen = []

    def evaluate(folder):
        seen.append(folder.name)
        return torch_loss_evaluator(pairs)(folder)

    chosen, losses = choose_merge_target(base, [plan], evaluate, keep=tmp_path / "kept")
    assert seen == ["dequantized", "original"] and set(losses) == {"dequantized", "original"}
    assert losses["dequantized"] != losses["original"]
    assert chosen == min(losses, key=losses.get)
    import json

    rec = json.loads((tmp_path / "kept" / MERGE_RECORD).read_text())
    assert rec["target"] == chosen and rec["auto"]["losses"] == losses


def test_load_calibration(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from edgepeft.calib import demo_calibration, load_calibration

    f = tmp_path / "calib.jsonl"
    f.write_text('{"prompt": "Hi", "completion": "Hello"}\n\n{"text": "raw line"}\n')
    assert load_calibration(f) == [("Hi", "Hello"), ("", "raw line")]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rendered = load_calibration(f, tokenizer=tok)
    assert rendered[0][0].endswith("assistant\n") and "Hi" in rendered[0][0] and rendered[1] == ("", "raw line")
    assert len(demo_calibration(tok, n=3)) == 3
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(EdgepeftError, match="line 1 has keys"):
        load_calibration(tmp_path / "bad.jsonl")
    with pytest.raises(EdgepeftError, match="does not exist"):
        load_calibration(tmp_path / "missing.jsonl")


def test_dequantized_refused_for_non_nf4_training(tiny_llama, tmp_path):
    from edgepeft.export.adapter import load_adapter
    from edgepeft.export.merge import choose_merge_target, merged_state_dict

    run = tmp_path / "run"
    _, path = make_adapter(tiny_llama, run / "adapter", target_modules=["q_proj"])
    (run / "manifest.json").write_text('{"quantization": {"bits": 8, "quant_type": "llm.int8"}}')
    base = resolved(tiny_llama)
    plan = load_adapter(path, base)
    with pytest.raises(EdgepeftError, match="8-bit.*--merge-into original"):
        merged_state_dict(base, [plan], "dequantized")
    chosen, losses = choose_merge_target(base, [plan], lambda folder: 1.0)
    assert chosen == "original" and losses == {"original": 1.0}


def test_pad_ranks_keeps_delta(decaying_plan):
    from edgepeft.export.prune import pad_ranks, prune

    pruned = prune(decaying_plan, "energy=0.9")
    padded = pad_ranks(pruned)
    assert set(padded.ranks.values()) == {max(pruned.ranks.values())}
    for t, m in pruned.modules.items():
        assert torch.equal(padded.modules[t].delta(), m.delta())


# --- modules= and --prune auto --------------------------------------------------------------------

def test_prune_modules_keeps_only_those_kinds(decaying_plan):
    from edgepeft.export.prune import module_kind, prune

    out = prune(decaying_plan, "modules=q_proj+v_proj,rank=2")
    assert {module_kind(t) for t in out.modules} == {"q_proj", "v_proj"} and set(out.ranks.values()) == {2}
    rows = out.prune_report["modules"]
    assert all(r["dropped"] == "modules" for t, r in rows.items() if module_kind(t) not in ("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="no qkv_proj"):
        prune(decaying_plan, "modules=qkv_proj")


def test_auto_search_keeps_what_the_score_needs(decaying_plan):
    """With a scorer that loses accuracy without v_proj or below rank 2, auto drops every other kind and
    stops the rank at 2; each candidate and its verdict is in the report."""
    from edgepeft.export.prune import module_kind
    from edgepeft.export.prune_auto import AutoSpec, auto_prune

    def score(p):
        kinds = {module_kind(t) for t in p.modules}
        return 0.9 if "v_proj" not in kinds or min(p.ranks.values()) < 2 else 1.0

    out = auto_prune(decaying_plan, decaying_plan.base_path, AutoSpec(), score=score)
    assert {module_kind(t) for t in out.modules} == {"v_proj"} and set(out.ranks.values()) == {2}
    auto = out.prune_report["auto"]
    assert auto["chosen"] == "rank=2,modules=v_proj" and auto["reference_accuracy"] == 1.0 == auto["accuracy"]
    assert [t["within_tolerance"] for t in auto["trials"] if "rank=" in t["spec"]] == [True, True, False]  # 4, 2; not 1
    assert sum(not t["within_tolerance"] for t in auto["trials"]) == 2  # dropping v_proj, and rank 1


@pytest.mark.parametrize("text,needle", [("auto,tolerance=-1", "0 <= points"), ("auto,foo=1", "tolerance=POINTS"),
                                         ("auto,examples=0", "[1, 10000]"), ("modules=", "q_proj+v_proj")])
def test_prune_auto_spec_refused_on_the_cli(text, needle, tiny_llama, tmp_path, cli):
    proc = cli("export", "--format", "gguf", "--base", tiny_llama, "--adapter", tmp_path / "missing", "--prune", text,
               "--out", tmp_path / "out")
    assert_clean_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_prune_auto_cli_on_tiny_model(tiny_llama, tmp_path, cli):
    """`export --prune auto` through the CLI: calibration completions are the unpruned adapter's own greedy
    output (so it scores 100 %); k_proj/up_proj and B's columns past 2 are made negligible, so the smallest
    adapter within 1 point drops those kinds and stops at rank <= 2, and the GGUF adapter holds exactly that."""
    import json

    from lora_factory import make_lora
    from safetensors.torch import load_file, save_file

    from edgepeft import evaluate
    from edgepeft.calib import load_calibration
    from edgepeft.export.adapter import load_adapter
    from edgepeft.export.merge import merged_in_place
    from edgepeft.keys import EdgepeftKeys
    from edgepeft.security import check_gguf_header

    ad = make_lora(tiny_llama, tmp_path / "ad", seed=5, r=8, b_std=0.5)
    f = ad / "adapter_model.safetensors"
    t = load_file(f)
    for k, v in t.items():
        if "lora_B" in k:
            v[:, 2:] *= 1e-6
            if ".k_proj." in k or ".up_proj." in k:
                v.mul_(1e-6)
    save_file(t, f)
    base = resolved(tiny_llama)
    tok = base.load_tokenizer()
    prompts = [f"Order {i}: {w} lamps to Oslo" for i, w in enumerate(["two", "six", "ten", "nine", "one", "four"])]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": p, "completion": "x"}) + "\n" for p in prompts))
    rendered = [p for p, _ in load_calibration(calib, tokenizer=tok)]
    model = base.load_model(torch.float32).eval()
    with merged_in_place(model, [load_adapter(ad, base)]):
        outs = evaluate.hf_generate_batch(model, tok, 6)(rendered)
    # keep prompts whose completion round-trips through the tokenizer at its own length
    rows = [(p, o) for p, o in zip(prompts, outs) if len(tok(o, add_special_tokens=False)["input_ids"]) == 6]
    assert len(rows) >= 3, outs
    calib.write_text("".join(json.dumps({"prompt": p, "completion": o}) + "\n" for p, o in rows))
    proc = cli("export", "--format", "gguf", "--base", tiny_llama, "--adapter", "ad", "--mode", "separate",
               "--quant", "f32", "--prune", "auto", "--calib", "calib.jsonl", "--no-verify", "--out", "out", "--json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prune auto: ad ->" in proc.stderr
    gguf = next((tmp_path / "out").glob("*.lora.gguf"))
    rep = json.loads(check_gguf_header(gguf).metadata[EdgepeftKeys.PRUNE])
    rep = rep[0] if isinstance(rep, list) else rep
    auto = rep["auto"]
    assert auto["reference_accuracy"] == 1.0 and auto["accuracy"] >= 0.99
    kinds = set(auto["chosen"].partition("modules=")[2].split("+"))
    assert kinds and not kinds & {"k_proj", "up_proj"}, auto
    assert "rank=2" in auto["chosen"] or "rank=1" in auto["chosen"], auto
    tensors = check_gguf_header(gguf).tensors
    assert len(tensors) == 2 * rep["modules_after"]
    assert rep["modules_after"] == 2 * len(kinds)  # 2 layers
