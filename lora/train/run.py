"""Everything a training run holds, built once by `setup`, so the loop can stay short.

A `Run` carries the model and its LoRA-wrapped loss, the optimizer, the learning-rate schedule,
the GradScaler (fp16 only), the autocast context, the device, the process's place under
torchrun, the output directory and the progress so far (`RunState`). Helpers take the run
instead of long argument lists, and `loop.py` reads as the pseudo-code in its docstring.

`setup` does, in order, the cheapest and most often failing first:

    prepare      the settings against the model's config: the model built on the meta device
                 (shapes, no weights), LoRA injected into it, targets, rank and --quantize
                 checked in a second; then the tokenizer and the data
    new_run      the run's length in steps and its warmup
    attach_model the weights loaded, LoRA injected, DDP or FSDP under torchrun, AdamW, schedule
    resume       from a checkpoint, if asked
    report       the startup summary and the memory estimate
    write        train_args.json, heldout.jsonl, metrics.jsonl: the run's first writes

`dry_run` (--dry-run) stops after the report, with the estimate taken from the skeleton.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..data.batching import collate, global_batches
from ..data.mixture import Mixture, parse_data
from ..data.prepare import prepare_data
from ..data.prompt import PromptFormat, resolve_template, stop_token_ids
from ..data.records import write_rows
from ..errors import UserError
from ..inject import LoRAReport, apply_lora, lora_parameters
from ..lora_plus import check_lora_plus_ratio, optimizer_param_groups
from ..model import (
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    model_skeleton,
)
from ..quantize import quantization_config
from .activations import enable_activation_checkpointing, keep_less_for_backward
from .checkpoint import resume_checkpoint
from .config import TrainConfig
from .cost import estimate, estimate_lines
from .distributed import DistInfo, barrier, shard_rows
from .loss import CausalLMLoss
from .metrics import MetricsLog, startup_summary
from .precision import DTYPES, autocast_for
from .rundir import (
    HELDOUT,
    METRICS,
    RunDirPlan,
    RunRecord,
    clean_run_dir,
    plan_run_dir,
    write_train_args,
)
from .schedule import warmup_cosine, warmup_steps
from .sharding import grad_scaler, model_load_device, wrap_for_training
from .tracking import open_tracker
from .vocab_storage import NARROW_DTYPES, keep_vocab_matrices_narrow


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint as `trainer_state.json`."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # the next batch of `epoch` to train on
    best_val_loss: float | None = None
    best_step: int | None = None  # the step whose adapter is in best/
    evals_since_best: int = 0  # validations without a lower loss (--early-stop)
    identity: dict = field(default_factory=dict)  # what a resumed run must share with this one


@dataclass
class Run:
    """A training run. `new_run` fills what needs no weights (a dry run stops there, its model a
    skeleton on the meta device); `setup` then puts the loaded model and what trains it in."""

    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    precision: str
    out: Path
    log: object
    tokenizer: object
    model: torch.nn.Module
    train_set: list
    val_set: list
    lengths: list[int]
    record: RunRecord
    metrics: MetricsLog
    mixture: Mixture  # which rows each epoch takes from each --data file
    loss: CausalLMLoss | None = None  # decoder + supervised-only loss: (loss sum, token count)
    forward: torch.nn.Module | None = None  # `loss`, wrapped in DDP or sharded by FSDP
    params: list = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    autocast: object = None
    adapter_meta: dict = field(default_factory=dict)  # what save_adapter records besides tensors
    scheduler: object = None  # warmup + cosine, once the number of steps is known
    total_steps: int = 0
    warmup_steps: int = 0  # the first optimizer steps, at a rising learning rate
    state: RunState = field(default_factory=RunState)
    first_step: int = 0  # steps done before this process began (a resumed run's checkpoint)
    last_loss: float | None = None  # of the last finite step
    bad_steps: int = 0  # non-finite steps in a row
    started: float = 0.0  # time.perf_counter() when train() began (the summary's wall time)

    @property
    def sharded(self) -> bool:
        """FSDP: each process holds a shard of every weight (see sharding.py)."""
        return self.cfg.shard == "fsdp" and self.dist.enabled

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s global batches, deterministic given (seed, epoch).

        With weighted --data files the epoch's rows are first drawn (mixture.py); the batches
        are planned over those rows and map back to indices of the training set.
        """
        cfg = self.cfg
        plan = partial(global_batches, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                       group_by_length=cfg.group_by_length, world_size=self.dist.world_size)  # fmt: skip
        if self.mixture.plain:
            return plan(self.lengths)
        rows = self.mixture.epoch_rows(epoch).tolist()
        return [[rows[j] for j in b] for b in plan([self.lengths[i] for i in rows])]

    def rows_per_epoch(self) -> int:
        return sum(self.mixture.per_epoch())

    def micro_batches(self, window: list[list[int]]) -> list[dict]:
        """This process's share of each global batch of the window, padded into tensors."""
        # Multiples of 8 suit GPU tensor cores; on CPU they would only add padding.
        multiple = 8 if self.device.type == "cuda" else 1
        return [
            collate([self.train_set[i] for i in shard_rows(b, self.dist)], self.pad_id, multiple)
            for b in window
        ]


