"""A tokenized data set stored compactly: one flat buffer of ids, one of labels, row offsets.

Python lists of ints cost about 36 bytes per token (an 8-byte pointer plus a 28-byte int
object); a 2M-row set of 300-token rows would need ~43 GB that way. Here every token costs 8
bytes (an int32 id and an int32 label), in three numpy arrays:

    input_ids  int32[total tokens]   every row's ids, one after the other
    labels     int32[total tokens]   the same positions' labels (-100 where not supervised)
    offsets    int64[rows + 1]       row i is input_ids[offsets[i]:offsets[i + 1]]

Saved as `.npy` files they load back memory-mapped (`numpy.load(mmap_mode="r")`): the
operating system pages in only the rows a batch touches, so a huge set costs little memory.
`ds[i]` is a `Row` of two array views, which `batching.collate` pads into a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRAYS = ("input_ids", "labels", "offsets")


@dataclass(frozen=True)
class Row:
    input_ids: np.ndarray
    labels: np.ndarray


class TokenizedSet:
    """Rows of (input_ids, labels) in flat arrays; supports len(), ds[i], iteration, `.lengths`."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def build(cls, ids: list, labels: list, lengths: list) -> TokenizedSet:
        """One set from pieces of flat ids and labels (rows in order) and every row's length."""
        lengths = np.concatenate(
            [np.asarray(x, dtype=np.int64) for x in lengths] + [np.zeros(0, np.int64)]
        )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        def flat(pieces):
            return (
                np.concatenate(pieces).astype(np.int32, copy=False)
                if pieces
                else np.zeros(0, np.int32)
            )

        return cls(flat(ids), flat(labels), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Row:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        return Row(self.input_ids[a:b], self.labels[a:b])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, directory: Path, name: str) -> list[Path]:
        """Write `<name>.<array>.npy` files; returns their paths."""
        paths = []
        for array in ARRAYS:
            path = Path(directory) / f"{name}.{array}.npy"
            np.save(path, getattr(self, array))
            paths.append(path)
        return paths

    @classmethod
    def load(cls, directory: Path, name: str) -> TokenizedSet:
        """Memory-map a saved set, checking that its arrays fit together (else ValueError)."""
        arrays = [np.load(Path(directory) / f"{name}.{a}.npy", mmap_mode="r") for a in ARRAYS]
        ids, labels, offsets = arrays
        if (
            ids.dtype != np.int32
            or labels.dtype != np.int32
            or offsets.dtype != np.int64
            or ids.shape != labels.shape
            or offsets.ndim != 1
            or len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != len(ids)
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError(f"{name}: arrays do not fit together")
        return cls(ids, labels, offsets)
