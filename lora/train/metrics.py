"""What a run reports: `metrics.jsonl`, the loss plot, the progress bar, the startup summary.

`metrics.jsonl` has one JSON record per line, of one of two kinds, each always of the same shape:

    {"kind": "train", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s",
     "real_tokens", "supervised_tokens", "step_time_s"}          one per optimizer step
    {"kind": "eval", "step", "val_loss", "val_ppl"}              one per validation

An evaluation record follows the train record of the step it evaluated. Only process 0 writes
the file; the same records go to the trackers of --report-to (tracking.py). On resume the
records after the checkpoint's step are dropped: those steps are trained, and logged, again.

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

from ..adapter import atomic_write_bytes
from ..errors import UserError, with_path

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


class MetricsLog:
    """The run's records: train steps in `history`, validations in `evals`, both in `metrics.jsonl`.

    `tracker` (tracking.py) receives every record written, so TensorBoard, W&B or SwanLab show
    exactly what the file holds.
    """

    def __init__(self, path: Path, writer: bool, tracker=None):
        self.path = Path(path)
        self.writer = writer
        self.tracker = tracker
        self.history: list[dict] = []
        self.evals: list[dict] = []

    def continue_from(self, step: int, log=print) -> None:
        """Keep the records up to `step` (a resumed run's checkpoint), in memory and on disk."""
        kept = [r for r in read_jsonl(self.path, log) if r.get("step", 0) <= step]
        self.history = [r for r in kept if record_kind(r) == "train"]
        self.evals = [r for r in kept if record_kind(r) == "eval"]
        if self.writer and self.path.exists():
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write_bytes(self.path, text.encode())

    def start_fresh(self) -> None:
        self.history, self.evals = [], []
        if self.writer and self.path.exists():
            self.path.unlink()

    def append(self, record: dict) -> None:
        """One optimizer step's record (kind "train")."""
        record = {"kind": "train", **record}
        self.history.append(record)
        self._write(record)

    def add_eval(self, step: int, result: dict) -> None:
        """One validation's record (kind "eval"), at the step it evaluated."""
        record = {"kind": "eval", "step": step, **result}
        self.evals.append(record)
        self._write(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def _write(self, record: dict) -> None:
        if not self.writer:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full: a torn last line at worst, dropped on resume
            raise with_path(e, self.path) from None
        if self.tracker is not None:
            self.tracker.log(record)


def record_kind(record: dict) -> str:
    """ "train" or "eval"; files written before records had a kind are told apart by their loss."""
    return record.get("kind") or ("train" if "loss" in record else "eval")


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


def plot_loss(history: list, evals: list, path: Path) -> None:
    """Three panels over optimizer steps: losses, learning rate, gradient norm (written atomically)."""
    from matplotlib.ticker import MaxNLocator

    finite = [r for r in history if math.isfinite(r["loss"])]
    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_lr, ax_norm) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    ax_loss.plot([r["step"] for r in finite], [r["loss"] for r in finite], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                     label="validation loss")  # fmt: skip
    ax_loss.set_ylabel("cross-entropy\nper supervised token")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in history])
    ax_lr.set_ylabel("learning rate")
    ax_norm.plot(steps, [r["grad_norm"] for r in history])
    ax_norm.set_ylabel("gradient norm\n(before clipping)")
    ax_norm.set_xlabel("optimizer step")
    ax_norm.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    for ax in (ax_loss, ax_lr, ax_norm):
        ax.grid(alpha=0.3)
    fig.suptitle(f"training run {path.parent.name}: {len(history)} steps")
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
    """Device, model, trainable parameters, effective batch, steps and how many of them warm up:
    printed before the first step."""
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
        f"accumulation{processes}) ≈ {rows_per_step * mean_len:,.0f} tokens; {total_steps} optimizer steps, "
        f"{warmup_words(run.warmup_steps, cfg.warmup)}",
    ]


def warmup_words(steps: int, warmup: float) -> str:
    """ "the first 1 warming up (--warmup 0.03)", or "no warmup (--warmup 0)"."""
    if not steps:
        return f"no warmup (--warmup {warmup:g})"
    return f"the first {steps} warming up (--warmup {warmup:g})"