def _quiet(*args, **kwargs):
    pass


@dataclass
class Prepared:
    """What a run is before any weight loads (`prepare`): its data and the model's shape."""

    tokenizer: object
    fmt: PromptFormat
    train_set: object
    val_set: object
    data_summary: dict
    val_rows: list | None  # the rows --val-size held out, for heldout.jsonl
    skeleton: torch.nn.Module  # the model on the meta device, LoRA injected: shapes only
    report: LoRAReport  # what injecting LoRA into it did


def prepare(cfg: TrainConfig, precision: str, log) -> Prepared:
    """Everything that needs no weights, the cheapest checks first: the settings against the
    model's config (a second), then the tokenizer and the data (minutes on a big set)."""
    check_lora_plus_ratio(cfg.lora_plus_ratio)
    skeleton, report = check_against_model(cfg, precision)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    fmt = PromptFormat(resolve_template(tokenizer, cfg.template), cfg.system, cfg.enable_thinking)
    train_set, val_set, data_summary = prepare_data(cfg, tokenizer, fmt, log)
    val_rows = data_summary.pop("val_rows", None)  # too long for train_args.json on big sets
    return Prepared(tokenizer, fmt, train_set, val_set, data_summary, val_rows, skeleton, report)


def check_against_model(cfg: TrainConfig, precision: str) -> tuple[torch.nn.Module, LoRAReport]:
    """The settings that need only the model's config, checked before the data and the weights.

    --quantize: its packages are installed. Then the model is built on the meta device
    (`model_skeleton`: shapes, no weights) and LoRA is injected into it by the code training
    uses: a --targets name that matches no layer lists the model's linear layers, and a --rank
    above a target layer's smaller dimension is refused. Returns (skeleton, LoRAReport).
    """
    quantization_config(cfg.quantize, compute_dtype=DTYPES[precision])
    skeleton = model_skeleton(cfg.model, DTYPES[precision], cfg.trust_remote_code)
    # DoRA's magnitudes are computed from the weights, which a skeleton has not. Plain LoRA has
    # the same targets and shapes; the magnitudes (one per output row) are counted on top.
    report = apply_lora(skeleton, replace(cfg.lora_spec(), use_dora=False))
    check_rank_fits(skeleton, report.adapted_modules, cfg.rank)
    if cfg.dora:
        magnitudes = sum(skeleton.get_submodule(n).out_features for n in report.adapted_modules)
        report.trainable_params += magnitudes
        report.total_params += magnitudes
    return skeleton, report


