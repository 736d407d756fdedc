"""What a LoRA setup is, before any tensor exists: where the adapters go and their shape.

    targets   which linear layers get an adapter ("q_proj,v_proj", a list, or "all-linear")
    r         the rank: A is (r, in), B is (out, r)
    alpha     the scale: ΔW = (α / r) · B A   (α / √r with use_rslora)
    dropout   on the adapter's input only; the frozen path sees the clean x
    use_dora  DoRA layers (dora.py) instead of plain LoRA ones

The defaults here are LoRA's own, and every other default starts from them (train.py's
--targets, --rank, --alpha, --dropout; `apply_lora()` with no spec). This file imports nothing
heavy, so the command lines can show them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TARGETS = ("q_proj", "v_proj")  # the LoRA paper's choice: attention queries and values
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0  # scaling α/r = 2
DEFAULT_DROPOUT = 0.05
QUANTIZE_CHOICES = ("none", "nf4", "int8")  # the frozen base: as stored, 4-bit NF4, 8-bit (QLoRA)


@dataclass(frozen=True)
class LoRASpec:
    """Everything `apply_lora` (inject.py) needs to put adapters into a model."""

    targets: str | tuple[str, ...] | list[str] = DEFAULT_TARGETS
    r: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    dropout: float = DEFAULT_DROPOUT
    use_rslora: bool = False
    use_dora: bool = False
