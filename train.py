"""Fine-tune a Qwen model with LoRA: `python train.py --data data/chinese_med.json`.

A thin command line over `lora.trainer.train`; every flag maps to one `TrainConfig` field.
"""

from __future__ import annotations

import argparse
import sys

from lora.errors import UserError
from lora.model import DEFAULT_MODEL


def number(text: str) -> float:
    """An int if it looks like one (a count), else a float (a fraction)."""
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="LoRA fine-tuning for Qwen models (Qwen1.5/2/2.5/3) in plain PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", default="data/chinese_med.json", help="training file: JSON array, JSONL or CSV (Alpaca, messages, ShareGPT, or --columns)")
    d.add_argument("--val-data", default=None, help="validation file (same formats)")
    d.add_argument("--val-size", type=number, default=0, help="hold out this fraction (<1) or count (>=1) of --data for validation")
    d.add_argument("--columns", default=None, help="map other columns, e.g. prompt=Question,response=Complex_CoT+Response (fields: prompt, input, response, system)")
    d.add_argument("--template", default="auto", choices=["auto", "chat", "plain"], help="prompt template: chat = tokenizer's chat template; plain = Instruction/Input/Answer")
    d.add_argument("--system", default=None, help="system prompt for every row (recorded in the adapter)")
    d.add_argument("--enable-thinking", action="store_true", help="Qwen3: keep thinking mode on in the chat template")
    d.add_argument("--max-len", type=int, default=1024, help="max tokens per row; longer rows are truncated, keeping the end token")
    d.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    d.add_argument("--dedup", action="store_true", help="drop exact duplicate rows (always counted)")
    d.add_argument("--encoding", default=None, help="force the file encoding (default: detect UTF-8 / GB18030)")

    m = p.add_argument_group("model and LoRA")
    m.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint directory")
    m.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    m.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    m.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scaling = alpha / rank)")
    m.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    m.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(rank)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off: only transformers' own code runs)")

    t = p.add_argument_group("training")
    t.add_argument("--output", default="out", help="output directory")
    t.add_argument("--epochs", type=float, default=3, help="passes over the data")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (per process under torchrun)")
    t.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    t.add_argument("--warmup", type=number, default=0.03, help="warmup steps (>=1) or fraction of total steps (<1)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 (or fp16) on GPU, fp32 on CPU")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    t.add_argument("--seed", type=int, default=42, help="seed for shuffling, dropout and the validation split")
    t.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", help="plain shuffled batches instead of length-grouped ones")

    c = p.add_argument_group("evaluation and checkpoints")
    c.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: only at the end)")
    c.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only on interrupt)")
    c.add_argument("--keep-last", type=int, default=2, help="keep only the newest N checkpoints (0 keeps all)")
    c.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --output) or a checkpoint directory")
    c.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    c.add_argument("--stop-after-steps", type=int, default=None, help="save a checkpoint and stop after N steps of this invocation (time-limited machines)")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lora.trainer import TrainConfig, TrainingInterrupted, train

    try:
        train(TrainConfig(**vars(args)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted:
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
