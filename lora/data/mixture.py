"""Several training files in one run: `--data a.json,b.jsonl:0.3`, mixed by sampling weight.

Each file is read on its own (container, encoding and row schema detected per file; `--columns`
may name the file it applies to) and tokenized on its own, so the startup summary reports every
file. The training set is the files' rows one after the other; `Mixture` says which of them
each epoch trains on.

What a weight means: the rows one epoch takes from a file of n rows with weight w are
round(w · n), every epoch the same number:

    w = 1     (the default) every row once, in the order --seed shuffles them: a plain epoch
    w < 1     a fresh draw without replacement each epoch (seeded by --seed and the epoch), so
              over many epochs every row is seen about equally often: w = 0.3 takes 30% per epoch
    w > 1     every row floor(w) times, plus a draw of the fractional part: w = 2.5 repeats
              each row twice and half of them a third time (upsampling a small, valuable file)

So a weight is a per-epoch rate per row, not a share of the mixture: to make file b a third
of each epoch, pick w_b so that w_b·n_b = (w_a·n_a + w_b·n_b) / 3. Epochs count these mixed
rows, so `--epochs 1` means one pass over the mixture. Validation rows (--val-size) are held
out before weighting: a repeated row never lands in both sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

# Bounds on what a weight can mean. Upsampling repeats a row a few times; a row repeated
# more than MAX_WEIGHT times per epoch is memorised, not learned from (and 1e9, a typo, would
# ask numpy for hundreds of GiB of row indices). An epoch's row list is checked before it exists.
MAX_WEIGHT = 100
MAX_EPOCH_ROWS = 50_000_000  # 400 MB of int64 indices


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float = 1.0


def parse_data(spec: str) -> list[DataSource]:
    """'a.json,b.jsonl:0.3' -> [DataSource('a.json', 1.0), DataSource('b.jsonl', 0.3)]."""
    sources = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            raise UserError(f"--data {spec}: an empty file name between commas")
        path, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head and not Path(part).exists():  # a ':' inside a real file name is a name
            path, weight = head, _weight(tail, spec)
        sources.append(DataSource(path, weight))
    return sources


def _weight(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_WEIGHT):
        raise UserError(
            f"--data {spec}: the weight after ':' must be a number > 0 and <= {MAX_WEIGHT} "
            f"(e.g. b.jsonl:0.3 or b.jsonl:2: rows per epoch per row), got {text!r}"
        )
    return value


def columns_by_file(spec: str | None, sources: list[DataSource]) -> list[str | None]:
    """The --columns mapping of each source.

    `prompt=Q,response=A` applies to every file; `b.csv:prompt=Q,response=A` only to the file
    named (as given in --data, or by its file name); several are separated by ';'.
    """
    shared, named = None, {}
    for part in (p.strip() for p in (spec or "").split(";") if p.strip()):
        head, sep, rest = part.partition(":")
        if sep and _match(head.strip(), sources) is not None:
            named[_match(head.strip(), sources)] = rest.strip()
        elif sep and "=" not in head:
            raise UserError(f"--columns {part}: {head!r} is not one of the --data files")
        else:
            shared = part
    return [named.get(i, shared) for i in range(len(sources))]


def _match(name: str, sources: list[DataSource]) -> int | None:
    for i, s in enumerate(sources):
        if name in (s.path, Path(s.path).name):
            return i
    return None


class Mixture:
    """Which rows of the training set each epoch takes (see the module docstring).

    `counts[k]` rows of source k sit one after the other in the training set.
    """

    def __init__(self, counts: list[int], weights: list[float], seed: int):
        self.counts, self.weights, self.seed = list(counts), list(weights), seed
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        if sum(self.per_epoch()) > MAX_EPOCH_ROWS:
            raise UserError(
                f"--data weights make an epoch of {sum(self.per_epoch()):,} rows (more than "
                f"{MAX_EPOCH_ROWS:,}); lower the weights or use --max-steps"
            )

    @property
    def plain(self) -> bool:
        """Every weight 1: an epoch is every row once, as with a single file."""
        return all(w == 1 for w in self.weights)

    def per_epoch(self) -> list[int]:
        return [round(w * n) for w, n in zip(self.weights, self.counts)]

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Indices into the training set of this epoch's rows (repeats for weights > 1)."""
        rng = np.random.default_rng([self.seed, epoch])
        picked = []
        for start, n, w, total in zip(self.starts, self.counts, self.weights, self.per_epoch()):
            whole = min(int(w), total // max(n, 1))
            rows = np.tile(np.arange(n), whole)
            extra = rng.choice(n, size=total - whole * n, replace=False)
            picked.append(start + np.concatenate([rows, np.sort(extra)]))
        return np.concatenate(picked)

    def lines(self, paths: list[str]) -> list[str]:
        """The startup summary's line per file: rows, weight, rows per epoch."""
        return [
            f"mix {path}: {n} rows × weight {w:g} = {k} rows per epoch"
            for path, n, w, k in zip(paths, self.counts, self.weights, self.per_epoch())
        ]
