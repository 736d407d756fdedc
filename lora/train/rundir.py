"""The output directory: is this a fresh run, the continuation of one, or a finished one?

`--output out/` holds one run. Before anything loads, we decide what the directory means:

    empty or missing                 a fresh run
    a finished run                   an error, unless --overwrite (replace it) or
                                     --resume auto (nothing to do, unless --max-steps grew)
    an unfinished run's checkpoints  an error, unless --resume auto (continue from the newest
                                     intact one) or --overwrite
    an adapter, whatever             an error, unless --overwrite, or --resume auto with a
    train_args.json says             checkpoint to continue from: a result is never replaced
                                     because its bookkeeping file is missing or damaged

`train_args.json` records every setting, the library versions, the data summary and, at the
end, `"finished": true` with the final losses. Its `"args"` are a valid `--config` file.

One run at a time: `run_dir_lock` holds an exclusive `flock` on `out/.train.lock` for the whole
run, so a second `train.py` on the same `--output` stops at once, naming the first one's PID.
The kernel releases the lock when its process dies, however it dies: a lock left by a killed
run never blocks. Holding the lock, we may also tidy what a killed run left behind: only what
carries one of our temporary names (`.NAME.*.tmp`, `.tmp-checkpoint-N`, `.pruned-checkpoint-N`)
is deleted. A checkpoint that is damaged (a file missing or unreadable) is never deleted: when
`--resume auto` has to pass it over, it is renamed `checkpoint-N.damaged` and the next older
one is used.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXTRA_FILE, atomic_write_bytes
from ..errors import UserError
from . import checkpoint as ckpt
from .distributed import barrier

TRAIN_ARGS = "train_args.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss_curve.png"
HELDOUT = "heldout.jsonl"  # the rows --val-size held out, as the data file holds them
LOCK_FILE = ".train.lock"
# What --overwrite removes: everything a run (and `infer.py --inspect/--score`) writes here.
OUR_FILES = (
    ADAPTER_WEIGHTS, ADAPTER_CONFIG, EXTRA_FILE, TRAIN_ARGS, METRICS, LOSS_PLOT, HELDOUT,
    "inspect.json", "inspect.png", "score.json",
)  # fmt: skip
OUR_DIRS = ("best", "tensorboard", "swanlog", "wandb")  # best adapter, --report-to's local logs


@contextmanager
def run_dir_lock(out: Path, enabled: bool = True):
    """Hold an exclusive lock on `out` for the whole run (process 0 only under torchrun).

    Creating the directory and the lock file is also the check that `out` is writable, done
    before the model loads rather than after an hour of training.
    """
    if not enabled:
        yield
        return
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        tempfile.TemporaryFile(dir=out).close()  # the lock file may exist in a read-only dir
    except OSError as e:
        raise UserError(f"--output {out}: cannot write there ({e.strerror})") from None
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "unknown"
            raise UserError(
                f"--output {out} is in use by another training run (PID {holder}); "
                f"wait for it to end, or choose another --output"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # the lock goes with the file descriptor, when the block ends or the process dies


@dataclass
class RunDirPlan:
    """What to do with `--output`: resume from a checkpoint, or report a finished run."""

    resume_from: Path | None = None
    finished_steps: int | None = None  # set when the directory holds a finished run to keep
    notes: list[str] = field(default_factory=list)  # warnings for the user (damaged checkpoints)
    damaged: list[Path] = field(default_factory=list)  # newer than resume_from: set aside


def plan_run_dir(out: Path, cfg) -> RunDirPlan:
    """Decide fresh / resume / finished from the directory's contents and the flags.

    Nothing is removed here, not even with --overwrite: the previous run stays until the new one
    has checked everything and is about to write its first file (`clean_run_dir`).
    """
    args = read_train_args(out)
    finished = bool(args.get("finished"))
    done_steps = args.get("state", {}).get("step", 0)
    checkpoints = ckpt.checkpoint_dirs(out)  # complete or not: each says a run was here
    if cfg.overwrite:
        return RunDirPlan()
    if cfg.resume and cfg.resume != "auto":
        path = Path(cfg.resume)
        problem = ckpt.checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {path}: not a usable checkpoint ({problem})")
        return RunDirPlan(resume_from=path)
    if cfg.resume == "auto":
        if finished and (cfg.max_steps is None or cfg.max_steps <= done_steps):
            return RunDirPlan(finished_steps=done_steps)
        plan = RunDirPlan()
        plan.resume_from = ckpt.newest_intact_checkpoint(checkpoints, plan.notes)
        if checkpoints and plan.resume_from is None:
            raise UserError(
                f"{out}: no checkpoint is intact ({'; '.join(plan.notes)}); "
                f"pass --overwrite to start the run over"
            )
        if plan.resume_from is None and has_adapter(out) and not finished:
            raise UserError(unrecorded_result(out))
        if plan.resume_from is not None:  # every newer one was passed over as damaged
            newer = ckpt.step_of(plan.resume_from)
            plan.damaged = [p for p in checkpoints if ckpt.step_of(p) > newer]
        if finished and plan.resume_from is None:
            raise UserError(
                f"{out} holds a run finished at step {done_steps} with no checkpoint to continue "
                f"from, so --max-steps {cfg.max_steps} cannot extend it. Train it again with "
                f"--overwrite --max-steps {cfg.max_steps}, or keep it and choose another --output "
                f"(--save-every N keeps checkpoints that a later run can extend)"
            )
        return plan
    if finished:
        raise UserError(
            f"{out} already holds a finished run; pass --overwrite to replace it, or another --output"
        )
    if checkpoints:
        raise UserError(
            f"{out} holds checkpoints of an unfinished run; pass --resume auto to continue it, or --overwrite"
        )
    if has_adapter(out):
        raise UserError(unrecorded_result(out))
    return RunDirPlan()


def has_adapter(out: Path) -> bool:
    return (out / ADAPTER_WEIGHTS).is_file()


def unrecorded_result(out: Path) -> str:
    return (
        f"{out} holds an adapter ({ADAPTER_WEIGHTS}) but no record of a finished run "
        f"({TRAIN_ARGS} is missing, unreadable or says unfinished) and no checkpoint to continue "
        f"from; pass --overwrite to replace it, or choose another --output"
    )


def clean_run_dir(out: Path) -> None:
    """Remove what a previous run wrote (only our own files: the user may keep others there)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or p.name in OUR_DIRS:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in OUR_FILES:
            p.unlink()


