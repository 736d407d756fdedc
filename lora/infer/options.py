"""Every flag of `infer.py`, declared as data: one table per group, read by `add_infer_flags`;
and `check_values`, the ranges those flags' values must be in.

As `TrainConfig` (train/config.py) does for training, this is the one place an inference flag,
its default and its help live. Generation defaults come from `GenerationSettings` (sampling.py),
the quantization choices from spec.py. No torch here, so `infer.py --help` answers at once.
"""

from __future__ import annotations

import argparse
import math
import re

from ..errors import UserError
from ..spec import QUANTIZE_CHOICES
from .sampling import GenerationSettings

_GEN = GenerationSettings()  # the one place the generation defaults live


def flag(name: str, help: str, **argparse_kwargs) -> tuple[str, str, dict]:
    """One row of a flag table: the flag, its help, and what argparse needs besides."""
    return name, help, argparse_kwargs


SWITCH = {"action": "store_true"}

FLAG_GROUPS: dict[str, list[tuple[str, str, dict]]] = {
    "adapter and base model": [
        flag("--adapter", "adapter directory (train.py's --output, or out/best)", required=True),
        flag("--model", "base model (default: the one recorded in the adapter)"),
    ],
    "what to ask": [
        flag("--prompt", "one question"),
        flag("--instruction", "Alpaca-style instruction (with --input)"),
        flag("--input", "Alpaca-style input for --instruction", default=""),
        flag("--file", "questions file (any format train.py reads; answers become references)"),
        flag(
            "--output",
            "with --file: append answers here as JSONL; a rerun skips rows already answered "
            "(default: stdout)",
        ),
        flag(
            "--chat",
            "chat on standard input, one turn per line, from a terminal or piped in (what infer.py "
            "does when nothing else is asked); with --prompt or --file: chat after answering",
            **SWITCH,
        ),
        flag("--columns", "with --file: column mapping as in train.py"),
        flag(
            "--system",
            "system prompt (default: train.py --system, else the one most training rows had; "
            "'' for none)",
        ),
        flag(
            "--show-reasoning",
            "print the model's <think> reasoning before its answer (always kept in --file output)",
            **SWITCH,
        ),
    ],
    "modes": [
        flag(
            "--score",
            "with --file: score the answers against the file's own answers (reference NLL, "
            "BLEU-4, ROUGE, answer health) into NAME.score.json beside --output NAME.jsonl "
            "(without --output: score.json in the adapter's directory); with --compare for the "
            "base model too",
            **SWITCH,
        ),
        flag("--compare", "show the base model's answer beside the fine-tuned one", **SWITCH),
        flag(
            "--mcq",
            "multiple-choice exams (CMMLU/C-Eval CSV files or directories, or JSON/JSONL rows): "
            "accuracy per subject with 95%% intervals into mcq.json (in --output DIR, else the "
            "adapter's directory); with --compare the base model and the paired difference",
            nargs="+",
            metavar="PATH",
        ),
        flag(
            "--shots",
            "with --mcq: put the first K rows of each subject's dev file before the question",
            type=int,
            default=0,
        ),
        flag(
            "--merge",
            "merge LoRA into the weights before generating: faster; exact in fp32, rounded in "
            "bf16/fp16 (the logit difference is measured and printed)",
            **SWITCH,
        ),
        flag("--export", "write a merged standalone HF checkpoint to DIR", metavar="DIR"),
        flag(
            "--export-gguf",
            "write base + adapter as one GGUF file for llama.cpp, with an Ollama Modelfile beside it",
            metavar="FILE",
        ),
        flag(
            "--gguf-type",
            "weight type of --export-gguf (norms and biases stay f32)",
            default="f16",
            choices=["f32", "f16", "bf16", "q8_0"],
        ),
        flag(
            "--inspect",
            "what did training change? per-module ‖ΔW‖, spectra, ranks; writes inspect.json/.png",
            **SWITCH,
        ),
        flag(
            "--inspect-layers",
            "with --inspect: layers for the W0-SVD comparisons, 0,12,23 or all (default: first, "
            "middle, last)",
        ),
        flag(
            "--no-base",
            "with --inspect: read only the adapter file (fast; no ‖W0‖, no amplification)",
            **SWITCH,
        ),
    ],
    "generation": [
        flag(
            "--max-new-tokens",
            "stop after this many new tokens (an answer cut there is flagged)",
            type=int,
            default=_GEN.max_new_tokens,
        ),
        flag("--temperature", "0 = greedy; > 0 samples", type=float, default=_GEN.temperature),
        flag(
            "--top-p",
            "with --temperature: sample from the smallest set of tokens whose probabilities sum "
            "to this",
            type=float,
            default=_GEN.top_p,
        ),
        flag(
            "--top-k",
            "with --temperature: sample from the k most likely tokens (0 = off)",
            type=int,
            default=_GEN.top_k,
        ),
        flag(
            "--repetition-penalty",
            "> 1 discourages repeating tokens (1 = off)",
            type=float,
            default=_GEN.repetition_penalty,
        ),
        flag("--seed", "random seed for sampling", type=int, default=0),
        flag("--batch-size", "questions per generate call with --file", type=int, default=8),
        flag("--device", "auto, cpu or cuda", default="auto"),
        flag(
            "--dtype",
            "base weights' dtype (auto: bf16 on GPU, fp32 on CPU)",
            default="auto",
            choices=["auto", "fp32", "bf16", "fp16"],
        ),
        flag(
            "--quantize",
            "load the base in 4-bit NF4 or 8-bit (QLoRA; needs bitsandbytes); --export and "
            "--merge always use the unquantized checkpoint",
            default="none",
            choices=QUANTIZE_CHOICES,
        ),
        flag(
            "--trust-remote-code",
            "allow model code from the checkpoint (off: only transformers' own code runs)",
            **SWITCH,
        ),
    ],
}


def add_infer_flags(parser: argparse.ArgumentParser) -> None:
    """Every row of `FLAG_GROUPS` as a flag of `parser`, in its group."""
    for title, rows in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name, help, kwargs in rows:
            group.add_argument(name, help=help, **kwargs)


def check_values(args) -> None:
    """Refuse values that would fail late (after the model loads) or silently do something else."""
    rules = [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
        ("--shots", args.shots, 0 <= args.shots <= 16, "an integer from 0 to 16"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
         "a finite number >= 0 (0 = greedy)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "a number in (0, 1]"),
        ("--top-k", args.top_k, args.top_k >= 0, "an integer >= 0 (0 = off)"),
        ("--repetition-penalty", args.repetition_penalty,
         math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0, "a finite number > 0"),
        ("--device", args.device, re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device),
         "auto, cpu, mps, cuda or cuda:N"),
    ]  # fmt: skip
    problems = [
        f"{flag} must be {rule}, got {value!r}" for flag, value, ok, rule in rules if not ok
    ]
    if problems:
        raise UserError("; ".join(problems))
