"""`LoRALinear`: a frozen linear layer plus a trainable low-rank update.

The idea (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
-------------------------------------------------------------------------------
Fine-tuning changes a pretrained weight `W0: (out, in)` into `W0 + ΔW`. LoRA bets that the useful
`ΔW` has low rank, and writes it as the product of two thin matrices:

    ΔW = (α / r) · B A          A: (r, in)    B: (out, r)    r ≪ min(in, out)

so a layer computes, for an input `x: (..., in)`,

    h = W0 x + b  +  (α / r) · B (A x)          h: (..., out)

`W0` and `b` stay frozen. Only `A` and `B` train: `r · (in + out)` numbers instead of
`in · out` (for Qwen2.5-0.5B's q_proj, 896×896, r = 8: 14,336 instead of 802,816).

Why B starts at zero
    With `B = 0`, `ΔW = 0`, so right after injection the model computes exactly what the
    pretrained model computed: training starts from the base model, not from a random
    perturbation of it. `A` must then *not* be zero, or the gradient of `B` (which is
    `∂L/∂h · (A x)ᵀ`) would be zero too and nothing would ever move. `A` gets the same
    kaiming-uniform init (a = √5) that `nn.Linear` uses, as in the reference implementation.

What α / r does
    `scaling = α / r` multiplies the update. Keeping α fixed while changing r keeps the size of
    the initial updates roughly constant, so a learning rate tuned at one rank still works at
    another. rsLoRA (Kalajdzievski, 2023) argues the stable choice is `α / √r`
    (`use_rslora=True`), which matters at large ranks.

Precision
    The frozen base may be bf16/fp16 to save memory; `A` and `B` are always fp32, because
    they are what the optimizer updates (AdamW's tiny steps vanish in bf16, and `GradScaler`
    refuses fp16 parameters). They are *master weights*: how the adapter path computes
    depends on whether autocast is on.
      - Training in bf16/fp16 runs under autocast, which casts A and B to the 16-bit dtype for
        the matrix products (their gradients still arrive in fp32, on the fp32 weights). The
        input `x` is already 16-bit, so it goes in as it is: casting it to fp32 first would
        make an fp32 copy of the activation that autocast then casts straight back.
      - Without autocast (fp32 training, generation with a 16-bit base), the adapter path
        runs in fp32: the input is cast up, the result cast back to the base output's dtype.

Merging
    For inference, `W0 + (α/r)·BA` can be folded into one matrix (`merge()`), so the adapter
    costs nothing at generation time. `unmerge()` subtracts it again. Both are explicit,
    idempotent (a `merged` flag), and computed in fp32 before casting to the base dtype.
    Switching to `.eval()` never merges: hidden state changes make bugs.
    In fp32 merging is exact up to float rounding. Into a bf16/fp16 base it is not: ΔW is
    typically 100-1000× smaller than W0, and bf16 keeps only ~3 significant digits of each
    sum `W0 + ΔW`, so much of ΔW is rounded away. `merge()` returns the fraction of ΔW lost,
    ‖W_merged − (W0 + ΔW)‖ / ‖ΔW‖, so callers can say how much.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError
from .quantize import is_quantized
from .spec import DEFAULT_ALPHA, DEFAULT_RANK


class LoRALinear(nn.Module):
    """`h = base(x) + (α/r) · lora_B(lora_A(dropout(x)))` around a frozen `nn.Linear`.

    Submodule names (`base_layer`, `lora_A`, `lora_B`) follow PEFT, so the adapter's state-dict
    keys (`...q_proj.lora_A.weight`, shape `(r, in)`; `...q_proj.lora_B.weight`, shape
    `(out, r)`) are the ones PEFT reads and writes.

    The base may be a quantized layer (QLoRA, see quantize.py): bitsandbytes' `Linear4bit` and
    `Linear8bitLt` subclass `nn.Linear`, and their forward dequantizes the frozen weight block
    by block before the matmul, so `base(x)` above is unchanged and `A`, `B` stay fp32 on top.
    Only merging differs: it is refused, since ΔW cannot be added into 4-bit or 8-bit weights.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = DEFAULT_RANK,
        alpha: float = DEFAULT_ALPHA,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        check_lora_hyperparameters(r, alpha, dropout)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)

        device = base_layer.weight.device
        # Adapters live in fp32 whatever the base dtype is (see the module docstring).
        self.lora_A = nn.Linear(
            base_layer.in_features, self.r, bias=False, device=device, dtype=torch.float32
        )
        self.lora_B = nn.Linear(
            self.r, base_layer.out_features, bias=False, device=device, dtype=torch.float32
        )
        # Dropout on the adapter's input only: the frozen path sees the clean x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # True: behave exactly like the base layer (for before/after views)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `proj.weight` (dtype checks, tied-weight logic) keeps working.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: A and B (DoRA adds its magnitude vector)."""
        return [self.lora_A.weight, self.lora_B.weight]

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=√5), as nn.Linear; B = 0, so ΔW = BA = 0 at the start."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + b + scaling · B(A(dropout(x)))   for x: (..., in) -> h: (..., out)."""
        h = self.base_layer(x)  # W0 x + b, in the base's dtype
        if self.merged or self.disabled:
            return h  # merged: ΔW is already inside W0
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # under autocast, A and B come to x's dtype
        Ax = self.lora_A(self.lora_dropout(x))  # (..., r): x squeezed through the bottleneck
        BAx = self.lora_B(Ax)  # (..., out)
        return h + (self.scaling * BAx).to(h.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B A, shape (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> float:
        """Fold ΔW into the base weight: W ← W0 + ΔW. A second call does nothing.

        The sum is computed in fp32 and rounded once into the base dtype. Returns the fraction
        of ΔW that rounding lost (0 for an fp32 base, up to 1 for a tiny ΔW in bf16).
        """
        if self.merged:
            return 0.0
        if is_quantized(self.base_layer):
            raise UserError(
                "cannot merge LoRA into a quantized (4-bit/8-bit) base weight: the sum would be "
                "rounded back to the quantized grid, losing most of the adapter; merge into the "
                "original checkpoint instead (load the base without --quantize)"
            )
        weight = self.base_layer.weight
        exact = self.merged_weight()
        size = float((exact - weight.float()).norm())  # ‖ΔW‖, the change merging must carry
        weight.copy_(exact.to(weight.dtype))
        self.merged = True
        return float((weight.float() - exact).norm()) / size if size > 0 else 0.0

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ΔW back out: W ← W - ΔW. Exact up to rounding in the base dtype."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(self.unmerged_weight().to(weight.dtype))
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW in fp32, shape (out, in): what `merge` writes into the base weight."""
        return self.base_layer.weight.float() + self.delta_weight()

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """W − ΔW in fp32 from the merged weight W: what `unmerge` writes back."""
        return self.base_layer.weight.float() - self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, merged={self.merged}"


def check_lora_hyperparameters(r, alpha, dropout) -> None:
    """Reject values that make LoRA meaningless, with a message that names the value."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise UserError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
