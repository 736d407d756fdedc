"""The training set: read the files, hold out validation rows, tokenize, and say what happened.

    read_dataset (records.py)   each --data file -> conversations, bad rows counted (mixture.py)
    split                       --val-data, or --val-size rows held out by --seed
    encode_all                  conversations -> rows of input_ids + labels, --max-len applied,
                                in batches of CHUNK rows through the fast tokenizer
    TokenizedSet (tokenized.py) the rows in flat int32 arrays, not Python lists
    cache (cache.py)            the same file, tokenizer and settings again: loaded, not redone
    summary                     token lengths, supervised tokens, truncations, padding, rows/s

The summary is printed before training and stored in `train_args.json`, so a user sees what
the model will learn from before spending an hour on it.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import UserError
from .batching import padding_ratio, plan_batches
from .cache import cache_entry, load_cached, load_sets, save_cached
from .fileformat import BadRow
from .mixture import DataSource, columns_by_file, parse_data
from .prompt import encode_rows, get_renderer, truncate
from .records import read_dataset
from .tokenized import TokenizedSet

CHUNK = 1024  # rows per call of the batch tokenizer: big enough to keep every core busy


def prepare_data(cfg, tokenizer, fmt, log):
    """Read, split, tokenize (or load all that from the cache); print what happened.

    Returns (train set, validation set, summary dict). `fmt` may be updated in place before
    tokenizing (thinking on for reasoning rows, the data's shared system prompt), so the
    adapter records the format the rows were really rendered with.
    """
    started = time.perf_counter()
    # The key is of the inputs, so it is taken before `fmt` is adapted to the rows.
    entry = cache_entry(cfg, tokenizer, fmt) if getattr(cfg, "cache", False) else None
    cached = load_cached(entry, log) if entry else None
    if cached:
        train_set, val_set, summary = cached
        for line in summary["log_lines"]:
            log(line)
        log(f"data: loaded from the cache {entry} in {time.perf_counter() - started:.1f}s")
    else:
        train_set, val_set, summary = _prepare(cfg, tokenizer, fmt, log, started)
        if entry and save_cached(entry, (train_set, val_set, summary), log):
            train_set, val_set = load_sets(entry)  # memory-mapped: the in-memory arrays go
            summary["cache"] = str(entry)
    summary.pop("log_lines")
    fmt.enable_thinking = summary["prompt_format"]["enable_thinking"]
    fmt.data_system = summary["prompt_format"]["data_system"]
    _log_padding(cfg, train_set, summary, log)
    return train_set, val_set, summary


def _prepare(cfg, tokenizer, fmt, log, started):
    lines = []

    def say(line):
        lines.append(line)
        log(line)

    sources = parse_data(cfg.data)
    groups, val_samples, summary = read_and_split(cfg, sources, say)
    samples = [s for group in groups for s in group]
    adapt_format(fmt, tokenizer, samples, say)

    settings = dict(fmt=fmt, tokenizer=tokenizer, max_len=cfg.max_len,
                    drop_cut=getattr(cfg, "drop_cut_answers", False),
                    progress=getattr(cfg, "progress", False) and os.environ.get("RANK", "0") == "0")  # fmt: skip
    train_set, stats, per_file = encode_groups(groups, **settings)
    val_set, val_stats = encode_all(val_samples, **settings)
    if not len(train_set):
        raise UserError(
            f"{cfg.data}: no row has a supervised token left after tokenization (--max-len {cfg.max_len})"
        )
    seconds = time.perf_counter() - started
    summary["train"] = stats
    summary["train_rows_per_file"] = [part["rows"] for part in per_file]
    if len(sources) > 1:
        for source, part in zip(sources, per_file):
            say(f"tokens {source.path}: {part['rows']} rows, {part['supervised_tokens']:,} "
                f"supervised of {part['tokens']:,} tokens, length p50 {part['len_p50']}")  # fmt: skip
    if val_samples:
        summary["val"] = val_stats
    rows_in = len(samples) + len(val_samples)
    summary["prepare_seconds"] = round(seconds, 2)
    summary["prepare_rows_per_s"] = round(rows_in / max(seconds, 1e-9), 1)
    summary["prompt_format"] = {
        "enable_thinking": fmt.enable_thinking,
        "data_system": fmt.data_system,
    }
    for line in stats_lines(stats, len(val_set) if val_samples else None, cfg.max_len):
        say(line)
    log(  # not replayed from the cache, which has its own timing line
        f"prepared {rows_in} rows in {seconds:.1f}s ({summary['prepare_rows_per_s']:,.0f} rows/s: "
        f"read, render, tokenize, label)"
    )
    summary["log_lines"] = lines
    return train_set, val_set, summary


def read_and_split(cfg, sources, say) -> tuple[list[list], list, dict]:
    """Each file's samples (training rows), the validation samples, and the files' reports."""
    groups, reports = read_sources(cfg, sources)
    for report in reports:
        for line in report.lines():
            say(line)
    summary = {"train_files": [r.to_dict() for r in reports]}
    val_samples = []
    if cfg.val_data:
        # --columns may name the validation file too
        columns = columns_by_file(cfg.columns, [*sources, DataSource(cfg.val_data)])[-1]
        val_samples, val_report = read_dataset(
            cfg.val_data, columns, cfg.strict, cfg.dedup, cfg.encoding
        )
        for line in val_report.lines():
            say(line)
        summary["val_file"] = val_report.to_dict()
    elif cfg.val_size:  # held out of all files together, before any weighting (mixture.py)
        tagged = [(k, s) for k, group in enumerate(groups) for s in group]
        tagged, val_tagged = split_validation(tagged, cfg.val_size, cfg.seed)
        groups = [[s for k, s in tagged if k == i] for i in range(len(sources))]
        val_samples = [s for _, s in val_tagged]
        summary["val_rows"] = sorted((k, s.row) for k, s in val_tagged)  # for heldout.jsonl
    return groups, val_samples, summary


def read_sources(cfg, sources) -> tuple[list[list], list]:
    """Each --data file read on its own (format, encoding, schema, its own --columns)."""
    groups, reports = [], []
    for source, columns in zip(sources, columns_by_file(cfg.columns, sources)):
        samples, report = read_dataset(source.path, columns, cfg.strict, cfg.dedup, cfg.encoding)
        groups.append(samples)
        reports.append(report)
    return groups, reports


def adapt_format(fmt, tokenizer, samples, log) -> None:
    """Settle what the rows imply for the prompt format, before any row is rendered.

    - Rows with reasoning, on a template with a thinking switch (Qwen3): thinking goes on, so
      the prompt ends where the model starts to think, in training and at inference alike.
    - Rows that mostly (over half) share one system prompt of their own: it is recorded as
      `data_system`, which inference uses by default (the rows keep their own prompts).
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    has_switch = fmt.template == "chat" and "enable_thinking" in template
    if (
        has_switch
        and not fmt.enable_thinking
        and any(t.reasoning for s in samples for t in s.turns)
    ):
        fmt.enable_thinking = True
        log("  note: rows carry reasoning, so Qwen3 thinking mode is on (recorded in the adapter)")
    systems = Counter(s.system for s in samples if s.system)
    if systems and fmt.system is None:
        system, n = systems.most_common(1)[0]
        if n > len(samples) / 2:
            fmt.data_system = system
            log(
                f"  note: {n} of {len(samples)} rows share a system prompt; inference will use it by default"
            )


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


def encode_all(samples, fmt, tokenizer, max_len, drop_cut=False, progress=False):
    """Tokenize every sample into one set; returns (TokenizedSet, statistics)."""
    data, supervised, counts = _encode(samples, fmt, tokenizer, max_len, drop_cut, progress)
    return data, _stats(data, supervised, counts)


def encode_groups(groups, fmt, tokenizer, max_len, drop_cut=False, progress=False):
    """Tokenize groups of samples (one per --data file) into one set, the groups' rows in order.

    Returns (TokenizedSet, statistics of all rows, [statistics of each group]).
    """
    parts = [_encode(g, fmt, tokenizer, max_len, drop_cut, progress) for g in groups]
    data = TokenizedSet.build([p[0].input_ids for p in parts], [p[0].labels for p in parts],
                              [p[0].lengths for p in parts])  # fmt: skip
    supervised = np.concatenate([p[1] for p in parts])
    counts = sum((p[2] for p in parts), Counter())
    return data, _stats(data, supervised, counts), [_stats(*p) for p in parts]


def _encode(samples, fmt, tokenizer, max_len, drop_cut, progress):
    """Tokenize every sample, CHUNK rows per batch call; returns (TokenizedSet, supervised, counts).

    Rendering (Jinja) and labelling are Python, so on a big set the chunks go to worker
    processes, one per core; each worker runs the batch tokenizer on its own chunk.

    A bar shows on a terminal while it takes more than two seconds, and leaves no line behind:
    the summary's "prepared N rows in S s" is the line that says it is done. In a log (no
    terminal) a bar would write a line per redraw, so there is none.
    """
    from tqdm import tqdm

    job = partial(
        encode_chunk, renderer=get_renderer(tokenizer, fmt), max_len=max_len, drop_cut=drop_cut
    )
    chunks = [samples[i : i + CHUNK] for i in range(0, len(samples), CHUNK)]
    done = []
    shown = progress and sys.stderr.isatty()
    with tqdm(total=len(samples), unit="row", desc="tokenizing", delay=2, leave=False,
              dynamic_ncols=True, file=sys.stderr, disable=not shown) as bar:  # fmt: skip
        for result in _map(job, chunks, worker_count(len(samples))):
            done.append(result)
            bar.update(result.n_samples)
    counts = sum((c.counts for c in done), Counter())
    data = TokenizedSet.build(
        [c.ids for c in done], [c.labels for c in done], [c.lengths for c in done]
    )
    supervised = np.concatenate([c.supervised for c in done] or [np.zeros(0, np.int64)])
    return data, supervised, counts


@dataclass
class EncodedChunk:
    """The kept rows of one chunk, flat, with their lengths and what happened to the others."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray
    counts: Counter
    n_samples: int


def encode_chunk(samples, renderer, max_len, drop_cut) -> EncodedChunk:
    """Render, tokenize (one batch call), label and truncate a chunk of samples."""
    counts, rows = Counter(), []
    for s in samples:
        try:
            sample_rows = renderer.rows(s)
        except BadRow as e:  # a template that will not let us locate this answer
            counts[f"skipped: {e}"] += 1
            continue
        counts["extra_rows_from_split_conversations"] += len(sample_rows) - 1
        rows += sample_rows
    kept = [
        e
        for e in (_truncated(e, max_len, drop_cut, counts) for e in encode_rows(rows, renderer))
        if e
    ]
    supervised = np.array([e.n_supervised for e in kept], dtype=np.int64)

    def flat(arrays):
        return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)

    return EncodedChunk(
        flat([e.input_ids for e in kept]),
        flat([e.labels for e in kept]),
        np.array([len(e.input_ids) for e in kept], dtype=np.int64),
        supervised,
        counts,
        len(samples),
    )


def _truncated(enc, max_len, drop_cut, counts):
    """The row cut to `max_len`, or None (counted) when it is to be dropped."""
    if max_len and len(enc.input_ids) > max_len:
        enc = truncate(enc, max_len)
        counts[enc.truncated] += 1
        if enc.truncated == "answer" and drop_cut:
            counts["dropped_answer_cut"] += 1
            return None
    if enc.n_supervised == 0:
        counts["dropped_no_supervised_token"] += 1
        return None
    return enc


def worker_count(n_samples: int) -> int:
    """Worker processes for `n_samples` rows: none for small sets, else one per core."""
    if n_samples < 4 * CHUNK or "fork" not in mp.get_all_start_methods():
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0  # never fork a process with communication threads; ranks use Rust's threads
    cores = os.cpu_count() or 1
    return min(cores, 8) if cores >= 2 else 0


_JOB = None  # the job of the current pool; forked workers inherit it with the tokenizer
PR_SET_PDEATHSIG = 1  # Linux prctl(2): the signal a process gets when its parent dies


def _run_job(chunk):
    return _JOB(chunk)


def _quiet_worker(parent: int) -> None:
    """Set up a forked worker so that an interrupted run ends without the workers' tracebacks.

    Ctrl-C reaches every process of the terminal's group: the parent alone handles it and ends
    the pool, so a worker ignores SIGINT, and the pool's SIGTERM ends it at once, whatever
    handler it inherited from the parent. A parent killed before it can end the pool (SIGKILL)
    would leave each worker to finish its chunk and die on the broken pipe to the parent,
    printing a traceback: on Linux the kernel kills the worker with its parent instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # a C library without prctl
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _map(job, chunks, workers):
    """job(chunk) for every chunk, in order: here, or in `workers` forked processes."""
    global _JOB
    if not workers:
        yield from map(job, chunks)
        return
    _JOB, saved = job, os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker process
    # Forked workers share the parent's memory until they write to it; the garbage collector
    # would write to every object it visits, so the objects alive now are frozen out of its way.
    gc.freeze()
    try:
        with mp.get_context("fork").Pool(workers, _quiet_worker, (os.getpid(),)) as pool:
            yield from pool.imap(_run_job, chunks)
    finally:
        gc.unfreeze()
        _JOB = None
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _stats(data: TokenizedSet, supervised: np.ndarray, counts: Counter) -> dict:
    lengths = np.sort(data.lengths) if len(data) else np.zeros(1, dtype=np.int64)

    def percentile(q):
        return int(lengths[min(len(lengths) - 1, int(q * len(lengths)))])

    return {
        "rows": len(data),
        "tokens": int(data.lengths.sum()),
        "supervised_tokens": int(supervised.sum()),
        "len_p50": percentile(0.5),
        "len_p95": percentile(0.95),
        "len_max": int(lengths[-1]),
        "truncated_prompt": counts["prompt"],
        "truncated_answer": counts["answer"],
        "dropped_answer_cut": counts["dropped_answer_cut"],
        "dropped_no_supervised_token": counts["dropped_no_supervised_token"],
        "extra_rows_from_split_conversations": counts["extra_rows_from_split_conversations"],
        "skipped": {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("skipped")},
    }


def stats_lines(stats: dict, n_val: int | None, max_len: int) -> list[str]:
    """The summary's token lines, as printed before training."""
    cut = (
        f"truncated {stats['truncated_prompt']} (prompt) + {stats['truncated_answer']} (answer cut"
    )
    cut += (
        f", {stats['dropped_answer_cut']} of them dropped)" if stats["dropped_answer_cut"] else ")"
    )
    lines = [
        f"tokens: {stats['rows']} train rows, length p50 {stats['len_p50']} / p95 {stats['len_p95']} / max {stats['len_max']}, "
        f"{stats['supervised_tokens']:,} supervised of {stats['tokens']:,} tokens; {cut}, "
        f"dropped {stats['dropped_no_supervised_token']} (no supervised token left)"
        + (f"; {n_val} validation rows" if n_val is not None else "")
    ]
    if stats["extra_rows_from_split_conversations"]:
        lines.append(
            f"  note    {stats['extra_rows_from_split_conversations']:>6} extra rows: the chat template "
            "renders past answers differently, so each answer trains on its own inference prompt"
        )
    for reason, n in stats["skipped"].items():
        lines.append(f"  skipped {n:>6} {reason}")
    return lines


def _log_padding(cfg, train_set, summary, log) -> None:
    lengths = train_set.lengths.tolist()
    batches = plan_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
    summary["padding_ratio"] = round(padding_ratio(batches, lengths), 4)
    summary["padding_ratio_if_padded_to_max_len"] = round(
        padding_ratio(batches, lengths, pad_to=cfg.max_len), 4
    )
    log(
        f"padding: {100 * summary['padding_ratio']:.1f}% of batch positions with length-grouped batches "
        f"(padding every row to --max-len {cfg.max_len} would be {100 * summary['padding_ratio_if_padded_to_max_len']:.1f}%)"
    )
