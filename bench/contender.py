"""One benchmark contender, run in its own fresh process by bench/run.py.

    python bench/contender.py {ours|peft-trainer|tutorial} --spec spec.json --result out.json

All contenders see the same rows (prepared by run.py with our data reader and label builder, so
label masking is identical), the same model, seed and hyper-parameters. What differs is what
users would otherwise run:
  ours          lora/ exactly as train.py runs it (length-grouped batches, supervised-only loss)
  peft-trainer  peft LoRA + transformers Trainer, DataCollatorForSeq2Seq dynamic padding
  tutorial      peft LoRA + Trainer with every row padded to max_length, as the tutorials do
Each measures all its optimizer steps (one epoch over the same rows), real and supervised tokens,
peak memory, and at the end the token-averaged loss of its adapter on the same held-out rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def heldout_loss(model, rows, device) -> float:
    """Token-averaged next-token loss on held-out rows, computed the same way for everyone."""
    from lora.loss import count_supervised

    model.eval()
    total = count = 0.0
    for r in rows:
        ids = torch.tensor([r["input_ids"]], device=device)
        labels = torch.tensor([r["labels"]], device=device)
        n = count_supervised(labels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * n
        count += n
    return total / count


def run_ours(spec, device):
    from lora.trainer import TrainConfig, train

    out = Path(spec["workdir"]) / "ours"
    cfg = TrainConfig(
        model=spec["model"],
        data=spec["train_file"],
        output=str(out),
        overwrite=True,
        targets="q_proj,v_proj",
        rank=8,
        alpha=16,
        dropout=0.0,
        batch_size=spec["batch_size"],
        grad_accum=spec["grad_accum"],
        lr=spec["lr"],
        warmup=0,
        max_steps=spec["steps"],
        max_len=spec["max_len"],
        seed=spec["seed"],
        progress=False,
        template="chat",
        device="cuda" if device.type == "cuda" else "cpu",
    )
    result = train(cfg)
    peak = peak_memory_mb(device)  # before the held-out evaluation loads anything more
    timed = result.history
    model = _reload_with_adapter(spec, out, device)
    return {
        "peak_memory_mb": peak,
        "seconds": sum(r["step_time_s"] for r in timed),
        "real_tokens": sum(r["real_tokens"] for r in timed),
        "supervised_tokens": sum(r["supervised_tokens"] for r in timed),
        "end_train_loss": result.history[-1]["loss"],
        "heldout_loss": heldout_loss(model, spec["heldout"], device),
    }


def _reload_with_adapter(spec, adapter_dir, device):
    from lora.adapter import load_adapter
    from lora.model import load_model

    model = load_model(
        spec["model"], torch.bfloat16 if device.type == "cuda" else torch.float32, device
    )
    load_adapter(model, adapter_dir, dropout=0.0)
    return model


def run_peft_trainer(spec, device, pad_to_max: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )

    rows = spec["train_rows"]
    if pad_to_max:  # the tutorial recipe: tokenizer(..., padding="max_length", max_length=512)
        L, pad = spec["max_len"], tokenizer.pad_token_id
        rows = [
            {
                "input_ids": r["input_ids"] + [pad] * (L - len(r["input_ids"])),
                "attention_mask": [1] * len(r["input_ids"]) + [0] * (L - len(r["input_ids"])),
                "labels": r["labels"] + [-100] * (L - len(r["labels"])),
            }
            for r in rows
        ]
    else:
        rows = [
            {
                "input_ids": r["input_ids"],
                "attention_mask": [1] * len(r["input_ids"]),
                "labels": r["labels"],
            }
            for r in rows
        ]

    seen = []  # per micro-batch: (real tokens, supervised tokens), in the order the Trainer draws them
    base_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collator(features):
        batch = base_collator(features)
        seen.append(
            (int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum()))
        )
        return batch

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append([time.perf_counter(), None])

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[-1][1] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / ("tutorial" if pad_to_max else "peft")),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"],
        max_steps=spec["steps"],
        warmup_steps=0,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device.type != "cuda",
        bf16=device.type == "cuda",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Timer()]
    )
    trainer.train()
    peak = peak_memory_mb(device)
    accum = spec["grad_accum"]
    timed = seen[: spec["steps"] * accum]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "peak_memory_mb": peak,
        "seconds": sum(b - a for a, b in times),
        "real_tokens": sum(t for t, _ in timed),
        "supervised_tokens": sum(s for _, s in timed),
        "end_train_loss": losses[-1] if losses else None,
        "heldout_loss": heldout_loss(model, spec["heldout"], device),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=["ours", "peft-trainer", "tutorial"])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = torch.device(
        "cuda" if torch.cuda.is_available() and spec.get("device", "auto") != "cpu" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.name == "ours":
        result = run_ours(spec, device)
    else:
        result = run_peft_trainer(spec, device, pad_to_max=args.name == "tutorial")
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Path(args.result).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
