"""A merged checkpoint: base + adapter as one plain Hugging Face model, no trace of LoRA.

`infer.py --export DIR` writes it; vLLM, transformers or any converter then loads it like the
base model. The chat template and stop tokens the adapter was trained with go along
(serving.py), so the merged model prompts itself the way training did.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..adapter import base_model_of, load_adapter, read_adapter_config, read_adapter_extra
from ..data.prompt import PromptFormat, stop_token_ids
from ..inject import merge_lora, remove_lora
from ..model import checkpoint_dtype, load_model, load_tokenizer
from .output import readable_as_usual, remove_stale_temporaries, temporary_prefix
from .serving import carry_prompt


def export_merged(
    adapter_dir, out_dir, model_override=None, trust_remote_code=False, log=print
) -> Path:
    """Write base + adapter as one plain Hugging Face checkpoint (no trace of LoRA).

    The output keeps the base checkpoint's dtype (a bf16 base exports at bf16 size). That dtype
    is read from the checkpoint's config *before* loading (a model loaded in fp32 reports fp32)
    and the base is loaded in it, exactly as stored. Each merge is computed in fp32 from the
    exact W0 and the fp32 adapter, then rounded once; in bf16/fp16 that rounding loses part of
    ΔW, and we say how much.
    The base is never quantized here, even for an adapter trained on an NF4/int8 base (QLoRA):
    merging into dequantized 4-bit weights would bake their rounding error into the model.
    """
    config = read_adapter_config(adapter_dir)
    base = base_model_of(adapter_dir, config, model_override)
    trained_on = read_adapter_extra(adapter_dir).get("base_quantization", "none")
    if trained_on != "none":
        log(
            f"note: the adapter was trained on a {trained_on}-quantized base; it is merged into "
            f"the original unquantized weights of {base}, not into quantized ones"
        )
    tokenizer = load_tokenizer(base, trust_remote_code)
    saved_dtype = checkpoint_dtype(base, trust_remote_code)
    model = load_model(base, saved_dtype, "cpu", trust_remote_code)
    load_adapter(model, adapter_dir, dropout=0.0)
    lost = merge_lora(model)
    remove_lora(model)
    if saved_dtype != torch.float32:
        log(
            f"note: merged in fp32 and saved as {str(saved_dtype).replace('torch.', '')} like the "
            f"base; rounding lost up to {lost:.0%} of a layer's update (logits differ slightly "
            f"from base + adapter)"
        )
    fmt = PromptFormat.from_dict(read_adapter_extra(adapter_dir).get("prompt_format"))
    stops = stop_token_ids(tokenizer, fmt, model.generation_config)
    carry_prompt(model, tokenizer, fmt, stops)  # chat template and stop tokens as trained
    model.config.use_cache = True
    return save_whole(model, tokenizer, Path(out_dir))


def save_whole(model, tokenizer, out_dir: Path) -> Path:
    """`save_pretrained` into a hidden temporary directory, then move it into place.

    A crash or a full disk mid-write leaves no half-written checkpoint in `out_dir`: a new
    directory appears whole, by one rename; into an existing one every file is moved by
    `os.replace`, so each file is the old one or the new one, never a part.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # a killed export's (output.py)
    tmp = out_dir.parent / temporary_prefix(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(
                errno.EIO, f"{e}".removeprefix("Error while serializing: "), str(tmp)
            ) from None
        tokenizer.save_pretrained(tmp)
        readable_as_usual(tmp)  # some writers make 0600 files; a server may run as another user
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return out_dir
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
