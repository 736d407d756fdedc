"""Experiment tracking: `--report-to tensorboard,wandb,swanlab` sends metrics.jsonl's records there.

Each backend is an optional dependency, imported only when asked for, and checked before any
data or model loads: a missing package is a one-line error naming it. What a tracker receives
is exactly what `metrics.jsonl` holds (`MetricsLog` hands it every record it writes), plus the
run's settings (`TrainConfig`, as in train_args.json) once at the start. Only process 0 logs.

    tensorboard   event files in OUTPUT/tensorboard/ (`tensorboard --logdir OUTPUT/tensorboard`);
                  a resumed run purges the steps it trains again
    wandb         project "qwen-lora", run named after --output; WANDB_MODE=offline works offline
    swanlab       project "qwen-lora", run named after --output; SWANLAB_MODE=local (or offline)
                  keeps everything on this machine

Scalars are named by kind: `train/loss`, `train/lr`, ..., `eval/val_loss`, `eval/val_ppl`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import UserError

BACKENDS = {  # name: (module to import, the package pip installs)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "swanlab": ("swanlab", "swanlab"),
}
PROJECT = "qwen-lora"
TENSORBOARD_DIR = "tensorboard"


def parse_report_to(spec: str | None) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; 'none' or empty -> []."""
    names = [n.strip().lower() for n in (spec or "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(
            f"--report-to: unknown tracker {unknown[0]!r}; choose from {', '.join(BACKENDS)} or none"
        )
    return list(dict.fromkeys(names))


def import_backend(name: str):
    """The backend's module, or a one-line error naming the package to install."""
    module, package = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"--report-to {name} needs the {package} package: pip install {package}"
        ) from None


def check_backends(spec: str | None) -> None:
    """Fail before anything slow loads when a requested tracker is not installed."""
    for name in parse_report_to(spec):
        import_backend(name)


class Tracker:
    """Fans each metrics record out to the open backends, as scalars at the record's step."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        kind = record.get("kind", "train")
        scalars = {
            f"{kind}/{k}": float(v)
            for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float))
        }
        for sink in self.sinks:
            sink.log(scalars, record["step"])

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_tracker(spec: str | None, out: Path, settings: dict, resume_step: int) -> Tracker | None:
    """The trackers of `--report-to`, started with the run's settings; None when there are none."""
    openers = {"tensorboard": _TensorBoard, "wandb": _WandB, "swanlab": _SwanLab}
    names = parse_report_to(spec)
    if not names:
        return None
    return Tracker([openers[n](import_backend(n), Path(out), settings, resume_step) for n in names])


class _TensorBoard:
    def __init__(self, module, out: Path, settings: dict, resume_step: int):
        # purge_step: events from an interrupted run past its checkpoint are hidden, not doubled.
        purge = resume_step + 1 if resume_step else None
        self.writer = module.SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge)
        text = json.dumps(settings, indent=2, ensure_ascii=False, default=str)
        self.writer.add_text("settings", f"```\n{text}\n```", global_step=resume_step)

    def log(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, module, out: Path, settings: dict, resume_step: int):
        self.run = module.init(project=PROJECT, name=out.name, dir=str(out), config=settings)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _SwanLab:
    def __init__(self, module, out: Path, settings: dict, resume_step: int):
        self.module = module
        module.init(project=PROJECT, experiment_name=out.name, logdir=str(out / "swanlog"),
                    config=settings)  # fmt: skip

    def log(self, scalars: dict, step: int) -> None:
        self.module.log(scalars, step=step)

    def close(self) -> None:
        self.module.finish()
