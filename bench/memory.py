"""Where our trainer's memory goes, phase by phase, measured as resident memory (RSS).

    python bench/memory.py ours --spec spec.json --result out.json     (run by bench/run.py)
    python bench/memory.py estimate [--lengths 256,512,1024]         (bench/estimate_check.py)

The same pieces as lora/ trains with (load_model, apply_lora, the decoder + chunked
supervised-only loss, AdamW over the LoRA parameters), driven by hand so RSS can be read
between them. Peaks come from Linux's VmHWM, reset (clear_refs 5) at the start of each phase:

    baseline        Python + torch + transformers + lora imported, tokenizer loaded
    weights         RSS after load_model − before; load_transient: the peak above that
    lora            LoRA A/B injected, the lean SwiGLU (lora/train/activations.py), and gradient
                    checkpointing enabled if the spec says
    activations     after the decoder forward of the first (longest) micro-batch
    loss_peak       extra peak inside the chunked loss (its [chunk, vocab] logits)
    backward_peak   extra peak during that micro-batch's backward
    optimizer       AdamW's two moments, allocated at the first step
    steady_peak     the peak over two whole optimizer steps (every micro-batch)

Micro-batches are the longest rows of the spec first: the breakdown describes the worst window.
On CUDA the same phases read torch.cuda.memory_allocated instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Meter:
    """RSS now and the peak since the last `phase()`, in MB; keeps the overall peak too."""

    def __init__(self):
        self.overall = 0.0

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def peak(self) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) / 1024
                    self.overall = max(self.overall, value)
                    return value
        raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")

    def phase(self) -> float:
        """Start a new phase: the peak restarts from the current RSS. Returns that RSS."""
        self.peak()  # fold the ending phase's peak into `overall`
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self.now()


def windows(spec) -> list[list[dict]]:
    """Two optimizer windows of micro-batches, longest rows first (the worst case)."""
    from lora.data.batching import collate
    from lora.model import load_tokenizer

    class Row:
        def __init__(self, r):
            self.input_ids, self.labels = r["input_ids"], r["labels"]

    pad = load_tokenizer(spec["model"]).pad_token_id
    rows = sorted(spec["train_rows"], key=lambda r: -len(r["input_ids"]))
    b, a = spec["batch_size"], spec["grad_accum"]
    batches = [collate([Row(r) for r in rows[i : i + b]], pad) for i in range(0, 2 * a * b, b)]
    return [batches[:a], batches[a : 2 * a]]


def params_mb(model, trainable: bool) -> float:
    return (
        sum(
            p.numel() * p.element_size() for p in model.parameters() if p.requires_grad == trainable
        )
        / 2**20
    )


def breakdown(spec) -> dict:
    from lora.inject import apply_lora, lora_parameters
    from lora.model import checkpoint_dtype, load_model
    from lora.spec import LoRASpec
    from lora.train.activations import enable_activation_checkpointing, keep_less_for_backward
    from lora.train.loss import count_supervised, supervised_loss_sum
    from lora.train.vocab_storage import keep_vocab_matrices_narrow

    meter = Meter()
    batches = windows(spec)
    out = {"baseline_mb": meter.phase()}
    model = load_model(spec["model"], torch.float32, "cpu")
    rss = meter.now()
    out |= {"weights_mb": rss - out["baseline_mb"], "load_transient_mb": meter.peak() - rss}
    out["weights_param_bytes_mb"] = params_mb(model, trainable=True) + params_mb(model, False)
    before = meter.phase()
    apply_lora(model, LoRASpec("q_proj,v_proj", 8, 16, 0.0, False))
    keep_less_for_backward(model)
    if spec["grad_checkpointing"]:
        enable_activation_checkpointing(model)
    model.train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=spec["lr"])
    after_lora = meter.phase()
    out["lora_mb"] = after_lora - before
    keep_vocab_matrices_narrow(model, checkpoint_dtype(spec["model"]))  # as lora/train/run.py does
    narrowed = meter.phase()
    out["vocab_narrow_mb"], after_lora = narrowed - after_lora, narrowed
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    for w, window in enumerate(batches):
        n_window = sum(count_supervised(m["labels"]) for m in window)
        for k, m in enumerate(window):
            first = w == 0 and k == 0
            start = meter.phase()
            hidden = decoder(
                input_ids=m["input_ids"], attention_mask=m["attention_mask"], use_cache=False
            ).last_hidden_state
            if first:
                out["activations_mb"] = meter.now() - start
                start = meter.phase()
            loss, _ = supervised_loss_sum(hidden, m["labels"], head)
            if first:
                out["loss_peak_mb"] = meter.peak() - start
                start = meter.phase()
            (loss / n_window).backward()
            if first:
                out["backward_peak_mb"] = meter.peak() - start
                out["after_backward_mb"] = meter.now() - after_lora
            del hidden, loss
        start = meter.phase()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if w == 0:
            out["optimizer_mb"] = meter.now() - start
    meter.peak()
    out["steady_peak_mb"] = meter.overall
    out["lora_param_mb"] = params_mb(model, trainable=True)
    out["optimizer_state_mb"] = 2 * out["lora_param_mb"]
    parts = (
        "baseline_mb", "weights_mb", "lora_mb", "vocab_narrow_mb", "activations_mb", "loss_peak_mb"
    )  # fmt: skip
    out["unexplained_mb"] = out["steady_peak_mb"] - sum(out[p] for p in parts) - out["optimizer_mb"]
    out["notes"] = notes(out)
    return out


def notes(m: dict) -> str:
    """What the numbers say about waste, in words (the table has the figures)."""
    said = []
    extra = m["weights_mb"] - m["weights_param_bytes_mb"]
    said.append(
        f"RSS after load is {m['weights_mb']:.0f} MB for {m['weights_param_bytes_mb']:.0f} MB of "
        f"parameters ({extra:+.0f} MB: modules imported at first load, allocator slack)"
    )
    if m["load_transient_mb"] > 0.1 * m["weights_param_bytes_mb"]:
        said.append(
            f"loading peaks {m['load_transient_mb']:.0f} MB higher than it ends: a transient copy "
            f"(the checkpoint file stays memory-mapped while each tensor is converted to fp32, "
            f"so the bf16 pages read count in RSS until the file is closed)"
        )
    else:
        said.append(
            f"loading peaks only {m['load_transient_mb']:.0f} MB above its end: lora/model.py "
            f"reads the checkpoint a tensor at a time (pread) instead of keeping the whole bf16 "
            f"file mapped while converting it to fp32"
        )
    return "; ".join(said) + "."


def main() -> int:
    if sys.argv[1:2] == ["estimate"]:  # the printed estimate against the measured peak
        from estimate_check import main as check_estimate

        return check_estimate(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=["ours"])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    torch.manual_seed(spec["seed"])
    result = breakdown(spec)
    Path(args.result).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
