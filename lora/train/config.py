"""Every setting of a training run, with its default, in one place.

`TrainConfig` is the single source of truth: `train.py`'s command-line flags are generated from
its fields (name, type, default and help), and a YAML or JSON file passed with `--config` sets
the same fields. Precedence, lowest first: the defaults here, the config file, the command line.

A finished run's `train_args.json` is itself a valid config: its `"args"` are exactly these
fields, so `python train.py --config out/train_args.json --output out2` reruns it.

This module imports neither torch nor transformers, so `train.py --help` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import UserError
from ..spec import (
    DEFAULT_ALPHA,
    DEFAULT_DROPOUT,
    DEFAULT_RANK,
    DEFAULT_TARGETS,
    QUANTIZE_CHOICES,
    LoRASpec,
)

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
SHARD_CHOICES = ("ddp", "fsdp")  # under torchrun: whole model per process, or sharded (sharding.py)


def _opt(default, help: str, group: str, **flag):
    """A config field with what its command-line flag needs (help, group, choices, flag name)."""
    return field(default=default, metadata={"help": help, "group": group, **flag})


@dataclass
class TrainConfig:
    # data
    data: str = _opt(
        "data/chinese_med.json",
        "training file(s): JSON array, JSONL or CSV (Alpaca, messages, ShareGPT, or --columns); "
        "several: a.json,b.jsonl:0.3 (weight = share of that file's rows per epoch, >1 repeats)",
        "data",
    )
    val_data: str | None = _opt(None, "validation file (same formats)", "data")
    val_size: float = _opt(
        0.0,
        "hold out this fraction (<1) or count (>=1) of --data for validation",
        "data",
        kind="number",
    )
    columns: str | None = _opt(
        None,
        "map other columns, e.g. prompt=Question,response=Response,reasoning=Complex_CoT (fields: "
        "prompt, input, response, reasoning, system); for one of several files: "
        "b.csv:prompt=Q,response=A (';' between files)",
        "data",
    )
    template: str = _opt(
        "auto",
        "prompt template: chat = tokenizer's chat template; plain = Instruction/Input/Answer",
        "data",
        choices=("auto", "chat", "plain"),
    )
    system: str | None = _opt(None, "system prompt for every row (recorded in the adapter)", "data")
    enable_thinking: bool = _opt(False, "Qwen3: keep thinking mode on in the chat template", "data")
    max_len: int = _opt(
        1024,
        "max tokens per row; longer rows lose old context first, then the answer's tail",
        "data",
    )
    strict: bool = _opt(False, "stop at the first bad row instead of skipping it", "data")
    dedup: bool = _opt(False, "drop exact duplicate rows (always counted)", "data")
    encoding: str | None = _opt(
        None,
        "force the file encoding, e.g. gbk (unset: UTF-8, else GB18030 when the text reads as Chinese)",
        "data",
    )
    drop_cut_answers: bool = _opt(
        False, "drop rows whose answer --max-len cuts (off: keep the part that fits)", "data"
    )
    cache: bool = _opt(
        True, "reuse tokenized data prepared before from the same file and settings", "data"
    )
    cache_dir: str | None = _opt(
        None,
        "where prepared data is cached (default: $QWEN_LORA_CACHE or ~/.cache/qwen-lora/data)",
        "data",
    )
    # model and LoRA
    model: str = _opt(DEFAULT_MODEL, "hub id or local checkpoint directory", "model and LoRA")
    targets: str = _opt(
        ",".join(DEFAULT_TARGETS), "comma-separated module names, or all-linear", "model and LoRA"
    )
    rank: int = _opt(DEFAULT_RANK, "LoRA rank r", "model and LoRA")
    alpha: float = _opt(DEFAULT_ALPHA, "LoRA alpha (scaling = alpha / rank)", "model and LoRA")
    dropout: float = _opt(DEFAULT_DROPOUT, "dropout on the LoRA input", "model and LoRA")
    rslora: bool = _opt(False, "rank-stabilised scaling alpha / sqrt(rank)", "model and LoRA")
    trust_remote_code: bool = _opt(
        False,
        "allow model code from the checkpoint (off: only transformers' own code runs)",
        "model and LoRA",
    )
    quantize: str = _opt(
        "none",
        "QLoRA: store the frozen base in 4-bit NF4 or 8-bit (needs bitsandbytes)",
        "model and LoRA",
        choices=QUANTIZE_CHOICES,
    )
    lora_plus_ratio: float | None = _opt(
        None,
        "LoRA+: B's learning rate is this many times --lr, A's stays --lr (the paper suggests 16); off by default",
        "model and LoRA",
    )
    dora: bool = _opt(
        False,
        "DoRA: a trainable magnitude per output row on top of LoRA's direction update (see lora/dora.py)",
        "model and LoRA",
    )
    # training
    output: str = _opt("out", "output directory", "training")
    epochs: float = _opt(3.0, "passes over the data", "training")
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)", "training")
    batch_size: int = _opt(4, "rows per micro-batch (per process under torchrun)", "training")
    grad_accum: int = _opt(4, "micro-batches per optimizer step", "training")
    lr: float = _opt(2e-4, "peak learning rate", "training")
    warmup: float = _opt(
        0.03, "warmup steps (>=1) or fraction of total steps (<1)", "training", kind="number"
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay", "training")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0 disables)", "training")
    precision: str = _opt(
        "auto",
        "auto: bf16 on GPUs with native bf16, else fp16 + GradScaler; fp32 on CPU (bf16/fp16 also run on CPU: half the memory, slower)",
        "training",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    grad_checkpointing: bool = _opt(
        False, "recompute activations in backward to save memory", "training"
    )
    shard: str = _opt(
        "ddp",
        "under torchrun: ddp = every process holds the whole model; fsdp = the model sharded across processes (FSDP2), for models bigger than one GPU",
        "training",
        choices=SHARD_CHOICES,
    )
    fsdp_offload: bool = _opt(
        False,
        "--shard fsdp: keep the weight shards in CPU memory, copied to the GPU layer by layer (largest models; slower)",
        "training",
    )
    seed: int = _opt(42, "seed for shuffling, dropout and the validation split", "training")
    group_by_length: bool = _opt(
        True, "length-grouped batches (off: plain shuffled batches)", "training"
    )
    device: str = _opt("auto", "auto, cpu or cuda", "training")
    loss_chunk: int | None = _opt(
        None, "rows of logits per loss chunk (default: sized from the vocabulary)", "training"
    )
    dry_run: bool = _opt(
        False,
        "read and prepare the data, check every setting against the model's config, print the "
        "data summary, the steps and the memory estimate, then stop before loading the weights",
        "training",
    )
    # evaluation and checkpoints
    eval_every: int = _opt(
        0, "validate every N steps (0: only at the end)", "evaluation and checkpoints"
    )
    save_every: int = _opt(
        0, "checkpoint every N steps (0: only on interrupt)", "evaluation and checkpoints"
    )
    keep_last: int = _opt(
        2, "keep only the newest N checkpoints (0 keeps all)", "evaluation and checkpoints"
    )
    resume: str | None = _opt(
        None,
        "'auto' (newest checkpoint in --output) or a checkpoint directory",
        "evaluation and checkpoints",
    )
    overwrite: bool = _opt(
        False, "replace a previous run in --output", "evaluation and checkpoints"
    )
    stop_after_steps: int | None = _opt(
        None,
        "save a checkpoint and stop after N steps of this invocation (time-limited machines)",
        "evaluation and checkpoints",
    )
    early_stop: int = _opt(
        0,
        "stop after N validations without a lower validation loss; the best adapter becomes the "
        "run's result (needs --val-data or --val-size, and --eval-every; 0: off)",
        "evaluation and checkpoints",
    )
    progress: bool = _opt(True, "progress bar", "evaluation and checkpoints")
    report_to: str = _opt(
        "none",
        "also send metrics.jsonl's records and the settings to tensorboard, wandb and/or swanlab "
        "(comma list; each needs its package)",
        "evaluation and checkpoints",
    )

    def lora_spec(self) -> LoRASpec:
        """The adapters this run injects (inject.py)."""
        return LoRASpec(self.targets, self.rank, self.alpha, self.dropout, self.rslora, self.dora)


def number(text: str) -> float:
    """An int if it looks like one (a count), else a float (a fraction)."""
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _flag_type(f) -> type:
    """The scalar type of a field annotation such as `int | None` (annotations are strings here)."""
    base = f.type.split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field: `max_len` becomes `--max-len`, booleans become on/off pairs."""
    groups = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"])
        )
        flag = "--" + f.name.replace("_", "-")
        if _flag_type(f) is bool:
            # --x / --no-x, so a config file's true can be overridden on the command line.
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"]
            )
            continue
        kind = number if meta.get("kind") == "number" else _flag_type(f)
        group.add_argument(
            flag, type=kind, default=f.default, choices=meta.get("choices"), help=meta["help"]
        )


