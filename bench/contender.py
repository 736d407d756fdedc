"""One benchmark contender, run in its own fresh process by bench/run.py.

    python bench/contender.py {ours|peft-trainer|tutorial|trl} --spec spec.json --result out.json

All contenders see the same rows, the same model, seed and hyper-parameters, and gradient
checkpointing on or off as the spec's `grad_checkpointing` says. What differs is what users
would otherwise run:
  ours          lora/ exactly as train.py runs it (length-grouped batches, supervised-only loss)
  peft-trainer  peft LoRA + transformers Trainer, DataCollatorForSeq2Seq dynamic padding
  tutorial      peft LoRA + Trainer with every row padded to max_length, as the tutorials do
  trl           TRL's SFTTrainer + SFTConfig + peft LoraConfig on conversational prompt/completion
                rows, completion_only_loss, as TRL's docs recommend; TRL tokenizes the rows itself
ours, peft-trainer and tutorial get rows tokenized and labelled by our code (run.py), so their
label masking is identical; trl gets the same conversations as text.
Each reports, per optimizer step, its wall time and its real (non-padding: attention mask) and
supervised tokens; run.py drops the warm-up steps. Also peak memory, and at the end the
token-averaged loss of its adapter on the same held-out rows (tokenized by our code for all).
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
    from lora.train.loss import count_supervised

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
    from lora.train.config import TrainConfig
    from lora.train.loop import train

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
        grad_checkpointing=spec["grad_checkpointing"],
    )
    result = train(cfg)
    peak = peak_memory_mb(device)  # before the held-out evaluation loads anything more
    steps = result.history
    model = _reload_with_adapter(spec, out, device)
    return {
        "peak_memory_mb": peak,
        "step_times": [r["step_time_s"] for r in steps],
        "step_real_tokens": [r["real_tokens"] for r in steps],
        "step_supervised_tokens": [r["supervised_tokens"] for r in steps],
        "end_train_loss": steps[-1]["loss"],
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

    base_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / ("tutorial" if pad_to_max else "peft")),
        gradient_checkpointing=spec["grad_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        **shared_training_args(spec, device),
    )
    probe = StepProbe(spec, device)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=probe.counting(base_collator),
        callbacks=[probe.callback()],
    )
    trainer.train()
    return probe.result(trainer, model)


def shared_training_args(spec, device) -> dict:
    """TrainingArguments every Trainer-based contender shares: our hyper-parameters, one log a step."""
    return dict(
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
        use_cpu=device.type != "cuda",
        # Ours trains fp32 on CPU and bf16 autocast on CUDA: the others do the same (TRL's own
        # default would be bf16 autocast even on CPU, a different computation).
        bf16=device.type == "cuda",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        disable_tqdm=True,
    )


class StepProbe:
    """Per optimizer step of a transformers Trainer: wall time, real and supervised tokens.

    Tokens are counted where the batches are made (the collator), exactly as ours counts them:
    real = attention-mask ones, supervised = labels ≠ -100 after the next-token shift.
    """

    def __init__(self, spec, device):
        self.spec, self.device = spec, device
        self.seen = []  # per micro-batch, in the order the Trainer draws them
        self.times = []

    def counting(self, collator):
        def collate(features):
            batch = collator(features)
            self.seen.append(
                (int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum()))
            )
            return batch

        return collate

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                probe._sync()
                probe.times.append([time.perf_counter(), None])

            def on_step_end(self, args, state, control, **kw):
                probe._sync()
                probe.times[-1][1] = time.perf_counter()

        return Timer()

    def result(self, trainer, model) -> dict:
        peak = peak_memory_mb(self.device)
        # The data loader may draw one micro-batch ahead: keep only the windows that trained.
        accum = self.spec["grad_accum"]
        windows = [self.seen[i : i + accum] for i in range(0, len(self.times) * accum, accum)]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return {
            "peak_memory_mb": peak,
            "step_times": [b - a for a, b in self.times],
            "step_real_tokens": [sum(t for t, _ in w) for w in windows],
            "step_supervised_tokens": [sum(s for _, s in w) for w in windows],
            "end_train_loss": losses[-1] if losses else None,
            "heldout_loss": heldout_loss(model, self.spec["heldout"], self.device),
        }


def run_trl(spec, device):
    """TRL's recommended LoRA SFT on prompt/completion conversations (TRL 1.16 API)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(spec["conversations"])
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"),
        max_length=spec["max_len"],
        completion_only_loss=True,
        packing=False,
        gradient_checkpointing=spec["grad_checkpointing"],
        **shared_training_args(spec, device),
    )
    # The model object, not its path: TRL picks the class from config.architectures, which a
    # checkpoint converted from GGUF (../shared's real model) does not record.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation="sdpa"
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        args=args,
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    probe = StepProbe(spec, device)
    trainer.data_collator = probe.counting(trainer.data_collator)
    trainer.add_callback(probe.callback())
    trainer.train()
    return probe.result(trainer, trainer.model)


def run_contender(name, spec, device) -> dict:
    if name == "ours":
        return run_ours(spec, device)
    if name == "trl":
        return run_trl(spec, device)
    return run_peft_trainer(spec, device, pad_to_max=name == "tutorial")


def profiled(name, spec, device, out: Path) -> dict:
    """The contender under torch.profiler (CPU ops): where its time goes, op by op.

    The profile spans the whole process after start-up: loading, every step, and the held-out
    loss (cut to one row here); `step_s` says how much of it is training. Self time: an op's own
    time, without the ops it calls, so the rows add up to the total.
    """
    from torch.profiler import ProfilerActivity, profile

    spec = spec | {"heldout": spec["heldout"][:1]}
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run_contender(name, spec, device)
    wall = time.perf_counter() - t
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [
        {"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6}
        for e in events
        if e.self_cpu_time_total > 0
    ]
    summary = {"wall_s": wall, "step_s": sum(result["step_times"]), "ops": ops}
    out.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=["ours", "peft-trainer", "tutorial", "trl"])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--profile", help="also write torch.profiler's top ops here (JSON)")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = torch.device(
        "cuda" if torch.cuda.is_available() and spec.get("device", "auto") != "cpu" else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.profile:
        result = profiled(args.name, spec, device, Path(args.profile))
    else:
        result = run_contender(args.name, spec, device)
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Path(args.result).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
