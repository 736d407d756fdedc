"""What a run reports: `metrics.jsonl`, the loss plot, the progress bar, the startup summary.

`metrics.jsonl` has one JSON record per optimizer step (step, epoch, loss, lr, grad_norm,
tokens_per_s, real_tokens, supervised_tokens, step_time_s, and val_loss/val_ppl on steps that
evaluated). Only process 0 writes it. On resume the records after the checkpoint's step are
dropped: those steps are trained, and logged, again.

Crash safety: during a run records are appended, so a kill loses at most the line being
written; a torn last line (a kill or a full disk mid-append) is dropped with a warning when the
file is read back. On resume the kept records are written to a temporary file that replaces
the old one in one rename: a kill at any moment leaves the old history or the new one.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

from .adapter import atomic_write_bytes
from .errors import UserError, with_path

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


class MetricsLog:
    """The run's step records, in memory (`history`) and in `metrics.jsonl` (process 0)."""

    def __init__(self, path: Path, writer: bool):
        self.path = Path(path)
        self.writer = writer
        self.history: list[dict] = []

    def continue_from(self, step: int, log=print) -> None:
        """Keep the records up to `step` (a resumed run's checkpoint), in memory and on disk."""
        self.history = [r for r in read_jsonl(self.path, log) if r.get("step", 0) <= step]
        if self.writer and self.path.exists():
            text = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write_bytes(self.path, text.encode())

    def start_fresh(self) -> None:
        self.history = []
        if self.writer and self.path.exists():
            self.path.unlink()

    def append(self, record: dict) -> None:
        self.history.append(record)
        self._write(record)

    def add_to_last(self, result: dict) -> None:
        """A result about the last step (the final validation), as its own record."""
        if self.history:
            self.history[-1].update(result)
            self._write({"step": self.history[-1]["step"], **result})

    def _write(self, record: dict) -> None:
        if self.writer:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # disk full: a torn last line at worst, dropped on resume
                raise with_path(e, self.path) from None


def read_jsonl(path: Path, log=print) -> list[dict]:
    """The records of `metrics.jsonl`; a torn last line is dropped with a warning."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_bytes().decode("utf-8", "replace").splitlines() if line]
    records = []
    for i, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == len(lines):
            log(f"warning: {path}: dropped a torn last line (written when the run was stopped)")
        else:
            raise UserError(f"{path}: line {i} is not a JSON record; fix or remove the file")
    return records


def plot_loss(history: list, path: Path) -> None:
    """Train loss per step, validation loss where it was measured (written atomically)."""
    finite = [r for r in history if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in finite], [r["loss"] for r in finite], label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


class ProgressBar:
    """tqdm's bar over optimizer steps on process 0 (nothing elsewhere, or with --no-progress)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, initial=initial, desc="training", unit="step",
                            dynamic_ncols=True, file=sys.stderr)  # fmt: skip

    def step(self, record: dict) -> None:
        if self.bar is not None:
            tok_s = f"{record['tokens_per_s']:.0f}"
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=tok_s
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def startup_summary(run, report, total_steps: int) -> list[str]:
    """Device, model, trainable parameters, effective batch: printed before the first step."""
    cfg, info = run.cfg, run.dist
    rows_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    mean_len = sum(run.lengths) / len(run.lengths)
    if run.device.type == "cuda":
        name = torch.cuda.get_device_name(run.device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    processes = f" × {info.world_size} processes" if info.enabled else ""
    return [
        f"device: {name}; precision: {run.precision} (LoRA weights and optimizer state fp32)"
        + (f"; {info.world_size} processes (torchrun)" if info.enabled else "")
        + (", model sharded (FSDP)" if run.sharded else ""),
        f"model: {cfg.model}",
        str(report),
        f"effective batch: {rows_per_step} rows ({cfg.batch_size} per process × {cfg.grad_accum} "
        f"accumulation{processes}) ≈ {rows_per_step * mean_len:,.0f} tokens; {total_steps} optimizer steps",
    ]
