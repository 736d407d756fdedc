"""What a run costs: a memory estimate before the first step, a summary after the last.

Before training (`estimate`), in bytes:

    weights      the frozen base as loaded (after --quantize: its packed storage)
    adapters     LoRA parameters × 16: fp32 weight, gradient, and AdamW's two moments
    activations  what backward keeps for the longest batch (B rows × T tokens; the first batch
                 is the longest, batching.py), per decoder layer and token
                     5·h + 2·kv + 2·i  values   (h hidden size, kv = key/value heads × head
                                                 size, i MLP width)
                 the inputs of the two norms (2h), the adapters' input (h), the attention's
                 query and output (2h) with its keys and values (2kv), and the MLP's gate and
                 up outputs (2i; activations.py keeps no third), in the compute dtype (measured
                 on the real 0.5B with q/v adapters: within 5%; more targets or dropout keep
                 more); plus one chunk of fp32 logits (loss.py) and the final hidden state with
                 its gradient. With --grad-checkpointing only each layer's input (h values per
                 token) is kept, and one layer's full set while it is recomputed.

On CPU the total is what the process will hold resident (its RSS), since that is what runs out:
    resident     measured, not computed: the RSS when the estimate is made, which holds Python,
                 torch, the tokenizer, the prepared data and the loaded weights with the
                 allocator's slack (`--dry-run`: that RSS plus the weights it has not loaded)
    transients   what lives only for a moment at the peak: the chunked loss's logits gradient
                 and temporaries (2 more chunks) and one layer's backward (2 layers' values)
    total        the larger of the peak already reached (loading) and resident + adapters and
                 AdamW + activations + transients
On GPU the total is weights + adapters and AdamW + activations, as the allocator counts them.
Checked against the measured peak on the real 0.5B by bench/estimate_check.py. It remains an
estimate, printed so a run that cannot fit is seen before it starts. `--dry-run` prints it from
the model's shape alone (run.py), before any weight loads.

After training (`summary`): steps, epochs, tokens seen, time and mean tokens/s, peak memory
(max RSS of the process on CPU, `torch.cuda.max_memory_allocated` on GPU), the final losses and
where each file is. The same numbers go into train_args.json ("estimate" and "final").

Each figure covers one stated span. A run resumed with --resume was trained by several
processes: the whole run's steps, tokens and training time come from metrics.jsonl (every step
kept, whichever process trained it), while wall time, peak memory and the tokens/s of this
process are this process's own, over the steps it trained. A fresh run has one span.
"""

from __future__ import annotations

import math
import resource
import sys

import torch

from .loss import auto_chunk_size

ADAM_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + AdamW's m and v


def estimate(run, weights_bytes: int | None = None) -> dict:
    """Memory of weights, adapters + optimizer and activations (with and without checkpointing).

    The weights are measured on the loaded model, unless `weights_bytes` gives them (the dry
    run's model has shapes but no storage); the trainable count is the injection's.
    """
    model, cfg = run.model, run.cfg
    frozen = weights_bytes
    if frozen is None:
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)  # fmt: skip
    trainable = run.record.trainable_params
    tokens = cfg.batch_size * max(run.lengths)
    full, checkpointed = activation_bytes(model.config, tokens, DTYPE_BYTES[run.precision], cfg)
    steps_per_epoch = math.ceil(len(run.epoch_batches(0)) / cfg.grad_accum)
    est = {
        "weights_bytes": frozen,
        "adapters_and_optimizer_bytes": trainable * ADAM_BYTES_PER_PARAM,
        "longest_batch_tokens": tokens,
        "activations_bytes": full,
        "activations_bytes_with_grad_checkpointing": checkpointed,
        "steps_per_epoch": steps_per_epoch,
        "epochs": run.total_steps / steps_per_epoch,
    }
    if run.device.type == "cpu":
        est |= resident_terms(model.config, tokens, DTYPE_BYTES[run.precision], cfg)
        if weights_bytes is not None:  # a dry run: the weights are not resident yet
            est["resident_bytes"] += frozen
    return est


