"""Answering a file of questions: batched, written as it goes, resumable.

Each row's last user turn is the question; the answer recorded for it in the file, if any, is
the *reference* that `score.py` compares with. Every answer becomes one JSON line:

    {"row": 7, "prompt": "...", "reference": "..." | null,
     "answer": "...", "stop_reason": "eos" | "length", "new_tokens": 42,
     "base_answer": ..., "base_stop_reason": ..., "base_new_tokens": ...}     (with --compare)

`stop_reason` "length" means generation hit --max-new-tokens before an end token: the answer
is cut, and a model that does this often never learned to stop. Every line also carries
`"generated_by"`: what made the answer (the adapter's digest, the base model and how it was
loaded, the system prompt, every generation setting; `generation_identity`).

With `--output`, each batch is appended in one write, flushed and synced, so an interrupted
run keeps everything it generated; a rerun with the same `--output` skips the rows already
answered (a torn last line from a kill is dropped). It continues only what the same adapter
and settings answered to the same questions: answers of another adapter, other settings or
another question file would be mixed in silently, so that rerun is refused with a line that
says how to start over (delete the file, or choose another --output).

While it works, one bar counts the rows, and says which model is answering and how many tokens
of the current batch it has written (`TokenProgress`): a batch of long answers takes minutes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapter import atomic_write_bytes
from ..data.records import Sample, Turn
from ..errors import UserError
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
    identity = generation_identity(loaded, settings)
    done = read_answered(output) if output else {}
    done = {row: r for row, r in done.items() if all(k in r for k in needed)}
    check_same_generation(done, samples, identity, output)
    todo = [s for s in samples if s.row not in done]
    if done:
        print(f"{len(samples) - len(todo)} rows already answered in {output} by this adapter "
              f"with these settings; answering the other {len(todo)}", file=sys.stderr)  # fmt: skip
    with tqdm(total=len(todo), desc="answering", unit="row", file=sys.stderr,
              dynamic_ncols=True, disable=not todo) as bar:  # fmt: skip
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answered = answer_batch(loaded, batch, settings, compare, bar)
            records = [r | {"generated_by": identity} for r in answered]
            _append(output, records)
            done.update((r["row"], r) for r in records)
            bar.update(len(batch))
    return [done[s.row] for s in samples]


def answer_batch(loaded, batch: list[Sample], settings, compare: bool, bar) -> list[dict]:
    """One batch's records: the fine-tuned model's answers, then with `compare` the base's."""
    asks = [as_question(s) for s in batch]
    progress = partial(TokenProgress, bar, settings.max_new_tokens)
    if compare:
        results = generate_compare(loaded, asks, settings, progress)
    else:
        tuned = generate_batch(loaded, asks, settings, progress("fine-tuned"))
        results = [{"tuned": r} for r in tuned]
    return [answer_record(s, r) for s, r in zip(batch, results)]


class TokenProgress:
    """A `generate()` streamer that writes on the rows' bar which model is answering and how
    many tokens of the batch's answers it has written, so a long batch is seen to progress.

    `generate()` hands it the prompt first, then each step's new tokens (one per row of the
    batch), then calls `end()`. The bar is redrawn at most every REFRESH_S seconds.
    """

    REFRESH_S = 0.5

    def __init__(self, bar, limit: int, model: str):
        self.bar, self.limit, self.model = bar, limit, model
        self.tokens = -1  # the first put() is the prompt
        self.shown = 0.0
        self.show()

    def put(self, value) -> None:
        self.tokens += 1
        if time.monotonic() - self.shown >= self.REFRESH_S:
            self.show()

    def end(self) -> None:
        self.show()

    def show(self) -> None:
        self.bar.set_postfix_str(f"{self.model} model: token {max(self.tokens, 0)}/{self.limit}")
        self.shown = time.monotonic()


def generation_identity(loaded, settings) -> dict:
    """What makes an answer what it is: the adapter (its weights' digest), the base model and how
    it was loaded, the system prompt, every generation setting (and the seed, when sampling).

    Recorded beside every answer, so that a rerun into the same --output continues only the
    same generation, and anyone reading the file knows what produced each line.
    """
    model = loaded.model
    identity = {
        "adapter_sha256": loaded.adapter_sha256,
        "base_model": loaded.base_model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantize": loaded.quantize,
        "merged": any(getattr(m, "merged", False) for m in model.modules()),
        "system": loaded.fmt.system,
        **asdict(settings),
    }
    if settings.temperature > 0:
        identity["seed"] = torch.initial_seed()  # infer.py's --seed
    return identity


def check_same_generation(done: dict, samples: list[Sample], identity: dict, output) -> None:
    """The answers already in `output` continue only with the same adapter and settings, to the
    same questions; otherwise one line says what differs and how to start over."""
    start_over = "delete it to start over, or choose another --output"
    prompts = {s.row: answer_record(s, {})["prompt"] for s in samples}
    for row, record in done.items():
        before = record.get("generated_by")
        if before != identity:
            what = differences(before, identity) if before else "written by an older infer.py"
            raise UserError(
                f"{output} holds answers of another adapter or other settings ({what}); "
                f"new answers would be mixed with them: {start_over}"
            )
        if row in prompts and record.get("prompt") != prompts[row]:
            raise UserError(
                f"{output}: row {row} answers another question ({record.get('prompt')!r:.60}), "
                f"from another --file: {start_over}"
            )


def differences(before: dict, now: dict) -> str:
    """ "max_new_tokens was 40, now 100; adapter_sha256 was 3f2a9c1e04b7…, now …" """

    def show(value):
        return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else repr(value)

    keys = [k for k in {**before, **now} if before.get(k) != now.get(k)]
    return "; ".join(f"{k} was {show(before.get(k))}, now {show(now.get(k))}" for k in keys)
