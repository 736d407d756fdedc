"""Learning rate: linear warmup, then cosine decay to zero.

Warmup matters for LoRA too: B starts at zero and AdamW's first steps are full-size whatever
the gradient's scale, so a few steps of rising learning rate avoid an early jolt. Cosine decay
then lets the last updates settle. `--warmup` is a step count (>= 1) or a fraction of the total
(< 1); a fraction above zero gives at least one warmup step, however short the run.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from ..errors import UserError


def warmup_steps(warmup: float, total_steps: int) -> int:
    """How many of `total_steps` warm up: `warmup` itself when >= 1, else that fraction of the run.

    A fraction above zero gives at least one step: 0.03 of a 12-step run is 0.36 steps, and
    rounding it to 0 would silently drop the warmup that was asked for.
    """
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if warmup >= 1:
        return int(warmup)
    return max(1, int(round(warmup * total_steps))) if warmup > 0 else 0


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine(optimizer, warmup: int, total: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
