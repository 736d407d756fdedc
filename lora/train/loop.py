"""The training loop, in plain PyTorch. `train()` reads top to bottom like this pseudo-code:

    run = setup(config)                      # data, model + LoRA, AdamW, schedule; resume
    for epoch, window in batches:            # one window = grad_accum micro-batches
        N = supervised tokens in the window (all micro-batches, all processes), counted first
        for each micro-batch b:  backward( loss_sum(b) / N )
        unscale (fp16), clip, skip if not finite, AdamW step, schedule step (applied updates only)
        log; evaluate / checkpoint when due; stop cleanly on Ctrl-C
    evaluate, save the adapter

Dividing every micro-batch's *sum* by the window's total N makes the update identical to
one big batch in which every supervised token weighs the same. (Averaging each micro-batch
first and then averaging the averages, as many loops do, lets a 1-token answer weigh as much
as a 100-token one.) A last, partial window is scaled by its own N, so it is exact too.

Precision: LoRA weights and AdamW state are always fp32 (see lora/layer.py and precision.py); the
frozen base may be bf16/fp16, with autocast in the forward pass and a GradScaler for fp16.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapter import full_tensor
from ..data.batching import training_windows
from ..errors import TrainingInterrupted, UserError
from .checkpoint import save_checkpoint, save_run_adapter
from .config import TrainConfig, check_config
from .cost import summary, summary_lines
from .distributed import (
    all_reduce_sum,
    all_reduce_sums,
    barrier,
    init_distributed,
    shutdown,
    stop_signals,
)
from .loss import count_supervised
from .metrics import ProgressBar, plot_loss
from .precision import out_of_memory_advice, pick_device, resolve_precision
from .run import Run, dry_run, setup
from .rundir import HELDOUT, LOSS_PLOT, prepare_run_dir, run_dir_lock, write_train_args
from .sharding import check_sharding, deferred_gradient_sync
from .tracking import check_backends
from .validation import early_stop_due, evaluate_and_keep_best, use_best_adapter

MAX_BAD_STEPS = 3  # non-finite updates in a row that mean the run diverged

__all__ = ["TrainConfig", "TrainResult", "backward_window", "optimizer_step", "train"]


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float | None
    val_loss: float | None
    history: list = field(default_factory=list)
    finished: bool = True


def train(cfg: TrainConfig) -> TrainResult:
    """Train LoRA adapters as `cfg` says; the adapter and its records end up in `cfg.output`.

    The order protects what is already on disk: every setting is checked first; the output
    directory is locked against a second run; a previous run is removed (--overwrite) only
    once the data and the model have loaded; and Ctrl-C/SIGTERM are handled until the last
    file is written, so an interrupt leaves a finished run or a checkpoint to resume from.
    With --dry-run it stops before the weights load, having written nothing (run.dry_run).
    """
    started = time.perf_counter()
    check_config(cfg)
    check_backends(cfg.report_to)  # a missing tracker package fails before anything loads
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = Path(cfg.output)
    try:
        check_sharding(cfg, dist)
        if cfg.dry_run:
            run = dry_run(cfg, dist, device, precision)
            return TrainResult(out, run.total_steps, None, None, finished=False)
        with run_dir_lock(out, enabled=dist.is_main):
            plan = prepare_run_dir(out, cfg, dist)
            if plan.finished_steps is not None:
                return TrainResult(out, plan.finished_steps, None, None)
            run = setup(cfg, plan, dist, device, precision)
            run.started = started
            try:
                with stop_signals(escalate=not dist.enabled) as stop:
                    return train_and_finish(run, stop)
            finally:
                run.metrics.close()
    finally:
        shutdown()


def train_and_finish(run: Run, stop) -> TrainResult:
    """The loop, then the final evaluation and save, all under the stop flag.

    A Ctrl-C during the final evaluation or save lets it complete (the run is then finished,
    and we still exit as interrupted). A second Ctrl-C there stops at once: the last step is then
    saved as a checkpoint, and `--resume auto` redoes only the final evaluation and save.
    """
    stopped = train_loop(run, stop)
    if stopped is not None:
        return stopped
    try:
        result = finish(run)
    except KeyboardInterrupt:
        path = save_checkpoint(run)
        run.log(f"interrupted before the final save: saved {path}; continue with --resume auto")
        raise TrainingInterrupted(str(path)) from None
    if stop.requested:
        run.log(
            f"interrupted during the final save, which completed: the run is finished in {run.out}"
        )
        raise TrainingInterrupted(str(run.out))
    return result


def train_loop(run: Run, stop) -> TrainResult | None:
    """Optimizer steps until the run's last; a TrainResult only when it stops early."""
    cfg, state = run.cfg, run.state
    windows = training_windows(run.epoch_batches, cfg.grad_accum, state.epoch, state.batch_in_epoch)
    bar = ProgressBar(cfg.progress and run.dist.is_main, run.total_steps, state.step)
    for steps_this_run, (epoch, next_batch, window) in enumerate(windows, start=1):
        if state.step >= run.total_steps:
            break
        t0 = time.perf_counter()
        micro_batches = run.micro_batches(window)
        try:
            loss_sum, n_tokens = backward_window(run, micro_batches)
        except torch.cuda.OutOfMemoryError:
            raise UserError(out_of_memory_advice(cfg)) from None
        # One collective for everything the processes must agree on: the window's loss, its
        # real tokens (for tokens/s), and whether any process was asked to stop.
        local_tokens = sum(int(m["attention_mask"].sum()) for m in micro_batches)
        loss_total, real_tokens, stop_votes = all_reduce_sums(
            [loss_sum, local_tokens, stop.requested], run.device
        )
        loss = loss_total / n_tokens
        grad_norm, lr = optimizer_step(run, loss)
        state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, next_batch

        dt = time.perf_counter() - t0
        record = {
            "step": state.step, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": real_tokens / dt, "real_tokens": int(real_tokens),
            "supervised_tokens": int(n_tokens), "step_time_s": dt,
        }  # fmt: skip
        run.metrics.append(record)
        bar.step(record)
        if evaluation_due(run):
            evaluate(run)
            if early_stop_due(run):
                break

        interrupted = stop_votes > 0
        stop_now = cfg.stop_after_steps and steps_this_run >= cfg.stop_after_steps
        stop_now = stop_now and state.step < run.total_steps
        if (cfg.save_every and state.step % cfg.save_every == 0) or interrupted or stop_now:
            path = save_checkpoint(run)
            if interrupted or stop_now:
                return stop_early(run, path, bar, interrupted, steps_this_run)
    bar.close()
    return None


