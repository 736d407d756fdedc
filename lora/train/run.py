"""Everything a training run holds, built once by `setup`, so the loop can stay short.

A `Run` carries the model and its LoRA-wrapped loss, the optimizer, the learning-rate schedule,
the GradScaler (fp16 only), the autocast context, the device, the process's place under
torchrun, the output directory and the progress so far (`RunState`). Helpers take the run
instead of long argument lists, and `loop.py` reads as the pseudo-code in its docstring.

`setup` does, in order: tokenizer and data (the cheap part that fails most often, first),
model + LoRA injection + freezing, DDP or FSDP under torchrun, optimizer and schedule, resuming from a
checkpoint, the startup summary, `train_args.json` and `metrics.jsonl`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
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
from ..inject import apply_lora, lora_parameters
from ..lora_plus import check_lora_plus_ratio, optimizer_param_groups
from ..model import checkpoint_dtype, enable_activation_checkpointing, load_model, load_tokenizer
from ..quantize import quantization_config
from .activations import keep_less_for_backward
from .checkpoint import resume_checkpoint
from .config import TrainConfig
from .cost import estimate, estimate_lines
from .distributed import DistInfo, barrier, shard_rows
from .loss import CausalLMLoss
from .metrics import MetricsLog, startup_summary
from .precision import DTYPES, autocast_for
from .rundir import HELDOUT, METRICS, RunDirPlan, RunRecord, clean_run_dir, write_train_args
from .schedule import warmup_cosine, warmup_steps
from .sharding import grad_scaler, model_load_device, wrap_for_training
from .tracking import open_tracker
from .vocab_storage import keep_vocab_matrices_narrow


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
    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    precision: str
    out: Path
    log: object
    tokenizer: object
    model: torch.nn.Module
    loss: CausalLMLoss  # decoder + supervised-only loss: (loss sum, token count)
    forward: torch.nn.Module  # `loss`, wrapped in DDP or sharded by FSDP under torchrun
    params: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: object
    train_set: list
    val_set: list
    lengths: list[int]
    adapter_meta: dict  # what save_adapter records besides the tensors
    record: RunRecord
    metrics: MetricsLog
    mixture: Mixture  # which rows each epoch takes from each --data file
    scheduler: object = None  # warmup + cosine, once the number of steps is known
    total_steps: int = 0
    state: RunState = field(default_factory=RunState)
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


def setup(cfg: TrainConfig, plan: RunDirPlan, dist: DistInfo, device, precision: str) -> Run:
    """Build the run: data, model with LoRA, optimizer, schedule; resume if asked."""
    log = print if dist.is_main else _quiet
    check_lora_plus_ratio(cfg.lora_plus_ratio)  # before anything slow loads
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed + dist.rank)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    fmt = PromptFormat(resolve_template(tokenizer, cfg.template), cfg.system, cfg.enable_thinking)
    train_set, val_set, data_summary = prepare_data(cfg, tokenizer, fmt, log)
    val_rows = data_summary.pop("val_rows", None)  # too long for train_args.json on big sets
    model, report = load_model_with_lora(cfg, model_load_device(cfg, device), precision)
    loss = CausalLMLoss(model, cfg.loss_chunk)
    forward = wrap_for_training(loss, cfg, dist, device, precision)  # before the optimizer: FSDP
    params = lora_parameters(model)  # replaces each parameter by its shard
    groups = optimizer_param_groups(model, cfg.lr, cfg.lora_plus_ratio)  # one, or A and B (LoRA+)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=params[0].device.type == "cuda"
    )
    run = Run(
        cfg=cfg, dist=dist, device=device, precision=precision, out=out, log=log,
        tokenizer=tokenizer, model=model, loss=loss, forward=forward,
        params=params, optimizer=optimizer,
        scaler=grad_scaler(precision, device, sharded=cfg.shard == "fsdp" and dist.enabled),
        autocast=autocast_for(precision, device), train_set=train_set, val_set=val_set,
        lengths=train_set.lengths.tolist(),
        adapter_meta={"base_model_name_or_path": cfg.model, "extra": {
            "prompt_format": fmt.to_dict(),
            "stop_token_ids": stop_token_ids(tokenizer, fmt, model.generation_config),
            "base_quantization": cfg.quantize,
        }},
        record=RunRecord(data_summary, report.trainable_params, report.total_params,
                         len(report.adapted_modules)),
        metrics=MetricsLog(out / METRICS, writer=dist.is_main),
        mixture=build_mixture(cfg, data_summary, log),
    )  # fmt: skip
    run.total_steps = count_total_steps(run)
    warmup = warmup_steps(cfg.warmup, run.total_steps)
    run.scheduler = warmup_cosine(optimizer, warmup, run.total_steps)
    run.state.identity = run_identity(run)
    if plan.resume_from is not None:
        saved = resume_checkpoint(run, plan.resume_from)
        run.state = RunState(**(saved | {"identity": run.state.identity}))
        log(f"resumed from {plan.resume_from} at step {run.state.step}")
    for line in startup_summary(run, report, run.total_steps):
        log(line)
    run.record.estimate = estimate(run)
    for line in estimate_lines(run.record.estimate, cfg):
        log(line)
    if dist.is_main:
        if cfg.overwrite:  # only now: everything is checked, and this is the run's first write
            clean_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        write_train_args(out, cfg, run.record, asdict(run.state))
        if val_rows:
            write_heldout(cfg, val_rows, out, log)
        if plan.resume_from is not None:
            run.metrics.continue_from(run.state.step, log)
        else:
            run.metrics.start_fresh()
        run.metrics.tracker = open_tracker(cfg.report_to, out, asdict(cfg), run.state.step)
    barrier()
    return run


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