def read_config_file(path) -> dict:
    """Fields from a YAML or JSON file (or a previous run's train_args.json), checked by name."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml  # PyYAML comes with transformers; only config files need it

            values = yaml.safe_load(text)
    except Exception as e:  # json and yaml raise their own error types, with line and column
        raise UserError(
            f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if isinstance(values, dict) and isinstance(values.get("args"), dict):
        values = values["args"]  # a run's train_args.json: {"args": {...}, "finished": ..., ...}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of settings (field: value)")
    values = from_other_tools({k.replace("-", "_"): v for k, v in values.items()}, path)
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {', '.join(map(did_you_mean, unknown))}; "
                        f"see python train.py --help")  # fmt: skip
    problems = [p for k, v in values.items() if (p := _type_problem(known[k], v))]
    if problems:
        raise UserError(f"--config {path}: {'; '.join(problems)}")
    return values


# Other tools' names for our settings (TRL / transformers' TrainingArguments, LLaMA-Factory, peft),
# so a config written for them reads here. A value that needs translating has a function.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lora_rank": "rank", "lora_r": "rank", "r": "rank",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target": "targets",
    "target_modules": "targets", "cutoff_len": "max_len", "max_seq_length": "max_len",
    "max_length": "max_len", "output_dir": "output", "warmup_ratio": "warmup",
    "warmup_steps": "warmup", "model_name_or_path": "model", "gradient_checkpointing": "grad_checkpointing",
    "save_steps": "save_every", "eval_steps": "eval_every", "save_total_limit": "keep_last",
    "use_rslora": "rslora", "use_dora": "dora", "resume_from_checkpoint": "resume",
    "bf16": "precision", "fp16": "precision",
}  # fmt: skip


def _alias_value(key: str, value):
    """Values whose meaning differs: `bf16: true` is our precision bf16, LLaMA-Factory's
    `lora_target: all` our all-linear, a list of target modules our comma list."""
    if key in ("bf16", "fp16"):
        return key if value is True else None  # `bf16: false` asks for nothing
    if key in ("lora_target", "target_modules"):
        value = ",".join(value) if isinstance(value, list) else value
        return "all-linear" if value in ("all", "all-linear") else value
    return value


def from_other_tools(values: dict, path) -> dict:
    """Settings under other tools' names renamed to ours; said once, on stderr."""
    renamed, out = [], {}
    for key, value in values.items():
        ours = ALIASES.get(key) if key not in {f.name for f in fields(TrainConfig)} else None
        if ours is None:
            out[key] = value
            continue
        value = _alias_value(key, value)
        if value is None:
            continue
        if ours in out or ours in values:
            raise UserError(f"--config {path}: {key} and {ours} both set {ours}; keep one")
        out[ours] = value
        renamed.append(f"{key} as {ours}")
    if renamed:
        print(f"--config {path}: read {', '.join(renamed)}", file=sys.stderr)
    return out


