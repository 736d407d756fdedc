"""Activation memory: keep for backward only what backward needs.

Training memory at long rows is mostly activations: tensors the forward pass keeps so that
backward can compute gradients. Autograd keeps them op by op, without knowing what the whole
layer needs. With a frozen base some of them are not needed at all.

Qwen's MLP (every Qwen2/Qwen3 decoder layer) is a SwiGLU:

    m = down(silu(g) * u)      g = gate(x), u = up(x)      g, u: (B, T, I)

Op by op, autograd keeps three (B, T, I) tensors: g for silu's backward, then silu(g) and u for
the product's. The frozen `down` keeps nothing (the gradient of its input needs only its
weight). But silu(g) is one element-wise op away from g, so `SwiGLU` keeps g and u only and
recomputes what it needs in backward:

    ∂m/∂u = grad · silu(g)                           silu(g) = g σ(g)
    ∂m/∂g = grad · u · σ(g) (1 + g (1 − σ(g)))        the derivative of g σ(g)

I is 4864 in Qwen2.5-0.5B (5.4 × hidden): those three tensors are three quarters of what a
decoder layer keeps per token, so this keeps a quarter less activation memory, for one
element-wise op more in backward (silu(g) again, against the layer's seven matrix products).
The same kernels run on the same tensors as autograd's own backward, so the output and the
gradients are the stock ones, bit for bit.

LoRA's dropout (`--dropout`, on the adapter's input only) is the other place: `DroppedProjection`
keeps a 1-byte mask per adapter and the input that q_proj and v_proj share, where autograd keeps a
mask and a dropped copy of the input for each. `LoRALinear` itself stays the plain formula
(layer.py); training gives each of its instances the forward below, which computes the same
`lora_A(lora_dropout(x))` through `DroppedProjection`.

The last resort keeps nothing per layer at all: `enable_activation_checkpointing`
(--grad-checkpointing) recomputes each decoder layer's forward in backward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import LoRALinear

# Transformers' MLP classes whose forward is exactly `down(act(gate(x)) * up(x))`.
SWIGLU_MLPS = {"Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP", "LlamaMLP"}
SILU_MODULES = {"SiLU", "SiLUActivation"}


class SwiGLU(torch.autograd.Function):
    """silu(g) * u for g, u: (..., I), keeping g and u (not silu(g)) for backward."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u  # the ops the stock MLP runs, so the output is identical

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        grad_g = grad_u = None
        if ctx.needs_input_grad[0]:
            # aten's silu backward, the kernel autograd itself would call here:
            # grad · u · σ(g) (1 + g (1 − σ(g))), in fp32 internally for bf16/fp16 inputs.
            grad_g = torch.ops.aten.silu_backward(grad * u, g)
        if ctx.needs_input_grad[1]:
            grad_u = grad * F.silu(g)  # recomputed: the tensor we chose not to keep
        return grad_g, grad_u


def swiglu_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stock MLP forward, with the product done by `SwiGLU`."""
    return mlp.down_proj(SwiGLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    return (
        type(module).__name__ in SWIGLU_MLPS
        and type(getattr(module, "act_fn", None)).__name__ in SILU_MODULES
    )


def keep_less_for_backward(model: nn.Module) -> int:
    """Give every SwiGLU MLP of `model` the forward above, and every plain `LoRALinear` with
    dropout the one below; returns how many modules were changed.

    Only the instances' `forward` changes (as accelerate's hooks do): parameters, state-dict keys
    and outputs stay what they were. Other MLP kinds (another activation, a fused expert block)
    and DoRA layers keep their own forward.
    """
    changed = 0
    for module in model.modules():
        if is_swiglu_mlp(module):
            module.forward = types.MethodType(swiglu_mlp_forward, module)
            changed += 1
        elif type(module) is LoRALinear and isinstance(module.lora_dropout, nn.Dropout):
            module.forward = types.MethodType(lora_forward_keeping_a_mask, module)
            changed += 1
    return changed


class DroppedProjection(torch.autograd.Function):
    """y = dropout(x) Aᵀ for x: (..., in), A: (r, in), keeping x and a 1-byte mask for backward.

    LoRA's dropout acts on the adapter's input only. Op by op, autograd keeps the mask (in x's
    dtype on CPU) and the dropped copy x ⊙ m / (1 − p) that A's gradient needs, and q_proj and
    v_proj, which read the same x, each keep their own. Here each keeps a bool mask, both keep the
    x they share, and the dropped copy is rebuilt in backward:

        grad_A = grad_yᵀ (x ⊙ m / (1 − p))        (r, in), summed over tokens
        grad_x = (grad_y A) ⊙ m / (1 − p)          (..., in)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(x, keep, weight)
        return F.linear(x * keep * ctx.scale, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, keep, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * keep * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).reshape(-1, x.shape[-1])
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ dropped
        return grad_x, grad_weight, None


def dropout_then_project(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """`F.linear(F.dropout(x, p), weight)` in training, through `DroppedProjection`.

    Under autocast, x and A are cast to the autocast dtype as `F.linear` would be, and the
    function runs with autocast off (it chooses its own dtypes).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return DroppedProjection.apply(x, weight, p)


def lora_forward_keeping_a_mask(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """`LoRALinear.forward`, h = base(x) + s · B(A(dropout(x))), with `A(dropout(x))` computed by
    `DroppedProjection` in training (in eval mode, merged or disabled: the layer's own forward)."""
    if not layer.training or layer.merged or layer.disabled:
        return type(layer).forward(layer, x)
    h = layer.base_layer(x)
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(layer.lora_A.weight.dtype)  # as in LoRALinear.forward
    Ax = dropout_then_project(x, layer.lora_A.weight, layer.lora_dropout.p)
    return h + (layer.scaling * layer.lora_B(Ax)).to(h.dtype)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    use_reentrant=False: the re-entrant variant drops gradients of inputs that do not require
    grad, which would leave every LoRA gradient at zero behind a frozen embedding. transformers
    5.x renamed the method (`gradient_checkpointing_enable` is a deprecated alias, gone in v6).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
