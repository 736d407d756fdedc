"""Device and precision: where the model runs, and in which floating-point format.

    fp32   everything in 32-bit floats (the CPU default).
    bf16   the frozen base stored in bfloat16, the forward pass under autocast. bf16 has fp32's
           exponent range, so gradients neither overflow nor vanish: no loss scaling needed.
    fp16   the same with float16, whose range is narrow: small gradients underflow to zero.
           `GradScaler` multiplies the loss by a large factor before backward and divides the
           gradients by it before the step, skipping steps whose gradients overflowed.

In every mode the LoRA weights and AdamW's state are fp32 (see lora/layer.py): they are what the
optimizer changes, in steps too small for 16-bit floats to represent. Only the frozen base
is stored in 16 bits, which halves the memory its weights take.

Every mode runs on every device. A GPU with bf16/fp16 matrix units is fast in them; a CPU
without such units (most of them) runs them *slower* than fp32, but with half the memory for
the base weights, and through exactly the same code a GPU runs: that is how the test suite
exercises the GPU paths without a GPU. `auto` picks the fast choice: fp32 on a CPU; on a GPU
bf16 when it has native bf16 (Ampere and newer), else fp16.
"""

from __future__ import annotations

import torch

from ..errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU. A requested GPU must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None


def native_bf16(device: torch.device) -> bool:
    """True on a GPU whose matrix units do bf16 (Ampere and newer).

    `torch.cuda.is_bf16_supported()` defaults to `including_emulation=True`, which also answers
    True on a T4 or V100: those *emulate* bf16, several times slower than their fp16 units.
    """
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def fast_half(device: torch.device) -> str:
    """The 16-bit format a GPU runs fastest: bf16 where native, else fp16."""
    return "bf16" if native_bf16(device) else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in: `auto` is fp32 on CPU, the GPU's fast 16-bit format on a GPU.

    An explicit choice is honoured everywhere, even where it is slow (bf16 on a CPU or a T4).
    """
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return fast_half(device) if device.type == "cuda" else "fp32"


def inference_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype for generation: `auto` is fp32 on CPU, as in training on a GPU."""
    if dtype == "auto":
        dtype = fast_half(device) if device.type == "cuda" else "fp32"
    return DTYPES[dtype]


def autocast_for(precision: str, device: torch.device):
    """The forward pass's autocast context (a no-op in fp32).

    Autocast runs matrix products in the 16-bit dtype and keeps reductions (softmax, norms)
    in fp32; the LoRA weights stay fp32 and are cast on the fly (lora/layer.py).
    """
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def grad_scaler_for(precision: str, device: torch.device):
    """A GradScaler for fp16, None otherwise.

    fp16's smallest normal number is 6e-5: many gradients of a 16-bit backward fall below it
    and become zero. Scaling the loss (by 2^16 at first) lifts them into range; the scaler
    unscales before the update and lowers its factor whenever the gradients overflow. bf16
    has fp32's range, so it needs none. The scaler works on the device the run uses.
    """
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def out_of_memory_advice(cfg) -> str:
    """What to change when the GPU runs out of memory, with the values in use."""
    return (
        f"out of GPU memory. Try a smaller --batch-size (now {cfg.batch_size}) with a larger "
        f"--grad-accum (now {cfg.grad_accum}; the effective batch stays the same), "
        f"--grad-checkpointing, --quantize nf4, or a smaller --max-len (now {cfg.max_len})."
    )
