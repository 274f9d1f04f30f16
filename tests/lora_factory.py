"""The one way tests make a PEFT LoRA adapter on a (tiny or real) base.

LoRA B is random and non-zero: with PEFT's default B = 0 every parity test would pass trivially.
Seeded through torch's global RNG, so the same call gives the same adapter.
"""

from __future__ import annotations

from pathlib import Path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora(base_dir: Path, out: Path, *, seed: int = 1, r: int = 8, alpha: float | None = None,
              targets=ALL_LINEAR, b_std: float | None = None, return_model: bool = False, **lora_kwargs):
    """Save a LoRA adapter for ``base_dir`` at ``out`` and return ``out`` (or ``(peft_model, out)``).

    ``alpha`` defaults to 2·r. ``b_std`` redraws B (and embedding A) from N(0, b_std²); otherwise
    PEFT's ``init_lora_weights=False`` init is kept. Other keywords go to ``LoraConfig``
    (``use_rslora``, ``alpha_pattern``, ``use_dora``, ``modules_to_save`` ...).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, target_modules=list(targets),
                     lora_dropout=0.0, init_lora_weights=False, **lora_kwargs)
    torch.manual_seed(seed)
    pm = get_peft_model(model, cfg)
    if b_std is not None:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name or "lora_embedding_A" in name:
                    p.normal_(0, b_std)
    pm.save_pretrained(out)
    pm.eval()
    return (pm, out) if return_model else out