def did_you_mean(key: str) -> str:
    names = [f.name for f in fields(TrainConfig)] + list(ALIASES)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"{key} (did you mean {ALIASES.get(close[0], close[0])}?)" if close else key


def _type_problem(f, value) -> str | None:
    """A config file's value against the field's type, strictly: YAML's `yes`/`no` are booleans
    already, but a JSON "no" is a string, and reading it as true would invert the setting."""
    if value is None and ("None" in f.type or f.default is None):
        return None
    kind = f.metadata.get("kind") or _flag_type(f).__name__
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    words = {"bool": "true or false", "int": "an integer", "float": "a number",
             "number": "a number", "str": "a string"}  # fmt: skip
    return None if ok else f"{f.name} must be {words[kind]}, got {value!r}"


MIN_MAX_LEN = 16  # a chat prompt's scaffolding alone takes a dozen tokens


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that would train something other than what was asked, before any loading.

    Each rule names the flag, its valid range and the value given. Without these checks a few
    values are silently reinterpreted: `--max-steps 0` trains for --epochs, `--max-len 0` means
    "no limit", `--val-size 1.5` holds out one row, `--lr nan` trains nothing at all.
    """
    problems = [
        f"--{name.replace('_', '-')} must be {rule}, got {getattr(cfg, name)!r}"
        for name, ok, rule in _RULES
        if getattr(cfg, name) is not None and not _safe(ok, getattr(cfg, name))
    ]
    problems += _val_size_problem(cfg.val_size)
    problems += _early_stop_problem(cfg)
    from ..data.mixture import parse_data
    from .tracking import parse_report_to

    problems += _parse_problem(parse_report_to, cfg.report_to)
    problems += _parse_problem(parse_data, cfg.data)
    problems += _combination_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _safe(ok, value) -> bool:
    """`ok(value)`, False when the value is of a wrong type (e.g. a string from a config file)."""
    try:
        return bool(ok(value))
    except TypeError:
        return False


# (field, check, the valid range as the error message states it); None values are not checked.
_RULES = [
    ("lr", lambda v: _finite_number(v) and v > 0, "a finite number > 0"),
    ("batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("grad_accum", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("epochs", lambda v: _finite_number(v) and v > 0, "a finite number > 0"),
    ("max_steps", lambda v: _int(v) and v >= 1, "an integer >= 1 (or absent: train --epochs)"),
    ("max_len", lambda v: _int(v) and v >= MIN_MAX_LEN, f"an integer >= {MIN_MAX_LEN}"),
    ("weight_decay", lambda v: _finite_number(v) and v >= 0, "a finite number >= 0"),
    ("warmup", lambda v: _finite_number(v) and v >= 0, "a fraction in [0, 1) or a count >= 1"),
    ("max_grad_norm", lambda v: _finite_number(v) and v >= 0, "a finite number >= 0 (0 disables)"),
    ("rank", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("alpha", lambda v: _finite_number(v) and v > 0, "a finite number > 0"),
    ("dropout", lambda v: _finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("eval_every", lambda v: _int(v) and v >= 0, "an integer >= 0 (0: only at the end)"),
    ("save_every", lambda v: _int(v) and v >= 0, "an integer >= 0 (0: only on interrupt)"),
    ("keep_last", lambda v: _int(v) and v >= 0, "an integer >= 0 (0 keeps all)"),
    ("stop_after_steps", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("loss_chunk", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("early_stop", lambda v: _int(v) and v >= 0, "an integer >= 0 (0: off)"),
    ("shard", lambda v: v in SHARD_CHOICES, " or ".join(SHARD_CHOICES)),
]


def _val_size_problem(v) -> list[str]:
    """--val-size: 0 (none), a fraction in (0, 1), or a whole count >= 1 (checked against the
    data size once it is read). `1.5` is neither: it used to mean "one row"."""
    fraction = _finite_number(v) and 0 < v < 1
    count = _finite_number(v) and v >= 1 and float(v).is_integer()
    if v == 0 or fraction or count:
        return []
    return [f"--val-size must be 0, a fraction in (0, 1) or a whole count >= 1, got {v!r}"]


def _early_stop_problem(cfg) -> list[str]:
    """--early-stop counts validations, so it needs validation rows and evaluations during the run."""
    if not (_int(cfg.early_stop) and cfg.early_stop > 0):
        return []
    if not (cfg.val_data or cfg.val_size):
        return ["--early-stop needs validation data: pass --val-data FILE or --val-size 0.1"]
    if not cfg.eval_every:
        return ["--early-stop needs validations during the run: pass --eval-every N"]
    return []


def _parse_problem(parse, spec) -> list[str]:
    """What a flag's own parser (tracker names, data files and weights) says is wrong with it;
    the parsers read nothing and import no tracker, so this is cheap."""
    try:
        parse(spec)
    except UserError as e:
        return [str(e)]
    return []


def _combination_problems(cfg) -> list[str]:
    """Flags that are each valid but do not work together."""
    problems = []
    if cfg.shard == "fsdp" and cfg.quantize != "none":
        problems.append(
            f"--quantize {cfg.quantize} does not work with --shard fsdp (FSDP cannot shard "
            f"bitsandbytes' packed weights): use --shard ddp, or no --quantize"
        )
    if cfg.fsdp_offload and cfg.shard != "fsdp":
        problems.append("--fsdp-offload needs --shard fsdp")
    return problems
