"""The training set: read the files, hold out validation rows, tokenize, and say what happened.

    read_dataset (data.py)      file -> conversations, bad rows counted
    split                       --val-data, or --val-size rows held out by --seed
    encode_sample (prompt.py)   conversation -> input_ids + labels, truncated to --max-len
    summary                     token lengths, supervised tokens, truncations, padding

The summary is printed before training and stored in `train_args.json`, so a user sees what
the model will learn from before spending an hour on it.
"""

from __future__ import annotations

import random

from .batching import padding_ratio, plan_batches
from .data import read_dataset
from .errors import UserError
from .prompt import encode_sample


def prepare_data(cfg, tokenizer, fmt, log):
    """Read, split, tokenize; print what happened. Returns (train, val, summary dict)."""
    samples, report = read_dataset(cfg.data, cfg.columns, cfg.strict, cfg.dedup, cfg.encoding)
    for line in report.lines():
        log(line)
    val_samples = []
    summary = {"train_file": report.to_dict()}
    if cfg.val_data:
        val_samples, val_report = read_dataset(
            cfg.val_data, cfg.columns, cfg.strict, cfg.dedup, cfg.encoding
        )
        for line in val_report.lines():
            log(line)
        summary["val_file"] = val_report.to_dict()
    elif cfg.val_size:
        samples, val_samples = split_validation(samples, cfg.val_size, cfg.seed)

    train_set, stats = encode_all(samples, fmt, tokenizer, cfg.max_len)
    val_set, val_stats = encode_all(val_samples, fmt, tokenizer, cfg.max_len)
    if not train_set:
        raise UserError(
            f"{cfg.data}: no row has a supervised token left after tokenization (--max-len {cfg.max_len})"
        )
    summary["train"] = stats
    if val_samples:
        summary["val"] = val_stats
    lengths = [len(e.input_ids) for e in train_set]
    batches = plan_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
    summary["padding_ratio"] = round(padding_ratio(batches, lengths), 4)
    summary["padding_ratio_if_padded_to_max_len"] = round(
        padding_ratio(batches, lengths, pad_to=cfg.max_len), 4
    )
    log(
        f"tokens: {stats['rows']} train rows, length p50 {stats['len_p50']} / p95 {stats['len_p95']} / max {stats['len_max']}, "
        f"{stats['supervised_tokens']:,} supervised of {stats['tokens']:,} tokens; "
        f"truncated {stats['truncated_prompt']} (prompt) + {stats['truncated_answer']} (answer), "
        f"dropped {stats['dropped_no_supervised_token']} (no supervised token left)"
        + (f"; {len(val_set)} validation rows" if val_samples else "")
    )
    log(
        f"padding: {100 * summary['padding_ratio']:.1f}% of batch positions with length-grouped batches "
        f"(padding every row to --max-len {cfg.max_len} would be {100 * summary['padding_ratio_if_padded_to_max_len']:.1f}%)"
    )
    return train_set, val_set, summary


def split_validation(samples: list, val_size: float, seed: int) -> tuple[list, list]:
    """Hold out a fraction (< 1) or a count (>= 1) of the rows, chosen by `seed`."""
    n_val = int(round(val_size * len(samples))) if val_size < 1 else int(val_size)
    if not 0 < n_val < len(samples):
        raise UserError(
            f"--val-size {val_size} leaves no training or no validation rows ({len(samples)} rows)"
        )
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in val_idx], [
        s for i, s in enumerate(samples) if i in val_idx
    ]


def encode_all(samples, fmt, tokenizer, max_len):
    """Tokenize every sample; returns (encoded rows, statistics)."""
    encoded, truncated, dropped = [], {"prompt": 0, "answer": 0}, 0
    for s in samples:
        e = encode_sample(s, fmt, tokenizer, max_len)
        if e is None:
            dropped += 1
            continue
        if e.truncated:
            truncated[e.truncated] += 1
        encoded.append(e)
    lengths = sorted(len(e.input_ids) for e in encoded) or [0]

    def percentile(q):
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    return encoded, {
        "rows": len(encoded),
        "tokens": sum(lengths),
        "supervised_tokens": sum(e.n_supervised for e in encoded),
        "len_p50": percentile(0.5),
        "len_p95": percentile(0.95),
        "len_max": lengths[-1],
        "truncated_prompt": truncated["prompt"],
        "truncated_answer": truncated["answer"],
        "dropped_no_supervised_token": dropped,
    }
