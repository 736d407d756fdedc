"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint directory `checkpoint-STEP/` holds
    adapter_model.safetensors, adapter_config.json   the adapter (PEFT format, loadable alone)
    training_state.pt      optimizer, scheduler and GradScaler state (tensors and numbers only)
    rng_state_rank{R}.pt   each process's random generators (dropout masks continue the same)
    trainer_state.json     step, data position, and the run's identity (model, targets, rank...)

Atomicity: everything is written into a hidden temporary directory, which is then renamed to
`checkpoint-STEP` in one `os.rename`. A crash mid-save leaves a stray temporary directory,
never a half-written checkpoint, and the previous checkpoint stays valid.

Loading uses `torch.load(weights_only=True)`: only tensors and plain containers are
unpickled, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    atomic_write_bytes,
    load_adapter,
    save_adapter,
)
from .distributed import barrier
from .errors import UserError

STATE_FILE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
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


def _write_checkpoint_files(run, tmp: Path) -> None:
    """Main process: adapter, optimizer/scheduler/scaler state and the step into `tmp`."""
    save_adapter(run.model, tmp, **run.adapter_meta)
    torch.save(
        {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        },
        tmp / STATE_FILE,
    )
    text = json.dumps(asdict(run.state), indent=2) + "\n"
    atomic_write_bytes(tmp / TRAINER_STATE, text.encode())


def save_checkpoint(run) -> Path:
    """Write `checkpoint-STEP/` atomically (all processes call this; each adds its RNG state)."""
    step = run.state.step
    tmp = tmp_dir_for(run.out, step)
    if run.dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_checkpoint_files(run, tmp)
    barrier()
    torch.save(rng_state(), tmp / f"rng_state_rank{run.dist.rank}.pt")
    barrier()
    if run.dist.is_main:
        finalize_checkpoint(run.out, step)
        prune_checkpoints(run.out, run.cfg.keep_last)
    barrier()
    return run.out / f"checkpoint-{step}"


def resume_checkpoint(run, path: Path) -> dict:
    """Load adapter, optimizer, scheduler, scaler and RNG state; returns the saved trainer state.

    The checkpoint's identity (model, targets, rank, batch layout, ...) must equal this run's:
    resuming a different run would silently train something else.
    """
    saved = read_trainer_state(path)
    diffs = [
        f"{k}: checkpoint {saved.get('identity', {}).get(k)!r} vs now {v!r}"
        for k, v in run.state.identity.items()
        if saved.get("identity", {}).get(k) != v
    ]
    if diffs:
        raise UserError(
            f"cannot resume from {path}: the run differs ({'; '.join(diffs)}). Use --overwrite to start over"
        )
    load_adapter(run.model, path)
    opt_state, rng = load_checkpoint_state(path, run.dist.rank, run.device)
    run.optimizer.load_state_dict(opt_state["optimizer"])
    run.scheduler.load_state_dict(opt_state["scheduler"])
    if run.scaler is not None and opt_state.get("scaler"):
        run.scaler.load_state_dict(opt_state["scaler"])
    if rng is not None:
        set_rng_state(rng)
    return saved


def finalize_checkpoint(output_dir, step: int) -> Path:
    """Main process: make the checkpoint visible in one rename."""
    tmp, final = tmp_dir_for(output_dir, step), Path(output_dir) / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (e.g. an interrupt right after a save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def is_valid_checkpoint(path: Path) -> bool:
    return all(
        (path / f).is_file() for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_FILE, TRAINER_STATE)
    )


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and is_valid_checkpoint(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir, keep_last: int) -> None:
    if keep_last and keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} is unreadable: {e}") from None


def load_checkpoint_state(ckpt: Path, rank: int, map_location) -> tuple[dict, dict | None]:
    """(optimizer/scheduler/scaler state, this rank's RNG state or None)."""
    ckpt = Path(ckpt)
    if not is_valid_checkpoint(ckpt):
        raise UserError(f"{ckpt} is not a complete checkpoint")
    state = torch.load(ckpt / STATE_FILE, map_location=map_location, weights_only=True)
    rng_file = ckpt / f"rng_state_rank{rank}.pt"
    rng = (
        torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    )
    return state, rng
