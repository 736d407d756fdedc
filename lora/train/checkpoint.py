"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint directory `checkpoint-STEP/` holds
    adapter_model.safetensors, adapter_config.json   the adapter (PEFT format, loadable alone)
    training_state.pt      optimizer, scheduler and GradScaler state (tensors and numbers only)
    optimizer/             --shard fsdp only: AdamW's state, one file of shards per process
                           (torch.distributed.checkpoint); training_state.pt then has none
    rng_state_rank{R}.pt   each process's random generators (dropout masks continue the same)
    trainer_state.json     step, data position, and the run's identity (model, targets, rank...)

Atomicity: everything is written into a hidden temporary directory, which is then renamed to
`checkpoint-STEP` in one `os.rename`. A crash mid-save leaves a stray temporary directory,
never a half-written checkpoint, and the previous checkpoint stays valid.

Trust, but verify: a file can still be damaged after the rename (a power loss before the disk
cache was flushed leaves an empty `training_state.pt`). So a checkpoint counts as intact only
when every file *loads*, and `--resume auto` falls back to the newest intact one, with a warning.

Loading uses `torch.load(weights_only=True)`: only tensors and plain containers are
unpickled, so a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    atomic_write_bytes,
    load_adapter,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
    weights_problem,
)
from ..errors import UserError
from .distributed import barrier
from .sharding import load_sharded_optimizer, save_sharded_optimizer

STATE_FILE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
SHARDED_OPTIMIZER = "optimizer"  # a torch.distributed.checkpoint directory (--shard fsdp)
# Without process 0's random state the resumed run would draw other dropout masks and batches:
# it would train, but not as the uninterrupted run would have, so that file is required too.
REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_FILE, TRAINER_STATE, "rng_state_rank0.pt")
PRUNED_PREFIX = ".pruned-"  # a checkpoint being deleted: renamed first, so a kill mid-way is clear
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def tmp_dir_for(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f".tmp-checkpoint-{step}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_adapter(run, out_dir: Path) -> None:
    """The run's adapter into `out_dir`, written by process 0. Every process must call this:
    under FSDP each holds shards of the LoRA weights, and gathering them is a collective."""
    tensors = adapter_state_dict(run.model)
    problem = weights_problem(tensors)  # the rule infer.py reads adapters by (adapter.py)
    if problem:
        raise UserError(
            f"training diverged: the adapter's {problem}, so it was not saved as the run's result "
            f"(infer.py would refuse it). Lower --lr (now {run.cfg.lr:g}) or --max-grad-norm, then "
            f"train again with --overwrite"
        )
    if run.dist.is_main:
        save_adapter(run.model, out_dir, tensors=tensors, **run.adapter_meta)


def _write_checkpoint_files(run, tmp: Path, adapter: dict) -> None:
    """Main process: adapter, optimizer/scheduler/scaler state and the step into `tmp`."""
    save_adapter(run.model, tmp, tensors=adapter, **run.adapter_meta)
    state = {
        # Under FSDP each process writes its own shards of AdamW's state (save_checkpoint).
        "optimizer": None if run.sharded else run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
    }
    save_torch(state, tmp / STATE_FILE)
    text = json.dumps(asdict(run.state), indent=2) + "\n"
    atomic_write_bytes(tmp / TRAINER_STATE, text.encode())


def save_torch(obj, path: Path) -> None:
    """`torch.save` through `atomic_write_bytes`: whole or absent, and a full disk is an OSError
    naming the file (torch.save writing to a path reports it as a RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_checkpoint(run) -> Path:
    """Write `checkpoint-STEP/` atomically (all processes call this; each adds its RNG state)."""
    step = run.state.step
    tmp = tmp_dir_for(run.out, step)
    adapter = adapter_state_dict(run.model)  # a collective under FSDP: before the main-only part
    try:
        if run.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            _write_checkpoint_files(run, tmp, adapter)
        barrier()
        save_torch(rng_state(), tmp / f"rng_state_rank{run.dist.rank}.pt")
        if run.sharded:
            save_sharded_optimizer(run, tmp / SHARDED_OPTIMIZER)
        barrier()
    except OSError:  # e.g. the disk is full: leave no half-written checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run.dist.is_main:
        finalize_checkpoint(run.out, step)
        prune_checkpoints(run.out, run.cfg.keep_last)
    barrier()
    return run.out / f"checkpoint-{step}"


def resume_checkpoint(run, path: Path) -> dict:
    """Load adapter, optimizer, scheduler, scaler and RNG state; returns the saved trainer state.

    The checkpoint's identity (model, data, LoRA shape, learning rate, batch layout, seed...; see
    `run.run_identity`) must equal this run's: resuming with other settings would silently train
    something that is neither run. Each difference is named.
    """
    saved = read_trainer_state(path)
    before = saved.get("identity", {})
    # A key the checkpoint lacks was not recorded by the version that wrote it: not comparable.
    diffs = [
        f"{k} was {before[k]!r}, now {v!r}"
        for k, v in run.state.identity.items()
        if k in before and before[k] != v
    ]
    if diffs:
        raise UserError(
            f"cannot resume from {path}: this run's settings differ from the checkpoint's "
            f"({'; '.join(diffs)}). Resume with the same settings (see train_args.json), "
            f"or start over with --overwrite"
        )
    load_adapter(run.model, path)
    opt_state, rng = load_checkpoint_state(path, run.dist.rank, run.device)
    if (opt_state["optimizer"] is None) != run.sharded:
        raise UserError(
            f"cannot resume from {path}: it was saved "
            f"{'with' if opt_state['optimizer'] is None else 'without'} --shard fsdp; "
            f"resume it the same way, or start over with --overwrite"
        )
    if run.sharded:
        load_sharded_optimizer(run, path / SHARDED_OPTIMIZER)
    else:
        run.optimizer.load_state_dict(opt_state["optimizer"])
    run.scheduler.load_state_dict(opt_state["scheduler"])
    if run.scaler is not None and opt_state.get("scaler"):
        run.scaler.load_state_dict(opt_state["scaler"])
    set_rng_state(rng)
    return saved


def finalize_checkpoint(output_dir, step: int) -> Path:
    """Main process: make the checkpoint visible in one rename."""
    tmp, final = tmp_dir_for(output_dir, step), Path(output_dir) / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (e.g. an interrupt right after a save)
        delete_checkpoint(final)
    os.rename(tmp, final)
    return final


def delete_checkpoint(path: Path) -> None:
    """Rename, then delete: `rmtree` goes file by file, and a kill half-way must leave a name that
    says "being deleted" (removed at the next start), not a `checkpoint-N` missing files."""
    doomed = path.with_name(f"{PRUNED_PREFIX}{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def step_of(path: Path) -> int:
    """N of `checkpoint-N`."""
    return int(_CKPT_RE.match(Path(path).name).group(1))


def has_all_files(path: Path) -> bool:
    """Every file a checkpoint needs is there (cheap; `checkpoint_problem` also loads them)."""
    return all((Path(path) / f).is_file() for f in REQUIRED_FILES)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None when every file loads."""
    path = Path(path)
    if not path.is_dir():
        return "no such directory"
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        read_trainer_state(path)
        read_adapter_config(path)
        read_adapter_tensors(path)
        state = _load(path / STATE_FILE, "cpu")
        for rng_file in sorted(path.glob("rng_state_rank*.pt")):
            _load(rng_file, "cpu")
    except UserError as e:
        return str(e)
    sharded = isinstance(state, dict) and state.get("optimizer", ...) is None
    if sharded and not (path / SHARDED_OPTIMIZER / ".metadata").is_file():
        return f"{SHARDED_OPTIMIZER}/.metadata missing (the sharded optimizer state)"
    return None


