"""LoRA fine-tuning for Qwen models, in plain PyTorch.

Reading order (each file holds one idea):
    layer.py      LoRALinear: h = W0 x + (α/r) · B A x, merge/unmerge
    inject.py     putting LoRALinear into a model, freezing the rest
    adapter.py    saving/loading adapters in PEFT's safetensors format
    model.py      loading the base model and tokenizer
    data.py       reading instruction files (JSON/JSONL/CSV, encodings, schemas, bad rows)
    prompt.py     prompt templates and label masking (what the model learns to say)
    batching.py   length-grouped batches with dynamic padding
    loss.py       shifted cross-entropy on supervised positions only, chunked
    schedule.py   learning-rate warmup + cosine decay
    checkpoint.py saving/resuming the full training state atomically
    trainer.py    the training loop: precision, accumulation, evaluation, checkpoints
    generate.py   inference: prompts, stop tokens, streaming, export of a merged model
    distributed.py torchrun/DDP helpers
"""

from .adapter import load_adapter, save_adapter
from .errors import UserError
from .inject import apply_lora, lora_parameters, merge_lora, unmerge_lora
from .layer import LoRALinear

__all__ = [
    "LoRALinear",
    "UserError",
    "apply_lora",
    "load_adapter",
    "lora_parameters",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]
