"""Device and precision: where the model runs, and in which floating-point format.

    fp32   everything in 32-bit floats (the CPU default).
    bf16   the frozen base stored in bfloat16, the forward pass under autocast. bf16 has fp32's
           exponent range, so gradients neither overflow nor vanish: no loss scaling needed.
    fp16   the same with float16, whose range is narrow: small gradients underflow to zero.
           `GradScaler` multiplies the loss by a large factor before backward and divides the
           gradients by it before the step, skipping steps whose gradients overflowed.

In every mode the LoRA weights and AdamW's state are fp32 (see layer.py): they are what the
optimizer changes, in steps too small for 16-bit floats to represent.
"""

from __future__ import annotations

import torch

from .errors import UserError

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


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in: `auto` is bf16 (fp16 on older GPUs) on a GPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise UserError(
                f"--precision {precision} needs a CUDA GPU, and none is available; use --precision fp32 (or auto)"
            )
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use fp16")
    return precision


def inference_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype for generation: `auto` is bf16 on a GPU that has it, else fp32."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return DTYPES[dtype]


def autocast_for(precision: str, device: torch.device):
    """The forward pass's autocast context (a no-op in fp32)."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def grad_scaler_for(precision: str, device: torch.device):
    """A GradScaler for fp16, None otherwise (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