def check_rank_fits(model: torch.nn.Module, names: list[str], rank: int) -> None:
    """--rank at most every target layer's smaller dimension. ΔW = B A has rank at most
    min(in, out): a larger r adds parameters and memory, not capacity (and only lowers α/r)."""
    dims = {n.rsplit(".", 1)[-1]: model.get_submodule(n) for n in names}
    name, layer = min(dims.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    limit = min(layer.in_features, layer.out_features)
    if rank > limit:
        raise UserError(
            f"--rank {rank} is larger than {name}'s smaller dimension ({layer.in_features} in, "
            f"{layer.out_features} out): its update B·A has rank at most {limit}, so a larger "
            f"rank adds parameters, not capacity; use --rank {limit} or less, or leave {name} "
            f"out of --targets"
        )


def new_run(cfg: TrainConfig, dist: DistInfo, device, precision: str, prepared: Prepared, log) -> Run:  # fmt: skip
    """The run around the prepared data, its length and warmup, the skeleton as its model."""
    p = prepared
    record = RunRecord(p.data_summary, p.report.trainable_params, p.report.total_params,
                       len(p.report.adapted_modules))  # fmt: skip
    run = Run(
        cfg=cfg, dist=dist, device=device, precision=precision, out=Path(cfg.output), log=log,
        tokenizer=p.tokenizer, model=p.skeleton, train_set=p.train_set, val_set=p.val_set,
        lengths=p.train_set.lengths.tolist(), record=record,
        metrics=MetricsLog(Path(cfg.output) / METRICS, writer=dist.is_main),
        mixture=build_mixture(cfg, p.data_summary, log),
    )  # fmt: skip
    run.total_steps = count_total_steps(run)
    run.warmup_steps = warmup_steps(cfg.warmup, run.total_steps)
    return run


def setup(cfg: TrainConfig, plan: RunDirPlan, dist: DistInfo, device, precision: str) -> Run:
    """Build the run: data, model with LoRA, optimizer, schedule; resume if asked."""
    log = print if dist.is_main else _quiet
    prepared = prepare(cfg, precision, log)
    run = new_run(cfg, dist, device, precision, prepared, log)
    torch.manual_seed(cfg.seed + dist.rank)  # LoRA's A matrices, then dropout, are drawn from it
    model, report = load_model_with_lora(cfg, model_load_device(cfg, device), precision)
    attach_model(run, model, report, prepared.fmt)
    run.state.identity = run_identity(run)
    if plan.resume_from is not None:
        saved = resume_checkpoint(run, plan.resume_from)
        run.state = RunState(**(saved | {"identity": run.state.identity}))
        run.first_step = run.state.step
        log(f"resumed from {plan.resume_from} at step {run.state.step}")
    for line in startup_summary(run, report, run.total_steps):
        log(line)
    run.record.estimate = estimate(run)
    for line in estimate_lines(run.record.estimate, cfg):
        log(line)
    if dist.is_main:
        start_writing(run, plan, prepared.val_rows)
    barrier()
    return run


def attach_model(run: Run, model: torch.nn.Module, report: LoRAReport, fmt: PromptFormat) -> None:
    """The loaded model with LoRA, and what trains it: the loss, DDP/FSDP, AdamW, the schedule."""
    cfg, device, precision = run.cfg, run.device, run.precision
    run.model = model
    run.loss = CausalLMLoss(model, cfg.loss_chunk)
    # DDP or FSDP around the loss, before AdamW: FSDP replaces each parameter by its shard.
    run.forward = wrap_for_training(run.loss, cfg, run.dist, device, precision)
    run.params = lora_parameters(model)
    groups = optimizer_param_groups(model, cfg.lr, cfg.lora_plus_ratio)  # one, or A and B (LoRA+)
    run.optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=run.params[0].device.type == "cuda"
    )
    run.scheduler = warmup_cosine(run.optimizer, run.warmup_steps, run.total_steps)
    run.scaler = grad_scaler(precision, device, sharded=run.sharded)
    run.autocast = autocast_for(precision, device)
    run.adapter_meta = {"base_model_name_or_path": cfg.model, "extra": {
        "prompt_format": fmt.to_dict(),
        "stop_token_ids": stop_token_ids(run.tokenizer, fmt, model.generation_config),
        "base_quantization": cfg.quantize,
    }}  # fmt: skip
    run.record.trainable_params = report.trainable_params
    run.record.total_params = report.total_params
    run.record.lora_modules = len(report.adapted_modules)


