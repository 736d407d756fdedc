"""DoRA: LoRA that learns a weight's length and direction apart (Liu et al., 2024, "DoRA:
Weight-Decomposed Low-Rank Adaptation").

The formula
    Write each output row of a weight as a length times a unit direction. DoRA keeps the
    direction's update low-rank, as LoRA does, but gives every row a free, trainable length:

        W' = m · (W0 + s·B A) / ‖W0 + s·B A‖_c          W0, W': (out, in)    m: (out,)

    `‖·‖_c` is the norm of each output row (over the `in` inputs: `vector_norm(·, dim=1)`, as
    PEFT computes it; the paper calls it the column norm of `Wᵀ`), so `m / ‖·‖_c` is one factor
    per output feature. For an input `x: (..., in)` the layer computes

        h = (m / ‖W0 + s·BA‖_c) ⊙ (W0 x + s·B A x) + b

    The bias `b` is not rescaled (as in PEFT). `m` starts at `‖W0‖_c`, and `B` at zero, so
    `W' = W0` before the first step: training starts from the base model exactly, as in LoRA.

The norm is detached
    `‖W0 + s·BA‖_c` is treated as a constant in backpropagation (the paper's §4.3): its value
    follows `B` and `A`, but no gradient flows through it. That saves the memory of a graph
    through an (out, in) matrix, and the paper found no loss of accuracy. It is computed in
    fp32 from the dequantized base weight (a bf16 or NF4 base alike), under `no_grad`.

What it changes relative to plain LoRA
    One more trainable vector per layer (`m`, `out` numbers: `lora_magnitude_vector` in PEFT's
    files, with `use_dora: true` in adapter_config.json), and a per-row rescaling of the output.
    Plain LoRA can only change a row's length and direction together, through the same `BA`;
    the paper finds that full fine-tuning moves them nearly independently, and DoRA can. The
    cost: every forward forms `W0 + s·BA` (out × in) to take its norms, which plain LoRA never
    does. Merging folds `W'` into the base weight, so generation after `merge()` costs nothing.

How the output is computed
    As PEFT does, from the base output `h0 = W0 x + b` that the frozen layer computes anyway:

        h = h0 + (m/n − 1) ⊙ (W0 x) + (m/n) ⊙ s·B A x        n = ‖W0 + s·BA‖_c

    With adapter dropout in training, `x` in the two added terms is the dropped-out input.

Merging
    `merge()` writes `W'` into the base weight, in fp32, and keeps `n` (which depends on `W0`,
    lost once merged), so `unmerge()` can recover `W0 = W' · n / m − s·BA`. Both are exact up
    to fp32 rounding. As for LoRA, a quantized base is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .layer import LoRALinear
from .quantize import dequantized_weight, is_quantized

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for m, in memory and in adapter files


class DoRALinear(LoRALinear):
    """`LoRALinear` plus a trainable magnitude `m: (out,)` per output row (see module docstring)."""

    def __init__(self, base_layer: nn.Linear, *args, **kwargs):
        super().__init__(base_layer, *args, **kwargs)
        if is_quantized(base_layer):
            keep_4bit_layout(base_layer)
        # fp32 like A and B: a master weight the optimizer updates, whatever the base dtype.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self._norm_at_merge: torch.Tensor | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), self.lora_magnitude_vector]

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·BA‖_c, one fp32 norm per output row, shape (out,); no gradient (§4.3)."""
        with torch.autocast(self.lora_A.weight.device.type, enabled=False):
            weight = dequantized_weight(self.base_layer) + self.delta_weight()
        return torch.linalg.vector_norm(weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = (m/n) ⊙ (W0 x + s·B A x) + b   for x: (..., in) -> h: (..., out)."""
        h = self.base_layer(x)  # W0 x + b, in the base's dtype
        if self.merged or self.disabled:
            return h
        x_in = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        dropped = self.lora_dropout(x_in)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = h  # W0 x + b, already computed
        else:  # W0 applied to the same dropped-out input as the adapter (as PEFT does)
            base = self.base_layer(dropped.to(x.dtype))
        if self.base_layer.bias is not None:
            base = base - self.base_layer.bias  # the bias is added once, unscaled
        factor = self.lora_magnitude_vector / self.weight_norm()  # m / n: (out,)
        update = self.scaling * self.lora_B(self.lora_A(dropped))
        return h + ((factor - 1) * base + factor * update).to(h.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = (m/n) · (W0 + s·BA), fp32; remembers n for `unmerged_weight`."""
        weight = dequantized_weight(self.base_layer) + self.delta_weight()
        self._norm_at_merge = torch.linalg.vector_norm(weight, dim=1)
        return (self.lora_magnitude_vector / self._norm_at_merge)[:, None] * weight

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """W0 = W' · (n/m) − s·BA, fp32, with the n that `merged_weight` used."""
        factor = self._norm_at_merge / self.lora_magnitude_vector
        return self.base_layer.weight.float() * factor[:, None] - self.delta_weight()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def keep_4bit_layout(layer: nn.Linear) -> None:
    """Keep a bitsandbytes 4-bit weight in the layout it was quantized in, so that the norm can
    dequantize it at every step. On CPUs with AVX512-BF16, bitsandbytes otherwise repacks the
    weight (and rounds its block scales to bf16) at the first forward in eval mode, for a faster
    inference kernel; `dequantize_4bit` cannot read that layout."""
    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise UserError(
            "this 4-bit layer was already repacked for bitsandbytes' CPU inference kernel: "
            "add DoRA before running the quantized model in eval mode"
        )
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
