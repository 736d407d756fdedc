"""Answering a file of questions: batched, written as it goes, resumable.

Each row's last user turn is the question; the answer recorded for it in the file, if any, is
the *reference* that `score.py` compares with. Every answer becomes one JSON line:

    {"row": 7, "prompt": "...", "reference": "..." | null,
     "answer": "...", "stop_reason": "eos" | "length", "new_tokens": 42,
     "base_answer": ..., "base_stop_reason": ..., "base_new_tokens": ...}     (with --compare)

`stop_reason` "length" means generation hit --max-new-tokens before an end token: the answer
is cut, and a model that does this often never learned to stop.

With `--output`, each batch is appended in one write, flushed and synced, so an interrupted
run keeps everything it generated; a rerun with the same `--output` skips the rows already
answered (a torn last line from a kill is dropped). Delete the file to start over.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ..adapter import atomic_write_bytes
from ..data.records import Sample, Turn
from .generate import generate_batch, generate_compare


def as_question(sample: Sample) -> Sample:
    """The sample with its last answer removed: what the model is asked."""
    last = sample.turns[-1]
    return Sample(
        sample.turns[:-1] + (Turn(last.user, "", last.user_input),), sample.system, sample.row
    )


def answer_record(sample: Sample, result: dict) -> dict:
    """One JSON line: the question, its reference, and the answer(s) with their stop reasons."""
    last = sample.turns[-1]
    record = {
        "row": sample.row,
        "prompt": f"{last.user}\n{last.user_input}".strip(),
        "reference": last.assistant or None,
    }
    for prefix, key in (("", "tuned"), ("base_", "base")):
        if key in result:
            r = result[key]
            record[prefix + "answer"] = r["answer"]
            if r.get("reasoning"):  # a reasoning model's <think> part, kept apart from the answer
                record[prefix + "reasoning"] = r["reasoning"]
            record[prefix + "stop_reason"] = "eos" if r["stopped"] else "length"
            record[prefix + "new_tokens"] = r["new_tokens"]
    return record


def read_answered(path: Path) -> dict[int, dict]:
    """Records already in `path`, by row (the last one of a row wins); a torn tail is dropped."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records, good = {}, []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a kill mid-write: keep the rest, drop this line
                print(f"note: {path}: dropped an incomplete last line", file=sys.stderr)
                atomic_write_bytes(path, "".join(g + "\n" for g in good).encode())
                break
            raise
        records[record.get("row")] = record
        good.append(line)
    return records


def _append(path: Path | None, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def answer_file(loaded, samples: list[Sample], settings, batch_size: int, output: Path | None = None, compare: bool = False) -> list[dict]:  # fmt: skip
    """Answer every sample (and with `compare` the base model too); returns every record."""
    needed = ("answer", "base_answer") if compare else ("answer",)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)  # before an hour of generation, not after
    done = read_answered(output) if output else {}
    done = {row: r for row, r in done.items() if all(k in r for k in needed)}
    todo = [s for s in samples if s.row not in done]
    if done:
        print(f"{len(samples) - len(todo)} rows already answered in {output}; answering the "
              f"other {len(todo)} (delete the file to start over)", file=sys.stderr)  # fmt: skip
    for start in tqdm(
        range(0, len(todo), batch_size), desc="answering", unit="batch", file=sys.stderr
    ):
        batch = todo[start : start + batch_size]
        asks = [as_question(s) for s in batch]
        if compare:
            results = generate_compare(loaded, asks, settings)
        else:
            results = [{"tuned": r} for r in generate_batch(loaded, asks, settings)]
        records = [answer_record(s, r) for s, r in zip(batch, results)]
        _append(output, records)
        done.update((r["row"], r) for r in records)
    return [done[s.row] for s in samples]