def resident_terms(config, tokens: int, dtype_bytes: int, cfg) -> dict:
    """What the CPU total adds to the computed parts: the process's RSS now and its peak so
    far (from /proc), and the moment's transients at the peak (see the module docstring)."""
    config = getattr(config, "text_config", config)
    chunk = min(tokens, cfg.loss_chunk or auto_chunk_size(config.vocab_size))
    layer = tokens * kept_per_token_per_layer(config) * dtype_bytes
    now, peak = process_memory()
    return {"resident_bytes": now, "peak_so_far_bytes": peak,
            "transient_bytes": 2 * chunk * config.vocab_size * 4 + 2 * layer}  # fmt: skip


def process_memory() -> tuple[int, int]:
    """(RSS now, peak RSS so far) of this process in bytes: Linux's VmRSS and VmHWM (0, 0 where
    /proc has neither)."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def total_bytes(est: dict, cfg) -> int:
    """The printed total: resident memory on CPU, allocated memory on GPU (module docstring)."""
    if "resident_bytes" not in est:
        return (
            est["weights_bytes"]
            + est["adapters_and_optimizer_bytes"]
            + chosen_activations(est, cfg)
        )
    moving = (
        est["adapters_and_optimizer_bytes"] + chosen_activations(est, cfg) + est["transient_bytes"]
    )
    return max(est["peak_so_far_bytes"], est["resident_bytes"] + moving)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def kept_per_token_per_layer(config) -> int:
    """5·h + 2·kv + 2·i: the values one decoder layer keeps for backward per token."""
    config = getattr(config, "text_config", config)
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return 5 * h + 2 * kv + 2 * i


def activation_bytes(config, tokens: int, dtype_bytes: int, cfg) -> tuple[int, int]:
    """(without, with --grad-checkpointing) bytes that backward keeps for `tokens` tokens."""
    config = getattr(config, "text_config", config)
    h, layers = config.hidden_size, config.num_hidden_layers
    per_layer = tokens * kept_per_token_per_layer(config) * dtype_bytes
    chunk = min(tokens, cfg.loss_chunk or auto_chunk_size(config.vocab_size))
    head = chunk * config.vocab_size * 4 + 2 * tokens * h * 4  # logits chunk, h and ∂loss/∂h
    return layers * per_layer + head, layers * tokens * h * dtype_bytes + per_layer + head


def estimate_lines(est: dict, cfg) -> list[str]:
    """The estimate as printed before the first step."""
    now = "on" if cfg.grad_checkpointing else "off"
    if "resident_bytes" in est:  # CPU: what the process holds, measured, plus what it will add
        head = (f"memory estimate (resident): now {size(est['resident_bytes'])} (Python, torch, "
                f"the data and weights {size(est['weights_bytes'])})")  # fmt: skip
        tail = f" + loss and backward transients {size(est['transient_bytes'])}"
    else:
        head, tail = f"memory estimate: weights {size(est['weights_bytes'])}", ""
    lines = [
        f"{head} + adapters and AdamW {size(est['adapters_and_optimizer_bytes'])} + activations "
        f"of the longest batch ({est['longest_batch_tokens']:,} tokens) "
        f"{size(est['activations_bytes'])}, {size(est['activations_bytes_with_grad_checkpointing'])} "
        f"with --grad-checkpointing (now {now}){tail}; total ≈ {size(total_bytes(est, cfg))}"
    ]
    if cfg.max_steps:
        lines.append(
            f"--max-steps {cfg.max_steps} = {est['epochs']:.2f} epochs "
            f"({est['steps_per_epoch']} optimizer steps per epoch)"
        )
    return lines


def chosen_activations(est: dict, cfg) -> int:
    key = (
        "activations_bytes_with_grad_checkpointing"
        if cfg.grad_checkpointing
        else "activations_bytes"
    )
    return est[key]


def peak_memory(device) -> tuple[int, str]:
    """(bytes, what was measured): the process's max RSS on CPU, the allocator's peak on GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "max RSS"  # Linux reports KiB