def start_writing(run: Run, plan: RunDirPlan, val_rows: list | None) -> None:
    """Process 0's first writes, once everything is checked: --overwrite's removal, then
    train_args.json, heldout.jsonl, metrics.jsonl (continued or fresh) and the trackers."""
    cfg, out = run.cfg, run.out
    if cfg.overwrite:  # only now: everything is checked, and this is the run's first write
        clean_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    write_train_args(out, cfg, run.record, asdict(run.state))
    if val_rows:
        write_heldout(cfg, val_rows, out, run.log)
    if plan.resume_from is not None:
        run.metrics.continue_from(run.state.step, run.log)
    else:
        run.metrics.start_fresh()
    run.metrics.tracker = open_tracker(cfg.report_to, out, asdict(cfg), run.state.step)


def dry_run(cfg: TrainConfig, dist: DistInfo, device, precision: str) -> Run:
    """--dry-run: what setup() does before the weights load, then what a run prints first.

    The data is read and prepared (into the cache, so the real run starts from it), every
    setting is checked against the model's config, and the data summary, the steps and the
    memory estimate are printed. No weight is loaded and nothing is written to --output.
    """
    log = print if dist.is_main else _quiet
    plan = plan_run_dir(Path(cfg.output), cfg)  # a finished run or checkpoints there: said now
    prepared = prepare(cfg, precision, log)
    run = new_run(cfg, dist, device, precision, prepared, log)
    for line in startup_summary(run, prepared.report, run.total_steps):
        log(line)
    run.record.estimate = estimate(run, weights_as_loaded(run))
    for line in estimate_lines(run.record.estimate, cfg):
        log(line)
    log(f"dry run: every setting checked; {output_plan(plan, cfg)}. Stopped before loading the "
        f"weights: the same command without --dry-run trains")  # fmt: skip
    return run


def output_plan(plan: RunDirPlan, cfg: TrainConfig) -> str:
    """What the real run would do with --output, in words."""
    if plan.finished_steps is not None:
        return f"{cfg.output} holds a run finished at step {plan.finished_steps}: nothing to train"
    if plan.resume_from is not None:
        return f"the run would resume from {plan.resume_from}"
    if cfg.overwrite and Path(cfg.output).is_dir() and any(Path(cfg.output).iterdir()):
        return f"the run would replace what {cfg.output} holds (--overwrite)"
    return f"the run would write to {cfg.output}"


def weights_as_loaded(run: Run) -> int:
    """Bytes the frozen base will take once loaded, from the skeleton's shapes, as `estimate`
    measures a loaded model: the dtype of the run's precision; with --quantize the decoder's
    linear layers packed (NF4: half a byte a weight, int8: one); in an fp32 run the embedding
    and head kept in the checkpoint's 16-bit dtype (vocab_storage.py)."""
    cfg, model = run.cfg, run.model
    head, packed = model.get_output_embeddings(), {"nf4": 0.5, "int8": 1.0}.get(cfg.quantize)
    quantized = {id(m.weight) for m in model.modules()
                 if packed and isinstance(m, torch.nn.Linear) and m is not head}  # fmt: skip
    stored = checkpoint_dtype(cfg.model, cfg.trust_remote_code)
    narrow = run.precision == "fp32" and cfg.shard != "fsdp" and stored in NARROW_DTYPES
    vocab = {id(m.weight) for m in (model.get_input_embeddings(), head) if narrow and m is not None}
    total = 0.0
    for p in model.parameters():
        if p.requires_grad:
            continue
        if id(p) in quantized:
            total += p.numel() * packed
        else:
            total += p.numel() * (2 if id(p) in vocab else p.element_size())
    return int(total)


def write_heldout(cfg: TrainConfig, rows: list, out: Path, log) -> None:
    """Keep the rows --val-size held out, so the adapter can be scored on questions it never saw.

    `rows` are (file index in --data, row number) pairs; every file's rows go into one JSONL."""
    sources = parse_data(cfg.data)
    picks = [(src.path, [r for k, r in rows if k == i]) for i, src in enumerate(sources)]
    write_rows(picks, out / HELDOUT, cfg.encoding)
    log(
        f"held-out rows: {out / HELDOUT} ({len(rows)}); after training, score them with "
        f"infer.py --adapter {out} --file {out / HELDOUT} --score --compare"
    )


