"""LoRA fine-tuning for Qwen models, in plain PyTorch.

Reading order (each file holds one idea):
    layer.py       LoRALinear: h = W0 x + (α/r) · B A x, merge/unmerge
    inject.py      putting LoRALinear into a model, freezing the rest
    lora_plus.py   LoRA+: B's learning rate λ times A's (two optimizer groups)
    dora.py        DoRA: a trainable magnitude per row, W' = m · (W0 + s·BA) / ‖W0 + s·BA‖_c
    adapter.py     saving/loading adapters in PEFT's safetensors format
    model.py       loading the base model and tokenizer
    quantize.py    QLoRA: the frozen base in 4-bit NF4 or int8 (bitsandbytes, optional)
    fileformat.py  bytes to records: encodings, JSON/JSONL/CSV containers
    data.py        records to conversations: schemas, bad rows, what was kept
    mixture.py     several --data files, each epoch's rows drawn by the files' weights
    prompt.py      prompt templates and label masking (what the model learns to say)
    prepare.py     the training set: split, tokenize in batches, summarize
    tokenized.py   the tokenized rows in flat int32 arrays, memory-mapped from disk
    cache.py       prepared data cached by a hash of file, tokenizer and settings
    batching.py    length-grouped batches with dynamic padding, epoch by epoch
    loss.py        shifted cross-entropy on supervised positions only, chunked
    activations.py what backward keeps: the MLP's g and u, not silu(g); dropout's 1-byte mask
    schedule.py    learning-rate warmup + cosine decay
    precision.py   device and precision: fp32, bf16, fp16 + GradScaler
    vocab_storage.py  fp32 runs: the frozen embedding and head stay bf16, widened where used
    config.py      every setting of a run and its default
    cost.py        what a run costs: the memory estimate before step 1, the summary after
    run.py         the Run: everything a training run holds, built once by setup()
    trainer.py     the training loop: accumulation, the optimizer step, finishing
    evaluate.py    validation loss, exact across processes; keeping the best adapter
    checkpoint.py  saving/resuming the full training state atomically
    rundir.py      the output directory: fresh, resume or finished; train_args.json
    metrics.py     metrics.jsonl, the loss plot, the progress bar, the startup summary
    tracking.py    --report-to: the same records to TensorBoard, W&B or SwanLab (optional)
    distributed.py torchrun/DDP helpers and stop signals
    sharding.py    DDP or FSDP under torchrun: wrapping the model, where it loads
    sampling.py    generation settings: greedy by default, sampling with a temperature
    generate.py    inference: prompts, stop tokens, merge, export of a merged model
    answers.py     answering a file of questions: batched, streamed, resumable
    score.py       did it help? reference likelihood, BLEU/ROUGE, answer health
    serving.py     the trained prompt for servers: chat template, Ollama Modelfile
    gguf.py        one GGUF file for llama.cpp / Ollama
    inspect.py     what an adapter learned: ‖ΔW‖, spectra and rank of ΔW, amplification
    errors.py      UserError: every mistake a user can make ends in one clear line

Importing `lora` is cheap: the names below load their module (and torch) on first use.
"""

import importlib

_EXPORTS = {
    "LoRALinear": "layer",
    "UserError": "errors",
    "apply_lora": "inject",
    "lora_parameters": "inject",
    "merge_lora": "inject",
    "unmerge_lora": "inject",
    "load_adapter": "adapter",
    "save_adapter": "adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
