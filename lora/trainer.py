"""The training loop, in plain PyTorch. Read `train()` top to bottom; helpers sit below it.

One optimizer step ("window") = `grad_accum` micro-batches:

    N = supervised tokens in the whole window (all micro-batches, all processes), counted first
    for each micro-batch b:   backward( loss_sum(b) / N )
    unscale (fp16), clip, skip if not finite, AdamW step, scheduler step

Dividing every micro-batch's *sum* by the window's total N makes the update identical to
one big batch in which every supervised token weighs the same. (Averaging each micro-batch
first and then averaging the averages, as many loops do, lets a 1-token answer weigh as much
as a 100-token one.) A last, partial window is scaled by its own N, so it is exact too.

Precision: `auto` picks bf16 autocast on GPUs that support it, fp16 autocast with a GradScaler
otherwise, and fp32 on CPU. The frozen base is stored in that half precision on GPU; LoRA
weights and AdamW state are always fp32 (see layer.py), so GradScaler never meets fp16
parameters.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXTRA_FILE, atomic_write_bytes, save_adapter
from .batching import collate, plan_batches
from .config import DEFAULT_MODEL
from .distributed import DistInfo, all_reduce_sum, all_reduce_sums, barrier, init_distributed
from .errors import TrainingInterrupted, UserError
from .inject import apply_lora, lora_parameters
from .loss import CausalLMLoss, count_supervised
from .model import load_model, load_tokenizer
from .precision import DTYPES
from .prepare import prepare_data
from .prompt import PromptFormat, resolve_template, stop_token_ids
from .schedule import warmup_cosine, warmup_steps

MAX_BAD_STEPS = 3


@dataclass
class TrainConfig:
    data: str = "data/chinese_med.json"
    val_data: str | None = None
    val_size: float = 0.0
    model: str = DEFAULT_MODEL
    output: str = "out"
    targets: str = "q_proj,v_proj"
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    rslora: bool = False
    epochs: float = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    warmup: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 1024
    template: str = "auto"
    system: str | None = None
    enable_thinking: bool = False
    columns: str | None = None
    strict: bool = False
    dedup: bool = False
    encoding: str | None = None
    precision: str = "auto"
    grad_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    resume: str | None = None
    overwrite: bool = False
    seed: int = 42
    trust_remote_code: bool = False
    log_every: int = 1
    stop_after_steps: int | None = None
    group_by_length: bool = True
    loss_chunk: int | None = None  # rows of logits per chunk; None sizes it from the vocabulary
    progress: bool = True
    device: str = "auto"


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float | None
    val_loss: float | None
    history: list = field(default_factory=list)
    finished: bool = True


# ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainResult:
    device, precision = resolve_device_and_precision(cfg.precision, cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    log = print if dist_info.is_main else (lambda *a, **k: None)
    out = Path(cfg.output)

    resume_from = check_output_dir(out, cfg, clean=dist_info.is_main)
    barrier()
    if resume_from == "finished":
        log(
            f"{out} holds a finished run ({read_finished_steps(out)} steps); nothing to resume. Use --overwrite to train again."
        )
        return TrainResult(out, read_finished_steps(out), None, None)

    torch.manual_seed(cfg.seed + dist_info.rank)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    fmt = PromptFormat(resolve_template(tokenizer, cfg.template), cfg.system, cfg.enable_thinking)
    train_set, val_set, data_summary = prepare_data(cfg, tokenizer, fmt, log)

    base_dtype = DTYPES[precision] if device.type == "cuda" else torch.float32
    model = load_model(cfg.model, base_dtype, device, cfg.trust_remote_code)
    report = apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
    if cfg.grad_checkpointing:
        # use_reentrant=False: the re-entrant variant drops gradients of inputs that do not
        # require grad, which would leave every LoRA gradient at zero behind a frozen embedding.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    # Rows per optimizer step across all processes; each process takes its slice of a batch.
    global_batch = cfg.batch_size * dist_info.world_size
    lengths = [len(e.input_ids) for e in train_set]
    first_plan = global_batches(lengths, global_batch, cfg, 0, dist_info)
    batches_per_epoch = len(first_plan)
    dropped = len(train_set) - sum(len(b) for b in first_plan)
    if dropped:
        data_summary["rows_skipped_per_epoch_under_torchrun"] = dropped
        log(
            f"note: each epoch skips one batch of {dropped} row(s): fewer rows than the {dist_info.world_size} "
            f"processes (a different batch each epoch, since the order is reshuffled)"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = warmup_cosine(optimizer, warmup_steps(cfg.warmup, total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    loss_module = CausalLMLoss(model, cfg.loss_chunk)
    runner = loss_module
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    identity = run_identity(cfg, dist_info, len(train_set))
    adapter_extra = {
        "prompt_format": fmt.to_dict(),
        "stop_token_ids": stop_token_ids(tokenizer, fmt, model.generation_config),
    }
    adapter_kwargs = {"base_model_name_or_path": cfg.model, "extra": adapter_extra}
    state = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best_val_loss": None,
        "identity": identity,
    }
    if resume_from is not None:
        state = resume(
            resume_from, model, optimizer, scheduler, scaler, identity, dist_info, device, log
        )

    summary_lines = startup_summary(
        cfg, device, precision, report, data_summary, dist_info, total_steps, train_set
    )
    for line in summary_lines:
        log(line)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_train_args(out, cfg, data_summary, report, state, finished=False)
    metrics_path = out / "metrics.jsonl"
    # On resume, keep the metrics up to the checkpoint; steps logged after it (before a crash)
    # will be trained again and logged again.
    history = (
        [r for r in read_history(metrics_path) if r["step"] <= state["step"]]
        if resume_from is not None
        else []
    )
    if dist_info.is_main and metrics_path.exists():
        metrics_path.unlink()
        for record in history:
            append_jsonl(metrics_path, record)
    barrier()

    stop = StopFlag(escalate=not dist_info.enabled)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    bar = progress_bar(cfg, dist_info, total_steps, state["step"])
    bad_steps = 0
    last_loss = None
    pad_multiple = 8 if device.type == "cuda" else 1
    steps_this_run = 0

    plan, plan_epoch = None, None
    with stop.installed():
        while state["step"] < total_steps:
            if (
                plan_epoch != state["epoch"]
            ):  # the epoch's batch order, deterministic by (seed, epoch)
                plan, plan_epoch = (
                    global_batches(lengths, global_batch, cfg, state["epoch"], dist_info),
                    state["epoch"],
                )
            if state["batch_in_epoch"] >= len(plan):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                continue
            window = plan[state["batch_in_epoch"] : state["batch_in_epoch"] + cfg.grad_accum]
            t0 = time.perf_counter()
            micro = [
                collate(
                    [train_set[i] for i in my_slice(b, dist_info)],
                    tokenizer.pad_token_id,
                    pad_multiple,
                )
                for b in window
            ]

            try:
                loss_sum_total, n_window = backward_window(
                    runner, micro, device, autocast, scaler, dist_info.world_size
                )
            except torch.cuda.OutOfMemoryError:
                raise UserError(oom_message(cfg)) from None

            # One collective for everything the processes must agree on: the window's loss, its
            # real tokens (for tokens/s), and whether any process was asked to stop.
            local_tokens = sum(int(m["attention_mask"].sum()) for m in micro)
            loss_total, real_tokens, stop_votes = all_reduce_sums(
                [loss_sum_total, local_tokens, stop.requested], device
            )
            loss_value = loss_total / n_window
            interrupted = stop_votes > 0
            if scaler:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                )
            )
            # fp16 overflow (inf gradients) is routine: GradScaler skips that step and lowers its
            # scale. A NaN loss, or non-finite gradients without a scaler, means divergence.
            if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.update()
                bad_steps += 1
                log(
                    f"warning: step {state['step'] + 1}: loss {loss_value}, grad norm {grad_norm}: not finite; update skipped"
                )
                if bad_steps >= MAX_BAD_STEPS:
                    raise UserError(
                        f"{bad_steps} non-finite updates in a row: training diverged. Try a lower --lr "
                        f"(now {cfg.lr}), --precision bf16 or fp32 instead of fp16, or a smaller --max-grad-norm."
                    )
            else:
                if scaler:
                    scaler.step(optimizer)  # skips by itself on inf gradients
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bad_steps = 0
                last_loss = loss_value
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += len(window)
            steps_this_run += 1

            dt = time.perf_counter() - t0
            record = {
                "step": state["step"],
                "epoch": state["epoch"],
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": real_tokens / dt,
                "real_tokens": int(real_tokens),
                "supervised_tokens": int(n_window),
                "step_time_s": dt,
            }
            if (
                cfg.eval_every
                and state["step"] % cfg.eval_every == 0
                and val_set
                and state["step"] < total_steps
            ):
                record.update(
                    evaluate_and_keep_best(
                        model,
                        loss_module,
                        val_set,
                        cfg,
                        tokenizer,
                        device,
                        autocast,
                        dist_info,
                        state,
                        out,
                        adapter_kwargs,
                        log,
                    )
                )
            history.append(record)
            if dist_info.is_main:
                append_jsonl(metrics_path, record)
            if bar:
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                bar.update(1)

            stop_now = (
                cfg.stop_after_steps
                and steps_this_run >= cfg.stop_after_steps
                and state["step"] < total_steps
            )
            if (cfg.save_every and state["step"] % cfg.save_every == 0) or interrupted or stop_now:
                path = save_checkpoint(
                    out, model, optimizer, scheduler, scaler, state, adapter_kwargs, cfg, dist_info
                )
                if interrupted or stop_now:
                    if bar:
                        bar.close()
                    reason = (
                        "interrupted"
                        if interrupted
                        else f"stopped after {steps_this_run} steps (--stop-after-steps)"
                    )
                    log(f"{reason}: saved {path}; continue with --resume auto")
                    if interrupted:
                        raise TrainingInterrupted(str(path))
                    return TrainResult(out, state["step"], last_loss, None, history, finished=False)
    if bar:
        bar.close()

    val_loss = None
    if val_set:
        result = evaluate_and_keep_best(
            model,
            loss_module,
            val_set,
            cfg,
            tokenizer,
            device,
            autocast,
            dist_info,
            state,
            out,
            adapter_kwargs,
            log,
        )
        val_loss = result["val_loss"]
        if history:
            history[-1].update(result)
            if dist_info.is_main:
                append_jsonl(metrics_path, {"step": state["step"], **result})
    if dist_info.is_main:
        save_adapter(model, out, **adapter_kwargs)
        write_train_args(
            out,
            cfg,
            data_summary,
            report,
            state,
            finished=True,
            final={"train_loss": last_loss, "val_loss": val_loss},
        )
        plot_loss(history, out / "loss_curve.png", log)
        log(
            f'adapter saved to {out}/ ({ADAPTER_WEIGHTS}, {ADAPTER_CONFIG}); try it: python infer.py --adapter {out} --prompt "..."'
        )
    barrier()
    return TrainResult(out, state["step"], last_loss, val_loss, history)


def backward_window(
    runner, micro: list[dict], device, autocast, scaler, world_size: int = 1
) -> tuple[float, float]:
    """Accumulate the gradient of one optimizer step over its micro-batches.

    The gradient left in `.grad` is that of  Σ token losses / N  over the whole window, N being
    the window's supervised tokens on all processes. N is counted *before* any backward pass, so
    each micro-batch can be divided by it as it goes. Returns (this process's loss sum, N).
    """
    n_window = all_reduce_sum(sum(count_supervised(m["labels"]) for m in micro), device)
    loss_sum_total = torch.zeros((), device=device)  # summed on the device: one host sync per step
    for k, mb in enumerate(micro):
        mb = {key: v.to(device, non_blocking=True) for key, v in mb.items()}
        # Under DDP, gradients are exchanged only after the window's last micro-batch.
        sync = runner.no_sync() if world_size > 1 and k < len(micro) - 1 else nullcontext()
        with sync:
            with autocast:
                loss_sum, _ = runner(mb["input_ids"], mb["attention_mask"], mb["labels"])
            # DDP averages gradients over processes; × world_size turns that into a sum.
            scaled = loss_sum * (world_size / n_window)
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum_total += loss_sum.detach()
    return float(loss_sum_total), n_window


# ---------------------------------------------------------------------------------------------
# Setup helpers


def resolve_device_and_precision(precision: str, device: str = "auto") -> tuple[torch.device, str]:
    has_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UserError(f"--precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if not has_cuda:
        if precision in ("bf16", "fp16"):
            raise UserError(
                f"--precision {precision} needs a CUDA GPU, and none is available; use --precision fp32 (or auto)"
            )
        return torch.device("cpu"), "fp32"
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use fp16")
    return torch.device("cuda"), precision


def check_output_dir(out: Path, cfg: TrainConfig, clean: bool = True):
    """Decide what to do with an existing output dir: None (fresh), a checkpoint path, or 'finished'.

    `clean`: whether this process may delete a previous run (`--overwrite`); only process 0 does.
    """
    args = _json(out / "train_args.json")
    finished = bool(args.get("finished"))
    done_steps = args.get("state", {}).get("step", 0)
    checkpoints = ckpt.list_checkpoints(out)
    if cfg.overwrite:
        if clean:
            clean_output_dir(out)
        return None
    if cfg.resume and cfg.resume != "auto":
        path = Path(cfg.resume)
        if not ckpt.is_valid_checkpoint(path):
            raise UserError(f"--resume {path}: not a complete checkpoint directory")
        return path
    if cfg.resume == "auto":
        if finished and (cfg.max_steps is None or cfg.max_steps <= done_steps):
            return "finished"
        return checkpoints[-1] if checkpoints else None
    if finished:
        raise UserError(
            f"{out} already holds a finished run; pass --overwrite to replace it, or another --output"
        )
    if checkpoints:
        raise UserError(
            f"{out} holds checkpoints of an unfinished run; pass --resume auto to continue it, or --overwrite"
        )
    return None


def read_finished_steps(out: Path) -> int:
    return _json(out / "train_args.json").get("state", {}).get("step", 0)


def clean_output_dir(out: Path) -> None:
    """Remove what a previous run wrote (only our own files: the user may keep others there)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or p.name == "best":
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in (
            ADAPTER_WEIGHTS,
            ADAPTER_CONFIG,
            EXTRA_FILE,
            "train_args.json",
            "metrics.jsonl",
            "loss_curve.png",
        ):
            p.unlink()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def global_batches(lengths, global_batch: int, cfg: TrainConfig, epoch: int, dist_info: DistInfo):
    """The epoch's global batches; under torchrun a batch too small to give every process a row is dropped."""
    batches = plan_batches(lengths, global_batch, cfg.seed, epoch, cfg.group_by_length)
    if dist_info.enabled:
        batches = [b for b in batches if len(b) >= dist_info.world_size]
    return batches


def my_slice(batch: list[int], dist_info: DistInfo) -> list[int]:
    """This process's rows of a global batch: contiguous, balanced, never empty (len >= world)."""
    if not dist_info.enabled:
        return batch
    n, w, r = len(batch), dist_info.world_size, dist_info.rank
    return batch[r * n // w : (r + 1) * n // w]


def run_identity(cfg: TrainConfig, dist_info: DistInfo, n_rows: int) -> dict:
    """What must not change between a run and its resumption."""
    return {
        "model": cfg.model,
        "targets": cfg.targets,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "rslora": cfg.rslora,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": dist_info.world_size,
        "seed": cfg.seed,
        "train_rows": n_rows,
    }


def resume(path, model, optimizer, scheduler, scaler, identity, dist_info, device, log) -> dict:
    from .adapter import load_adapter

    state = ckpt.read_trainer_state(path)
    saved = state.get("identity", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}"
        for k, v in identity.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise UserError(
            f"cannot resume from {path}: the run differs ({'; '.join(diffs)}). Use --overwrite to start over"
        )
    load_adapter(model, path)
    opt_state, rng = ckpt.load_checkpoint_state(path, dist_info.rank, device)
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    if scaler is not None and opt_state.get("scaler"):
        scaler.load_state_dict(opt_state["scaler"])
    if rng is not None:
        ckpt.set_rng_state(rng)
    log(f"resumed from {path} at step {state['step']}")
    return state


def save_checkpoint(
    out, model, optimizer, scheduler, scaler, state, adapter_kwargs, cfg, dist_info
) -> Path:
    if dist_info.is_main:
        ckpt.begin_checkpoint(
            out, state["step"], model, optimizer, scheduler, scaler, state, adapter_kwargs
        )
    barrier()
    ckpt.write_rank_rng(ckpt.tmp_dir_for(out, state["step"]), dist_info.rank)
    barrier()
    path = out / f"checkpoint-{state['step']}"
    if dist_info.is_main:
        ckpt.finalize_checkpoint(out, state["step"])
        ckpt.prune_checkpoints(out, cfg.keep_last)
    barrier()
    return path


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(loss_module, val_set, cfg, tokenizer, device, autocast, dist_info) -> float:
    """Token-averaged validation loss over the whole set (exact across processes)."""
    loss_module.model.eval()
    order = sorted(range(len(val_set)), key=lambda i: len(val_set[i].input_ids))
    mine = order[dist_info.rank :: dist_info.world_size]
    total = count = 0.0
    for start in range(0, len(mine), cfg.batch_size):
        mb = collate(
            [val_set[i] for i in mine[start : start + cfg.batch_size]], tokenizer.pad_token_id
        )
        mb = {k: v.to(device) for k, v in mb.items()}
        with autocast:
            loss_sum, n = loss_module(mb["input_ids"], mb["attention_mask"], mb["labels"])
        total += float(loss_sum)
        count += n
    loss_module.model.train()
    total, count = all_reduce_sums([total, count], device)
    return total / max(count, 1)


def evaluate_and_keep_best(
    model,
    loss_module,
    val_set,
    cfg,
    tokenizer,
    device,
    autocast,
    dist_info,
    state,
    out,
    adapter_kwargs,
    log,
) -> dict:
    val_loss = evaluate(loss_module, val_set, cfg, tokenizer, device, autocast, dist_info)
    ppl = math.exp(min(val_loss, 50))
    best = state.get("best_val_loss")
    improved = best is None or val_loss < best
    if improved:
        state["best_val_loss"] = val_loss
        if dist_info.is_main:
            save_adapter(model, out / "best", **adapter_kwargs)
    log(
        f"step {state['step']}: val loss {val_loss:.4f}, perplexity {ppl:.2f}"
        + (" (best so far, saved to best/)" if improved else "")
    )
    return {"val_loss": val_loss, "val_ppl": ppl}


# ---------------------------------------------------------------------------------------------
# Reporting


def startup_summary(
    cfg, device, precision, report, data_summary, dist_info, total_steps, train_set
) -> list[str]:
    rows_per_step = cfg.batch_size * cfg.grad_accum * dist_info.world_size
    mean_len = sum(len(e.input_ids) for e in train_set) / len(train_set)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return [
        f"device: {name}; precision: {precision} (LoRA weights and optimizer state fp32)"
        + (f"; {dist_info.world_size} processes (torchrun)" if dist_info.enabled else ""),
        f"model: {cfg.model}",
        str(report),
        f"effective batch: {rows_per_step} rows ({cfg.batch_size} per process × {cfg.grad_accum} accumulation"
        + (f" × {dist_info.world_size} processes" if dist_info.enabled else "")
        + f") ≈ {rows_per_step * mean_len:,.0f} tokens; {total_steps} optimizer steps",
    ]


def write_train_args(
    out: Path, cfg, data_summary, report, state, finished: bool, final: dict | None = None
) -> None:
    import platform

    import transformers

    payload = {
        "args": asdict(cfg),
        "finished": finished,
        "state": {k: v for k, v in state.items() if k != "identity"},
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "lora_modules": len(report.adapted_modules),
        "data": data_summary,
        "final": final or {},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    atomic_write_bytes(
        out / "train_args.json",
        (json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n").encode(),
    )


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_history(path: Path) -> list:
    if not path.is_file():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def plot_loss(history: list, path: Path, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss_curve.png")
        return
    steps = [r["step"] for r in history if "loss" in r and math.isfinite(r["loss"])]
    losses = [r["loss"] for r in history if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def progress_bar(cfg, dist_info, total, initial):
    if not (cfg.progress and dist_info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def oom_message(cfg) -> str:
    return (
        f"out of GPU memory. Try a smaller --batch-size (now {cfg.batch_size}) with a larger --grad-accum "
        f"(now {cfg.grad_accum}; the effective batch stays the same), --grad-checkpointing, or a smaller "
        f"--max-len (now {cfg.max_len})."
    )


class StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary.

    A second Ctrl-C stops at once (the previous checkpoint is still valid), except under
    torchrun: there a terminal's Ctrl-C reaches each worker twice (from the terminal and
    forwarded by torchrun), and the second one must not cancel the save.
    """

    def __init__(self, escalate: bool = True):
        self.requested = False
        self.escalate = escalate

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT and self.escalate:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step...",
            file=sys.stderr,
        )

    def installed(self):
        flag = self

        class _Ctx:
            def __enter__(self):
                self.previous = {
                    s: signal.signal(s, flag._handler) for s in (signal.SIGINT, signal.SIGTERM)
                }

            def __exit__(self, *exc):
                for s, h in self.previous.items():
                    signal.signal(s, h)

        return _Ctx()
