"""The output directory: is this a fresh run, the continuation of one, or a finished one?

`--output out/` holds one run. Before anything loads, we decide what the directory means:

    empty or missing                 a fresh run
    a finished run                   an error, unless --overwrite (replace it) or
                                     --resume auto (nothing to do, unless --max-steps grew)
    an unfinished run's checkpoints  an error, unless --resume auto (continue from the newest)
                                     or --overwrite

`train_args.json` records every setting, the library versions, the data summary and, at the
end, `"finished": true` with the final losses. Its `"args"` are a valid `--config` file.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from . import checkpoint as ckpt
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXTRA_FILE, atomic_write_bytes
from .errors import UserError

TRAIN_ARGS = "train_args.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss_curve.png"
OUR_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, EXTRA_FILE, TRAIN_ARGS, METRICS, LOSS_PLOT)


@dataclass
class RunDirPlan:
    """What to do with `--output`: resume from a checkpoint, or report a finished run."""

    resume_from: Path | None = None
    finished_steps: int | None = None  # set when the directory holds a finished run to keep


def plan_run_dir(out: Path, cfg) -> RunDirPlan:
    """Decide fresh / resume / finished from the directory's contents and the flags."""
    args = read_train_args(out)
    finished = bool(args.get("finished"))
    done_steps = args.get("state", {}).get("step", 0)
    checkpoints = ckpt.list_checkpoints(out)
    if cfg.overwrite:
        return RunDirPlan()
    if cfg.resume and cfg.resume != "auto":
        path = Path(cfg.resume)
        if not ckpt.is_valid_checkpoint(path):
            raise UserError(f"--resume {path}: not a complete checkpoint directory")
        return RunDirPlan(resume_from=path)
    if cfg.resume == "auto":
        if finished and (cfg.max_steps is None or cfg.max_steps <= done_steps):
            return RunDirPlan(finished_steps=done_steps)
        return RunDirPlan(resume_from=checkpoints[-1] if checkpoints else None)
    if finished:
        raise UserError(
            f"{out} already holds a finished run; pass --overwrite to replace it, or another --output"
        )
    if checkpoints:
        raise UserError(
            f"{out} holds checkpoints of an unfinished run; pass --resume auto to continue it, or --overwrite"
        )
    return RunDirPlan()


def clean_run_dir(out: Path) -> None:
    """Remove what a previous run wrote (only our own files: the user may keep others there)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or p.name == "best":
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in OUR_FILES:
            p.unlink()


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