def newest_intact_checkpoint(checkpoints: list[Path], notes: list[str]) -> Path | None:
    """The newest checkpoint whose files all load; a note for each damaged one skipped."""
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        notes.append(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


def checkpoint_dirs(output_dir) -> list[Path]:
    """Every `checkpoint-STEP` directory in `output_dir`, complete or not, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir()]


def list_checkpoints(output_dir) -> list[Path]:
    """Checkpoints in `output_dir` with all their files, oldest first."""
    return [p for p in checkpoint_dirs(output_dir) if has_all_files(p)]


def prune_checkpoints(output_dir, keep_last: int) -> None:
    if keep_last and keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            delete_checkpoint(old)


def read_trainer_state(ckpt: Path) -> dict:
    try:
        state = json.loads((Path(ckpt) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} is unreadable: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"checkpoint {ckpt}: {TRAINER_STATE} has no step")
    return state


def load_checkpoint_state(ckpt: Path, rank: int, map_location) -> tuple[dict, dict | None]:
    """(optimizer/scheduler/scaler state, this rank's RNG state or None)."""
    ckpt = Path(ckpt)
    if not has_all_files(ckpt):
        raise UserError(f"{ckpt} is not a complete checkpoint")
    state = _load(ckpt / STATE_FILE, map_location)
    rng_file = ckpt / f"rng_state_rank{rank}.pt"
    if not rng_file.is_file():  # saved by fewer processes than this run has
        raise UserError(
            f"cannot resume {ckpt} exactly: it has no {rng_file.name} (it was saved by fewer "
            f"processes); resume with the process count it was saved with"
        )
    return state, _load(rng_file, "cpu")


def _load(path: Path, map_location):
    """`torch.load` of tensors and plain containers only; a damaged file is a UserError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load's errors for an empty, truncated or garbled file vary
        raise UserError(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None