def summary(run, wall_time: float, val_loss: float | None) -> dict:
    """The end-of-run numbers; also the "final" record of train_args.json.

    Top level: the whole run (every step in metrics.jsonl). `this_process`: the steps this
    process trained (all of them, unless it resumed a run), its wall time and peak memory.
    """
    peak, measured = peak_memory(run.device)
    state = run.state
    batches = len(run.epoch_batches(state.epoch))
    mine = [r for r in run.metrics.history if r["step"] > run.first_step]
    return {
        "train_loss": run.last_loss,
        "val_loss": val_loss,
        "steps": state.step,
        "epochs": round(state.epoch + state.batch_in_epoch / max(batches, 1), 4),
        **span(run.metrics.history),
        "this_process": {
            "first_step": run.first_step + 1,
            "steps": len(mine),
            **span(mine),
            "wall_time_s": round(wall_time, 2),
        },
        "peak_memory_bytes": peak,
        "peak_memory_measured": measured,
        "files": output_files(run),
    }


def span(records: list[dict]) -> dict:
    """Tokens, summed step time and tokens per second of the steps in `records`."""
    tokens = sum(r["real_tokens"] for r in records)
    seconds = sum(r["step_time_s"] for r in records)
    return {
        "tokens_seen": tokens,
        "train_time_s": round(seconds, 2),
        "mean_tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }


def output_files(run) -> dict:
    """Where each file of the run is (only those that exist)."""
    from .rundir import LOSS_PLOT, METRICS, TRAIN_ARGS
    from .tracking import TENSORBOARD_DIR

    names = {
        "adapter": "adapter_model.safetensors", "best_adapter": "best", "metrics": METRICS,
        "loss_plot": LOSS_PLOT, "train_args": TRAIN_ARGS, "tensorboard": TENSORBOARD_DIR,
    }  # fmt: skip
    return {key: str(run.out / name) for key, name in names.items() if (run.out / name).exists()}


def summary_lines(s: dict) -> list[str]:
    """The summary as printed at the end of a run: one line for a fresh run, whose process is
    the whole run; after --resume, the whole run's figures and this process's, each labelled."""
    val = f", validation loss {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
    train = f"{s['train_loss']:.4f}" if s["train_loss"] is not None else "n/a"
    mine = s["this_process"]
    memory = f"{size(s['peak_memory_bytes'])} ({s['peak_memory_measured']})"
    head = f"done: {s['steps']} steps ({s['epochs']:.2f} epochs)"
    if mine["first_step"] == 1:
        lines = [
            f"{head} in {mine['wall_time_s']:.1f} s; {s['tokens_seen']:,} tokens seen, "
            f"{_speed(s)} tokens/s; peak memory {memory}; final train loss {train}{val}"
        ]
    else:
        steps = f"steps {mine['first_step']}-{s['steps']}" if mine["steps"] else "no step"
        lines = [
            f"{head}; final train loss {train}{val}",
            f"  whole run      {s['tokens_seen']:,} tokens seen in {s['train_time_s']:.1f} s of "
            f"training steps, {_speed(s)} tokens/s",
            f"  this process   {steps} (resumed): {mine['tokens_seen']:,} tokens in "
            f"{mine['train_time_s']:.1f} s of training steps, {_speed(mine)} tokens/s; "
            f"{mine['wall_time_s']:.1f} s in all; peak memory {memory}",
        ]
    return lines + [f"  {key:<12} {path}" for key, path in s["files"].items()]


def _speed(span: dict) -> str:
    return f"{span['mean_tokens_per_s']:,.0f}" if span["mean_tokens_per_s"] else "n/a"


def size(n: float) -> str:
    """Bytes for people: 512 B, 3.2 MB, 1.4 GB."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"