def backward_window(run: Run, micro_batches: list[dict]) -> tuple[float, float]:
    """Accumulate the gradient of one optimizer step over its micro-batches.

    The gradient left in `.grad` is that of  Σ token losses / N  over the whole window, N being
    the window's supervised tokens on all processes. N is counted *before* any backward pass, so
    each micro-batch can be divided by it as it goes. Returns (this process's loss sum, N).
    """
    forward, device, scaler, world_size = run.forward, run.device, run.scaler, run.dist.world_size
    n_window = all_reduce_sum(sum(count_supervised(m["labels"]) for m in micro_batches), device)
    loss_sum_total = torch.zeros((), device=device)  # summed on the device: one host sync per step
    last = len(micro_batches) - 1
    for k, batch in enumerate(micro_batches):
        batch = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
        with deferred_gradient_sync(forward, run.dist, last=k == last):
            with run.autocast:
                loss_sum, _ = forward(batch["input_ids"], batch["attention_mask"], batch["labels"])
            # DDP and FSDP average gradients over processes; × world_size turns that into a sum.
            scaled = loss_sum * (world_size / n_window)
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum_total += loss_sum.detach()
    return float(loss_sum_total), n_window


def optimizer_step(run: Run, loss: float) -> tuple[float, float]:
    """Unscale (fp16), clip, then apply or skip the update. Returns (grad norm, learning rate).

    Each step ends in one of three outcomes (`step_outcome`):
        update     loss and gradients finite: AdamW steps, and so does the schedule.
        overflow   fp16 only: a finite loss but inf/NaN gradients. Routine: the loss scale was
                   too high. GradScaler skips the update and halves its scale. Not divergence.
        bad        a non-finite loss, or non-finite gradients that loss scaling cannot explain:
                   the update is skipped, and MAX_BAD_STEPS in a row stop the run.

    The schedule counts *applied* updates: a skipped step moves neither warmup nor the cosine.
    fp16's first steps often overflow while GradScaler searches its scale; letting them advance
    the schedule would spend the warmup before the first real update. The price: after k skipped
    steps the run ends k updates short of the schedule's end (a slightly higher last rate).

    The learning rate returned is the one this step used (or would have used), read before the
    schedule moves on: that is the rate to log next to this step's loss.
    """
    lr = run.optimizer.param_groups[0]["lr"]
    scale = run.scaler.get_scale() if run.scaler else None
    if run.scaler:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf")
    # Under FSDP the gradients are shards (DTensors): the norm comes back as the global one.
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(run.params, max_norm)))
    outcome = step_outcome(loss, grad_norm, scale)
    if outcome == "update":
        if run.scaler:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
        run.scheduler.step()
        run.last_loss, run.bad_steps = loss, 0
    if run.scaler:
        run.scaler.update()  # grows the scale after a run of good steps, halves it on overflow
    run.optimizer.zero_grad(set_to_none=True)
    step = run.state.step + 1
    if outcome == "overflow":
        run.log(f"note: step {step}: fp16 gradients overflowed at loss scale {scale:g}; update "
                f"skipped, scale lowered to {run.scaler.get_scale():g}")  # fmt: skip
    elif outcome == "bad":
        count_bad_step(run, f"step {step}: loss {loss}, grad norm {grad_norm}")
    return grad_norm, lr


