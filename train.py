"""Fine-tune a Qwen model with LoRA: `python train.py --data data/chinese_med.json`.

A thin command line over `lora.train.loop.train`. Every flag is generated from a `TrainConfig`
field (`lora/train/config.py`), and `--config run.yaml` sets the same fields from a file; flags given
on the command line override the file.

`--help` and the checks of the flags need only Python's standard library, so they answer at once,
even outside the project's environment; torch and the rest load when there is something to do.
Without them (the system's python3 instead of .venv's) the run ends in one line that says how to
get them, and SIGTERM before training starts ends it as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import signal
import sys

from lora.errors import TrainingInterrupted, UserError, exit_status
from lora.train.config import TrainConfig, add_config_flags, read_config_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="LoRA fine-tuning for Qwen models (Qwen1.5/2/2.5/3) in plain PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file of settings (a run's train_args.json works too); flags override it",
    )
    add_config_flags(p)
    return p


def parse_config(argv=None) -> TrainConfig:
    """Defaults, then the --config file, then the command line."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    parser = build_parser()
    if config_file:
        parser.set_defaults(**read_config_file(config_file))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return TrainConfig(**args)


def interrupt(signum, frame):
    """SIGTERM before training starts (reading data, loading the model) ends the run as Ctrl-C
    does; once training runs, the loop's own handler saves a checkpoint first."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        cfg = parse_config(argv)
        from lora.train.loop import train  # torch loads only when there is something to train

        train(cfg)
    except (UserError, ModuleNotFoundError, OSError) as e:  # one line each (lora/errors.py)
        status = exit_status(e)
        if status is None:
            raise
        return status
    except TrainingInterrupted:
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
