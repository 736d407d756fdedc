"""The loss: shifted cross-entropy, computed only where there is something to learn.

The textbook version, three lines (`reference_loss` below; tests check ours equals it):

    logits = model(input_ids).logits                       # (B, T, vocab)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1),   # position t predicts token t+1
                           labels[:, 1:].flatten(), ignore_index=-100)

Everything else in this file computes the same number with far less memory.

Shift, once
    A causal LM's hidden state at position t predicts token t+1. So position t is scored
    against `labels[t + 1]`: we drop the last hidden state (nothing follows it) and the first
    label (nothing predicts it). This is the only place in the project that shifts.

Only supervised positions
    In instruction tuning most positions are prompt (label -100). The model's own loss
    computes logits for *every* position: `[batch, seq, vocab]`, with Qwen's 151,936-token
    vocabulary in fp32 that is 600 KB per token, most of it thrown away. We first gather the
    hidden states whose next token is supervised, `h: (N, hidden)`, and project only those.

Chunked, and never a `(N, vocab)` tensor kept for backward
    `lm_head` is frozen, so the only gradient we need is the one with respect to `h`:

        loss_i  = logsumexp(z_i) - z_i[y_i]              z_i = W h_i,  W: (vocab, hidden)
        ∂loss_i/∂h_i = (softmax(z_i) - onehot(y_i)) W      (hidden,)

    `SupervisedCrossEntropy` computes both in the forward pass, `chunk_size` rows at a time,
    and keeps only `∂loss/∂h` (N × hidden) for backward: peak memory is one chunk of logits,
    and backward costs nothing extra. Logits are upcast to fp32 before the softmax.

Token normalization (exact gradient accumulation)
    The function returns the *sum* of token losses and the token count, not a mean. The
    training loop divides by the number of supervised tokens in the whole accumulation window,
    so every token weighs the same, however the tokens are spread over micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.prompt import IGNORE_INDEX

# Rows per chunk are chosen so one chunk of fp32 logits is about 128 MB (2^25 floats):
# ~220 rows for Qwen's 151,936-token vocabulary.
CHUNK_FLOATS = 2**25
# A head stored narrower than the compute dtype is widened 2^20 floats (4 MB in fp32) at a time.
WIDEN_BLOCK_FLOATS = 2**20


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions, the plain way (for tests)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def auto_chunk_size(vocab_size: int) -> int:
    return max(16, CHUNK_FLOATS // vocab_size)


def shift_for_next_token(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, H), labels (B, T) -> supervised hidden (N, H) and their targets (N,)."""
    hidden = hidden[:, :-1, :]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[keep], targets[keep]


def logsumexp_rows(logits: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """torch.logsumexp over the last dim, a few rows at a time.

    torch.logsumexp allocates two temporaries of its input's size (z - max, then its exp): on
    a whole (chunk, vocab) block they would triple the loss's peak memory.
    """
    return torch.cat([torch.logsumexp(part, dim=-1) for part in logits.split(rows)])


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """z = h Wᵀ + b: (rows, vocab) in h's dtype, for W: (vocab, hidden) in h's or a narrower dtype.

    A narrower W (bf16 storage in an fp32 run, see vocab_storage.py) is widened a block of rows
    at a time into one reused buffer, so no wide copy of the whole matrix ever exists.
    """
    if weight.dtype == h.dtype:
        return F.linear(h, weight, bias)
    logits = h.new_empty(h.shape[0], weight.shape[0])
    for rows, wide in _widened_blocks(weight, h.dtype):
        torch.mm(h, wide.T, out=logits[:, rows])  # straight into the block's columns
    if bias is not None:
        logits += bias.to(h.dtype)
    return logits


def times_head(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """probs W: (rows, hidden) in probs' dtype, W widened a block of rows at a time if narrower."""
    if weight.dtype == probs.dtype:
        return probs @ weight
    out = probs.new_zeros(probs.shape[0], weight.shape[1])
    for rows, wide in _widened_blocks(weight, probs.dtype):
        out.addmm_(probs[:, rows], wide)
    return out


def _widened_blocks(weight: torch.Tensor, dtype: torch.dtype):
    """(rows, weight[rows] in `dtype`) block by block, all written into the same buffer."""
    step = max(1, WIDEN_BLOCK_FLOATS // weight.shape[1])
    buffer = weight.new_empty(min(step, weight.shape[0]), weight.shape[1], dtype=dtype)
    for start in range(0, weight.shape[0], step):
        rows = slice(start, min(start + step, weight.shape[0]))
        wide = buffer[: rows.stop - rows.start]
        yield rows, wide.copy_(weight[rows])


class SupervisedCrossEntropy(torch.autograd.Function):
    """sum_i CE(W h_i, y_i) for a frozen W, with ∂/∂h computed chunk by chunk in forward.

    The products run in the wider of h's and W's dtypes: bf16 for a bf16 run, fp32 for an fp32
    run, also when W is stored in bf16 (vocab_storage.py).
    """

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, chunk_size: int
    ):
        compute = torch.promote_types(h.dtype, weight.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], chunk_size):
            h_chunk = h[start : start + chunk_size].to(compute)
            y = targets[start : start + chunk_size]
            logits = head_logits(h_chunk, weight, bias).float()  # (chunk, vocab), fp32 softmax
            log_z = logsumexp_rows(logits)
            total += (log_z - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad_h is not None:
                probs = logits.sub_(log_z[:, None]).exp_()  # softmax in place, same buffer
                probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                grad_chunk = times_head(probs.to(compute), weight)
                grad_h[start : start + chunk_size] = grad_chunk.to(h.dtype)
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_output.to(grad_h.dtype), None, None, None, None


def supervised_loss_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Linear,
    chunk_size: int | None = None,
):
    """(sum of next-token CE over supervised positions, number of those positions)."""
    h, targets = shift_for_next_token(hidden, labels)
    chunk_size = chunk_size or auto_chunk_size(lm_head.weight.shape[0])
    if lm_head.weight.requires_grad:
        raise ValueError("supervised_loss_sum assumes a frozen lm_head")
    if h.shape[0] == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected (DDP needs every rank to backward)
    # Autocast would otherwise decide matmul dtypes inside; we choose them explicitly.
    with torch.autocast(device_type=h.device.type, enabled=False):
        loss = SupervisedCrossEntropy.apply(h, lm_head.weight, lm_head.bias, targets, chunk_size)
    return loss, int(targets.numel())


def count_supervised(labels: torch.Tensor) -> int:
    """Tokens that will be scored: labels after the shift that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM: forward(batch) -> (loss sum, supervised token count).

    Running the decoder and the loss inside one module's forward lets DistributedDataParallel
    wrap it: DDP only synchronises gradients for work done inside the wrapped forward.
    """

    def __init__(self, model, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, labels):
        decoder = self.model.get_decoder()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return supervised_loss_sum(
            hidden, labels, self.model.get_output_embeddings(), self.chunk_size
        )
