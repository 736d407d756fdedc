"""Length-grouped batches with dynamic padding: deterministic, complete, and little padding."""

import random

import torch

from lora.data.batching import (
    collate,
    global_batches,
    padding_ratio,
    plan_batches,
    training_windows,
)
from lora.data.prompt import IGNORE_INDEX, Encoded
from lora.train.distributed import DistInfo, shard_rows


def lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 600) for _ in range(n)]


def test_plan_covers_every_row_once_and_is_deterministic_by_seed_and_epoch():
    ls = lengths()
    plan = plan_batches(ls, 8, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(ls)))
    assert plan == plan_batches(ls, 8, seed=1, epoch=0)
    assert plan != plan_batches(ls, 8, seed=1, epoch=1) and plan != plan_batches(
        ls, 8, seed=2, epoch=0
    )


def test_longest_batch_comes_first():
    ls = lengths()
    plan = plan_batches(ls, 8, seed=0)
    assert max(ls[i] for i in plan[0]) == max(ls)


def test_length_grouping_pads_far_less_than_random_batches_or_max_len():
    ls = lengths()
    grouped = padding_ratio(plan_batches(ls, 8, 0), ls)
    shuffled = padding_ratio(plan_batches(ls, 8, 0, group_by_length=False), ls)
    fixed = padding_ratio(plan_batches(ls, 8, 0), ls, pad_to=1024)
    assert grouped < 0.05 < shuffled < fixed


def test_collate_pads_right_and_masks_padding_by_position():
    a = Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Encoded([5, 9, 9, 9, 2], [IGNORE_INDEX, IGNORE_INDEX, 9, 9, 2])
    batch = collate([a, b], pad_id=2, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 2, 2, 2, 2, 2]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    # pad id 2 is also row b's real end token: only the position decides what is masked.
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 5
    assert batch["labels"][1, 4] == 2 and batch["attention_mask"][1, 4] == 1
    assert batch["input_ids"].dtype == torch.long


def test_collate_takes_rows_of_a_memory_mapped_tokenized_set(tmp_path):
    import numpy as np

    from lora.data.tokenized import TokenizedSet

    ids = [np.array([5, 6, 7], np.int32), np.array([5, 9], np.int32)]
    labels = [np.array([IGNORE_INDEX, 6, 7], np.int32), np.array([IGNORE_INDEX, 9], np.int32)]
    TokenizedSet.build(ids, labels, [[3, 2]]).save(tmp_path, "t")
    ds = TokenizedSet.load(tmp_path, "t")
    batch = collate([ds[1], ds[0]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 9, 0], [5, 6, 7]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 9, IGNORE_INDEX], [IGNORE_INDEX, 6, 7]]
    assert batch["labels"].dtype == torch.long


def test_under_torchrun_only_a_batch_smaller_than_the_world_is_dropped_and_every_rank_gets_rows():
    ls = lengths(n=9)
    batches = global_batches(ls, 2, seed=0, epoch=0, world_size=4)  # 2 rows per process x 4
    assert sum(len(b) for b in batches) == 8  # the 1-row batch cannot feed 4 processes
    kept = global_batches(ls, 3, seed=0, epoch=0, world_size=2)
    assert sum(len(b) for b in kept) == 9  # a 3-row batch still feeds 2 processes
    for batch in kept:
        slices = [shard_rows(batch, DistInfo(rank=r, world_size=2)) for r in range(2)]
        assert all(slices) and sorted(i for s in slices for i in s) == sorted(batch)


def test_training_windows_resume_mid_epoch_with_the_same_windows():
    plans = {e: plan_batches(lengths(n=10), 2, seed=0, epoch=e) for e in range(3)}
    straight = training_windows(plans.__getitem__, grad_accum=2)
    first = [next(straight) for _ in range(5)]  # 5 batches per epoch: windows of 2, 2, 1
    assert [(e, nxt, len(w)) for e, nxt, w in first] == [
        (0, 2, 2),
        (0, 4, 2),
        (0, 5, 1),
        (1, 2, 2),
        (1, 4, 2),
    ]
    epoch, next_batch, _ = first[2]
    resumed = training_windows(plans.__getitem__, 2, epoch, next_batch)
    assert [next(resumed) for _ in range(2)] == first[3:]