def remove_leftovers(out: Path) -> list[str]:
    """Delete what a killed run left half-done; returns the names removed (called under the lock).

    Only our temporary names: files of atomic writes (`.NAME.*.tmp`), checkpoints being written
    (`.tmp-checkpoint-N`) and checkpoints being deleted (`.pruned-checkpoint-N`: pruning renames
    a checkpoint before its file-by-file `rmtree`). A `checkpoint-N` is never deleted here, even
    with a file missing: that is for `--resume auto` to judge and set aside.
    """
    if not out.is_dir():
        return []
    removed = []
    for d in (out, out / "best", *ckpt.checkpoint_dirs(out)):
        for p in d.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(out)))
    for p in [*out.glob(".tmp-checkpoint-*"), *out.glob(f"{ckpt.PRUNED_PREFIX}*")]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def set_aside(damaged: list[Path]) -> list[str]:
    """Rename damaged checkpoints `checkpoint-N.damaged` (kept for the user, out of the way of
    resuming and --keep-last); returns one message each."""
    notes = []
    for path in damaged:
        target, n = path.with_name(f"{path.name}.damaged"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.damaged-{n}")
        os.rename(path, target)
        notes.append(
            f"set the damaged {path.name} aside as {target.name}; resuming from an older one"
        )
    return notes


def read_train_args(out: Path) -> dict:
    """`train_args.json` of a previous run, or {} when there is none (or it is unreadable)."""
    try:
        return json.loads((out / TRAIN_ARGS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class RunRecord:
    """What `train_args.json` says about a run besides its settings."""

    data: dict
    trainable_params: int
    total_params: int
    lora_modules: int
    estimate: dict = field(default_factory=dict)  # cost.py: memory and epochs, before step 1


def write_train_args(
    out: Path, cfg, record: RunRecord, state: dict, final: dict | None = None
) -> None:
    """Every setting, the versions, the data summary; `finished` once `final` losses are known."""
    payload = {
        "args": asdict(cfg),
        "finished": final is not None,
        "state": {k: v for k, v in state.items() if k != "identity"},
        **asdict(record),
        "final": final or {},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    text = json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n"
    atomic_write_bytes(out / TRAIN_ARGS, text.encode())


def prepare_run_dir(out: Path, cfg, dist) -> RunDirPlan:
    """Tidy a killed run's leftovers (we hold the lock), then decide fresh / resume / finished."""
    if dist.is_main:
        removed = remove_leftovers(out)
        if removed:
            print(f"removed what an interrupted run left half-written: {', '.join(removed)}")
    barrier()
    plan = plan_run_dir(out, cfg)
    if dist.is_main:
        plan.notes += set_aside(plan.damaged)
    barrier()
    for note in plan.notes if dist.is_main else ():
        print(note)
    if plan.finished_steps is not None and dist.is_main:
        print(f"{out} holds a finished run ({plan.finished_steps} steps); nothing to resume. "
              f"Use --overwrite to train again.")  # fmt: skip
    return plan