def step_outcome(loss: float, grad_norm: float, scale: float | None) -> str:
    """One of update, overflow (fp16 loss scale too high), bad (divergence): see optimizer_step.

    Under a GradScaler (`scale` not None), non-finite gradients with a finite loss are an
    overflow of the *scaled* gradients, which a lower scale fixes, as long as the scale is at
    least 1. Below 1 the scaled gradients are smaller than the true ones: if even those
    overflow, the true gradients do too, and lowering the scale further cannot help.
    """
    if not math.isfinite(loss):
        return "bad"
    if math.isfinite(grad_norm):
        return "update"
    return "overflow" if scale is not None and scale >= 1.0 else "bad"


def count_bad_step(run: Run, what: str) -> None:
    """Warn about a skipped non-finite step; MAX_BAD_STEPS in a row stop the run with advice."""
    run.bad_steps += 1
    run.log(f"warning: {what}: not finite; update skipped")
    if run.bad_steps >= MAX_BAD_STEPS:
        raise UserError(
            f"{run.bad_steps} non-finite updates in a row: training diverged. Try a lower --lr "
            f"(now {run.cfg.lr}), --precision bf16 or fp32 instead of fp16, or a smaller --max-grad-norm."
        )


def evaluate(run: Run) -> float:
    """Validate, keep the best adapter, log an eval record; returns the validation loss."""
    result = evaluate_and_keep_best(run, run.val_set)
    run.metrics.add_eval(run.state.step, result)
    return result["val_loss"]


def evaluation_due(run: Run) -> bool:
    """Every --eval-every steps, but not at the last step: `finish` evaluates that one."""
    every, step = run.cfg.eval_every, run.state.step
    return bool(every and step % every == 0 and run.val_set and step < run.total_steps)


def stop_early(run: Run, path, bar, interrupted: bool, steps_this_run: int) -> TrainResult:
    """After a checkpoint for Ctrl-C/SIGTERM (raises) or --stop-after-steps (returns)."""
    bar.close()
    reason = (
        "interrupted"
        if interrupted
        else f"stopped after {steps_this_run} steps (--stop-after-steps)"
    )
    run.log(f"{reason}: saved {path}; continue with --resume auto")
    if interrupted:
        raise TrainingInterrupted(str(path))
    return TrainResult(
        run.out, run.state.step, run.last_loss, None, run.metrics.history, finished=False
    )


def finish(run: Run) -> TrainResult:
    """Final validation, the adapter, `train_args.json` marked finished, the loss plot.

    With --early-stop the run's result is the best adapter (best/), whether the run stopped
    early or ran to its end; the final validation is skipped when the last step was validated.
    """
    val_loss = None
    if run.val_set and not early_stop_due(run):
        val_loss = evaluate(run)
    if run.cfg.early_stop and run.state.best_step is not None:
        val_loss = run.state.best_val_loss
    save_run_adapter(run, run.out)  # every process: a gather under FSDP
    if run.dist.is_main:
        if run.cfg.early_stop and run.state.best_step is not None:
            use_best_adapter(run)
            run.log(early_stop_message(run))
        plot_loss(run.metrics.history, run.metrics.evals, run.out / LOSS_PLOT)
        final = summary(run, time.perf_counter() - run.started, val_loss)
        write_train_args(run.out, run.cfg, run.record, asdict(run.state), final)
        for line in summary_lines(final):
            run.log(line)
        run.log(f"adapter saved to {run.out}/; try it: {next_command(run)}")
    barrier()
    history = run.metrics.history
    return TrainResult(run.out, run.state.step, run.last_loss, val_loss, history)


def next_command(run: Run) -> str:
    """What to run next: score the held-out rows when there are some (questions shaped like the
    training rows, with references), else ask a question."""
    if (run.out / HELDOUT).is_file():
        return f"python infer.py --adapter {run.out} --file {run.out / HELDOUT} --score --compare"
    return f'python infer.py --adapter {run.out} --prompt "..."'


def early_stop_message(run: Run) -> str:
    state, patience = run.state, run.cfg.early_stop
    how = (
        f"early stop at step {state.step}: {patience} validations without a lower loss"
        if early_stop_due(run)
        else f"ran to step {state.step} (--early-stop {patience} did not trigger)"
    )
    return (
        f"{how}; the run's adapter in {run.out}/ is best/ from step {state.best_step} "
        f"(val loss {state.best_val_loss:.4f})"
    )
