"""Batches that waste no compute: length-grouped order and padding to the batch's longest row.

Padding every sample to a fixed 512 tokens (as many tutorials do) makes a batch of 80-token
questions cost as much as one of 512-token ones. Instead:

1. Dynamic padding: a batch is padded only to its own longest row (rounded up to a multiple
   of 8 on GPU, which tensor cores like).
2. Length grouping: shuffle all rows, cut the shuffled order into "mega-batches" of
   `50 × batch` rows, sort each by length, and cut it into batches. Rows of a batch then have
   similar lengths (little padding), while batch order stays random. The longest batch goes
   first, so an out-of-memory error shows up in the first step rather than after an hour.

Everything is deterministic given (seed, epoch), which is what makes resuming exact.
Padding is on the right; positions after a row's end are masked in attention and in the loss.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .prompt import IGNORE_INDEX

MEGA_BATCH_FACTOR = 50


def plan_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int = 0, group_by_length: bool = True
) -> list[list[int]]:
    """Row indices of every batch of one epoch, in training order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * MEGA_BATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def collate(examples, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad rows (`.input_ids`, `.labels`: lists or numpy arrays) to the batch's longest."""
    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.as_tensor(np.asarray(e.input_ids, dtype=np.int64))
        labels[row, :n] = torch.as_tensor(np.asarray(e.labels, dtype=np.int64))
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padding_ratio(batches: list[list[int]], lengths: list[int], pad_to: int | None = None) -> float:
    """Fraction of batch positions that are padding (pad_to: a fixed width, as tutorials do)."""
    total = real = 0
    for batch in batches:
        width = pad_to or max(lengths[i] for i in batch)
        total += width * len(batch)
        real += sum(min(lengths[i], width) for i in batch)
    return 1 - real / max(total, 1)


def global_batches(
    lengths, batch_size: int, seed: int, epoch: int, group_by_length=True, world_size=1
):
    """The epoch's global batches (`batch_size` rows per process, all processes together).

    Under torchrun a batch too small to give every process a row is dropped.
    """
    batches = plan_batches(lengths, batch_size * world_size, seed, epoch, group_by_length)
    return [b for b in batches if len(b) >= world_size]


def training_windows(plan_epoch, grad_accum: int, epoch: int = 0, batch: int = 0):
    """Yield `(epoch, next batch, window)` forever: one window = one optimizer step's batches.

    `plan_epoch(e)` gives epoch e's batches. Starting at (`epoch`, `batch`) is how a resumed run
    continues mid-epoch with exactly the batches the interrupted run would have seen; the
    `next batch` yielded with each window is the position to resume from after it.
    """
    while True:
        batches = plan_epoch(epoch)
        for start in range(batch, len(batches), grad_accum):
            window = batches[start : start + grad_accum]
            yield epoch, start + len(window), window
        epoch, batch = epoch + 1, 0
