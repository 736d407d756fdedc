"""The two vocabulary-sized matrices keep the checkpoint's 16-bit storage in an fp32 run.

An fp32 run of a bf16 checkpoint (the CPU default) converts every weight to fp32 at load. For
the frozen weights that conversion adds no information: bf16 → fp32 is exact, and the weights
never change. What an fp32 run needs is fp32 *arithmetic*, so fp32 operands at the moment of
use, not fp32 storage.

The input embedding E and the output head W are each (vocab, hidden) = (151,936, 896) in
Qwen2.5-0.5B, 136M parameters each, and neither is used as a whole matrix per token:

    embedding:  x = E[ids].float()                  only the looked-up rows are widened
    head:       z = h W[v0:v1].float()ᵀ             a block of rows at a time (loss.py)

Kept in bf16 they take 2 bytes per element instead of 4: 260 MB less for a tied E = W, 520 MB
for an untied head. Same values, same fp32 arithmetic: the loss equals the fp32-stored run's,
and the LoRA gradients differ only by fp32 rounding (∂loss/∂h sums the head's blocks in another
order). The price is widening the head twice per loss chunk (logits, then ∂loss/∂h): on the
0.5B at 256 tokens, torch.profiler counts ~0.1 s of copies per ~2.6 s micro-batch.

The decoder's linear layers stay fp32. Each is a full matrix product for every token, and
widening its weight on every use costs time: ~1 ms for a (4864, 896) matrix on 2 cores,
against ~13 ms for its product with 256 tokens.

Only where nothing is lost: the matrices are narrowed when the checkpoint's dtype is 16-bit and
the narrowing round-trips exactly (a config that names bf16 for fp32 files changes nothing).
Not under --shard fsdp, whose all-gather groups want one dtype per group.
"""

from __future__ import annotations

import types

import torch
from torch import nn

NARROW_DTYPES = (torch.bfloat16, torch.float16)
CHECK_ROWS = 4096


def narrow_exactly(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`weight` in `dtype` if that loses nothing, else None.

    Checked a block of rows at a time: a whole round-tripped copy would be as large as the
    memory this saves.
    """
    narrow = weight.to(dtype)
    for rows in range(0, weight.shape[0], CHECK_ROWS):
        block = slice(rows, rows + CHECK_ROWS)
        if not torch.equal(narrow[block].to(weight.dtype), weight[block]):
            return None
    return narrow


def widened_embedding_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """The embedding's rows for `input_ids` (..., hidden), widened to fp32."""
    return type(self).forward(self, input_ids).float()


def widened_head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., vocab) for `hidden`, in its dtype: the model's own forward, for callers of
    `model(ids).logits`. Training never calls it (loss.py widens the head a block at a time)."""
    bias = None if self.bias is None else self.bias.to(hidden.dtype)
    return nn.functional.linear(hidden, self.weight.to(hidden.dtype), bias)


def keep_vocab_matrices_narrow(model: nn.Module, stored: torch.dtype) -> int:
    """Store the frozen embedding and head of an fp32 `model` in `stored`; returns bytes saved.

    Tied weights (one Parameter for both) are narrowed once. A matrix that trains, or does not
    round-trip exactly, stays as it is.
    """
    if stored not in NARROW_DTYPES:
        return 0
    saved, narrowed = 0, set()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    for module in (embedding, head):
        weight = getattr(module, "weight", None)
        if weight is None or weight.requires_grad or weight.dtype != torch.float32:
            continue
        narrow = narrow_exactly(weight.data, stored)
        if narrow is None:
            continue
        saved += weight.numel() * (weight.element_size() - narrow.element_size())
        weight.data = narrow
        narrowed.add(id(weight))
    if id(getattr(embedding, "weight", None)) in narrowed:
        embedding.forward = types.MethodType(widened_embedding_forward, embedding)
    if isinstance(head, nn.Linear) and id(head.weight) in narrowed:
        head.forward = types.MethodType(widened_head_forward, head)
    return saved
