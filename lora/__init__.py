"""LoRA fine-tuning for Qwen models, in plain PyTorch. Start reading here.

The files at the top of the package are LoRA itself and what every stage shares, in reading
order. Each folder after them is one stage of the pipeline, in the order a run goes through
them; its `__init__.py` gives that stage's own reading order. Imports flow one way: the top
files import no stage, and a stage imports only the top files and earlier stages.

LoRA itself:
    spec.py        what a LoRA setup is: targets, rank r, alpha, dropout; LoRA's defaults
    layer.py       LoRALinear: h = W0 x + (α/r) · B A x, merge/unmerge
    inject.py      putting LoRALinear into a model, freezing the rest
    lora_plus.py   LoRA+: B's learning rate λ times A's (two optimizer groups)
    dora.py        DoRA: a trainable magnitude per row, W' = m · (W0 + s·BA) / ‖W0 + s·BA‖_c
    adapter.py     saving/loading adapters in PEFT's safetensors format
    quantize.py    QLoRA: the frozen base in 4-bit NF4 or int8 (bitsandbytes, optional)
    model.py       loading the base model and tokenizer
    inspect.py     what an adapter learned: ‖ΔW‖, spectra and rank of ΔW, amplification
    errors.py      UserError: every mistake a user can make ends in one clear line

The stages:
    data/          bytes → records → prompts and labels → tokenized, cached, batched
    train/         the settings, the run, the loop and its loss, memory, precision, checkpoints,
                   reporting, several processes
    infer/         generating with an adapter, answering files of questions, scoring answers
    export/        a merged checkpoint, serving templates, one GGUF file

`examples/lora_in_one_screen.py` is all of LoRA in one runnable page, before the full trainer.
Importing `lora` is cheap: the names below load their module (and torch) on first use.
"""

import importlib

_EXPORTS = {
    "LoRALinear": "layer",
    "LoRASpec": "spec",
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