def load_model_with_lora(cfg: TrainConfig, device, precision: str):
    """The frozen base in the run's precision, fp32 LoRA injected; returns (model, LoRAReport).

    The base is stored in bf16/fp16 on any device (half the memory); the adapters are created
    in fp32 by `LoRALinear` whatever the base dtype. An fp32 run of a 16-bit checkpoint keeps
    the embedding and the head in the checkpoint's dtype (vocab_storage.py).
    """
    base_dtype = DTYPES[precision]
    quantized = quantization_config(cfg.quantize, compute_dtype=base_dtype)  # None: no QLoRA
    model = load_model(cfg.model, base_dtype, device, cfg.trust_remote_code, quantized)
    report = apply_lora(model, cfg.lora_spec())
    if precision == "fp32" and cfg.shard != "fsdp":  # embedding and head as stored (exact)
        keep_vocab_matrices_narrow(model, checkpoint_dtype(cfg.model, cfg.trust_remote_code))
    keep_less_for_backward(model)  # SwiGLU keeps 2 of its 3 activations (activations.py)
    if cfg.grad_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    return model, report


def build_mixture(cfg: TrainConfig, data_summary: dict, log) -> Mixture:
    """The --data files' weights over their tokenized rows; one summary line per weighted file."""
    sources = parse_data(cfg.data)
    mixture = Mixture(data_summary["train_rows_per_file"], [s.weight for s in sources], cfg.seed)
    if not mixture.plain:
        for line in mixture.lines([s.path for s in sources]):
            log(line)
    if sum(mixture.per_epoch()) == 0:
        raise UserError(f"--data {cfg.data}: the weights leave no row to train on")
    data_summary["rows_per_epoch_per_file"] = mixture.per_epoch()
    return mixture


def count_total_steps(run: Run) -> int:
    """Optimizer steps of the whole run: --max-steps, or --epochs worth of windows."""
    cfg, info = run.cfg, run.dist
    batches = run.epoch_batches(0)
    dropped = run.rows_per_epoch() - sum(len(b) for b in batches)
    if dropped:
        run.record.data["rows_skipped_per_epoch_under_torchrun"] = dropped
        run.log(
            f"note: each epoch skips one batch of {dropped} row(s): fewer rows than the "
            f"{info.world_size} processes (a different batch each epoch, since the order is reshuffled)"
        )
    steps_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))


def run_identity(run: Run) -> dict:
    """What defines the run, so what a resumption must not change; saved in every checkpoint.

    The settings that shape the model, the optimizer and the order of the batches, and a hash of
    the tokenized rows: it catches a changed data file, --max-len, template, system prompt or
    tokenizer, all of which would train on other tokens. The length of the run is not part of
    it: a larger --max-steps extends a run (the cosine schedule stretches to the new end).
    """
    cfg = run.cfg
    names = (
        "model", "targets", "rank", "alpha", "dropout", "rslora", "template", "system",
        "enable_thinking", "max_len", "lr", "warmup", "weight_decay", "max_grad_norm",
        "batch_size", "grad_accum", "group_by_length", "seed", "quantize", "lora_plus_ratio", "dora",
        "shard",
    )  # fmt: skip
    return {name: getattr(cfg, name) for name in names} | {
        "world_size": run.dist.world_size,
        "train_rows": len(run.train_set),
        "mixture": [run.mixture.counts, run.mixture.weights],  # the rows each epoch draws
        "data_sha256": data_hash(run.train_set, run.val_set),
    }


def data_hash(*row_sets) -> str:
    """sha256 of every row's token ids and labels, in order, and of where each row starts.

    The flat arrays of a `TokenizedSet` are hashed through their buffers, with no copy: a
    memory-mapped set of millions of rows is read from disk once, never held in memory.
    """
    h = hashlib.sha256()
    for rows in row_sets:
        h.update(b"|")  # where one set ends: moving a row into --val-size's share changes the hash
        for array in (rows.offsets, rows.input_ids, rows.labels):
            h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()
