"""LoRA+: train B faster than A (Hayou, Ghosh & Yu, 2024, "LoRA+: Efficient Low Rank
Adaptation of Large Models").

The formula
    Plain LoRA gives both factors of `ΔW = (α/r) · B A` one learning rate η. LoRA+ gives them two:

        η_A = η                A: (r, in)
        η_B = λ · η            B: (out, r)      λ = --lora-plus-ratio, e.g. 16

Why
    B starts at zero and A at random values; they play different roles, and their gradients
    scale differently with the model's width n (`∂L/∂B = ∂L/∂h · (A x)ᵀ` is built from the
    r features `A x`, `∂L/∂A = Bᵀ ∂L/∂h · xᵀ` passes through the still small B). The paper's
    analysis of wide networks (n → ∞) finds that one shared η is inefficient: an η stable for
    A leaves B learning too slowly, and efficient feature learning needs `η_B / η_A` to grow
    with the width. In practice a fixed λ ≈ 2⁴ = 16 worked across their models, reported as
    up to about 2× faster fine-tuning and 1–2% better accuracy, at no extra cost.

What changes relative to plain LoRA
    Only the optimizer: two AdamW parameter groups instead of one. The forward pass, the
    adapter file (PEFT loads it like any LoRA adapter), merging and inference are identical.
    The warmup + cosine schedule (`train/schedule.py`) multiplies *each* group's own learning rate
    by the same factor, so `η_B / η_A = λ` holds at every step. The logged `lr` is A's (`--lr`).
    PEFT offers the same grouping as `peft.optimizers.create_loraplus_optimizer`.

Without `--lora-plus-ratio` the optimizer is exactly the plain one: a single group of every
A and B weight at `--lr`, in the order of `inject.lora_parameters`.
"""

from __future__ import annotations

import math

from torch import nn

from .errors import UserError
from .inject import lora_layers, lora_parameters


def optimizer_param_groups(model: nn.Module, lr: float, ratio: float | None = None) -> list[dict]:
    """AdamW parameter groups: one at `lr` (plain LoRA), or A at `lr` and B at `ratio · lr`."""
    check_lora_plus_ratio(ratio)
    params = lora_parameters(model)
    if ratio is None:
        return [{"params": params, "lr": lr}]
    # Every trainable parameter lands in one group. As in PEFT, B and any vector (ndim 1, such as
    # a DoRA magnitude) learn at λη; A, and any other matrix, at η.
    b_weights = {id(m.lora_B.weight) for m in lora_layers(model).values()}
    fast = [p for p in params if id(p) in b_weights or p.ndim == 1]
    slow = [p for p in params if not (id(p) in b_weights or p.ndim == 1)]
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": ratio * lr}]


def check_lora_plus_ratio(ratio) -> None:
    """λ = η_B / η_A must be a positive finite number (1 is plain LoRA in two groups), or None."""
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise UserError(
            f"--lora-plus-ratio must be a number (the paper suggests 16), got {ratio!r}"
        )
    if not (math.isfinite(ratio) and ratio > 0):
        raise UserError(f"--lora-plus-ratio must be positive (the paper suggests 16), got {ratio}")
