"""QLoRA: LoRA adapters on a frozen base stored in 4-bit NormalFloat (NF4) or 8-bit integers.

Why (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs")
-----------------------------------------------------------------------------
LoRA freezes the base, so the base only has to be *read*: it never needs the precision an
optimizer step would. QLoRA stores it in 4 bits per weight instead of 16, so a 7B model's
decoder weights take ~3.4 GB instead of ~13 GB, and trains full-precision adapters on top.

NF4, the 4-bit NormalFloat
    Pretrained weights are roughly normally distributed around zero. NF4's 16 code values are
    the quantiles of a standard normal distribution, rescaled to [-1, 1] (with an exact 0), so
    each of the 16 bins holds about the same share of weights: no code value is wasted on
    ranges where weights are rare. A weight matrix is cut into blocks of 64 consecutive
    values; each block stores one absmax scale `s = max |w|` and, per weight, the 4-bit index
    of the code value nearest to `w / s`. Dequantizing is a table look-up times `s`.

Double quantization
    One fp32 scale per 64 weights costs 32/64 = 0.5 bit per weight. QLoRA quantizes those
    scales too: to 8 bits, in blocks of 256 scales with one fp32 scale each, which brings the
    overhead to 8/64 + 32/(64·256) ≈ 0.127 bit per weight: ~4.13 bits per weight in all.

Int8 (LLM.int8(), Dettmers et al., 2022)
    One int8 per weight and one absmax scale per output row: half of bf16, less loss of
    precision than NF4, twice its memory.

Why the adapters stay in full precision
    `A` and `B` are what the optimizer changes, in steps far too small for 4 bits (or even
    bf16) to hold. They are small (well under 1% of the parameters), so keeping them, their
    gradients and AdamW's state in fp32 costs little. The quantization error of the base is
    frozen and the adapters train *around* it: an adapter is fitted to the quantized base.

What it costs
    Every forward (and every backward, for the input gradient) dequantizes each weight block
    to the compute dtype before the matmul: memory is saved, time is spent. Merging is not
    possible without changing the model: `W0 + ΔW` rounded back into NF4 loses most of ΔW,
    which is far smaller than one NF4 step. So `LoRALinear.merge` refuses a quantized base,
    and export merges into the original bf16/fp32 checkpoint instead.

What stays unquantized
    Only the decoder's linear layers are quantized (bitsandbytes' `Linear4bit` and
    `Linear8bitLt` subclass `nn.Linear`, so `LoRALinear` wraps them as it wraps any linear).
    Embeddings, norms and `lm_head` keep the run's dtype, as in the paper.

bitsandbytes is optional (`pip install 'bitsandbytes>=0.48' accelerate`) and imported only
when `--quantize` is used; from 0.48 on its 4-bit and 8-bit layers also run on CPU.
"""

from __future__ import annotations

import importlib.metadata
import logging

import torch
from torch import nn

from .errors import UserError
from .spec import QUANTIZE_CHOICES

MIN_BITSANDBYTES = (0, 48)
INSTALL_HINT = "pip install 'bitsandbytes>=0.48' accelerate"


def check_quantize(kind: str) -> str:
    """`kind` itself if it is one of QUANTIZE_CHOICES, else a UserError that lists them."""
    if kind not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {kind!r}")
    return kind


def require_bitsandbytes() -> None:
    """Fail in one line, saying what to install, when bitsandbytes (or accelerate) is missing."""
    for package in ("bitsandbytes", "accelerate"):
        try:
            importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(
                f"--quantize needs {package}, which is not installed: {INSTALL_HINT}"
            ) from None
    version = importlib.metadata.version("bitsandbytes")
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_BITSANDBYTES:
        raise UserError(
            f"--quantize needs bitsandbytes >= 0.48 (found {version}), the first with CPU "
            f"support for 4-bit and 8-bit layers: {INSTALL_HINT}"
        )
    # The int8 matmul rounds fp32 inputs to fp16 (by design) and logs it at every call.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_the_int8_cast_note)


def _not_the_int8_cast_note(record: logging.LogRecord) -> bool:
    return "inputs will be cast" not in record.getMessage()


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for `kind` (None for "none"): the recipe of the paper,
    NF4 with double quantization, dequantizing to `compute_dtype` for each matmul."""
    if check_quantize(kind) == "none":
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (checked without importing it)."""
    return type(layer).__module__.startswith("bitsandbytes") and isinstance(layer, nn.Linear)


def dequantized_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight `(out, in)` a quantized layer really multiplies by, in fp32 (a copy).

    NF4: code value of each 4-bit index × its block's absmax. Int8: int8 × row scale / 127.
    """
    if not is_quantized(layer):
        return layer.weight.detach().float().clone()
    import bitsandbytes.functional as F

    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    # The row scales move from the weight to the layer's state at its first forward.
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return weight.data.float() * scale.float()[:, None] / 127


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters, buffers, and the quantization constants
    (NF4 block scales, their own scales under double quantization; int8 row scales)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for p in model.parameters():
        total += sum(t.numel() * t.element_size() for t in _quantization_constants(p))
    return total


def _quantization_constants(p: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(p, "quant_state", None)
    if state is not None:
        nested = [state.state2.absmax, state.state2.code] if state.nested else []
        return [state.absmax, state.code, *nested]
    scale = getattr(p, "SCB", None)
    return [scale] if isinstance(scale, torch.Tensor) else []


def stored_numel(p: torch.Tensor) -> int:
    """How many weights `p` stands for: NF4 packs two 4-bit weights into each uint8 it stores."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()
