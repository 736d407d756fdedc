"""Inference with a trained adapter: load, prompt exactly as in training, generate, export.

The adapter directory records how training built its prompts (template, system prompt) and
which tokens end an answer. Inference reuses `prompt.encode_prompt`, the same builder that
made the training data, so the model sees token for token what it was trained on up to the
answer, and generation stops on every end token the model knows (for Qwen: `<|im_end|>` and
`<|endoftext|>`). Generating is transformers' `model.generate` on our LoRA-injected model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import load_adapter, read_adapter_config, read_adapter_extra
from .data import Sample, Turn
from .errors import UserError
from .inject import lora_disabled, remove_lora
from .model import load_model, load_tokenizer
from .precision import inference_dtype, pick_device
from .prompt import PromptFormat, encode_prompt, stop_token_ids
from .serving import carry_prompt


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature and self.temperature > 0:
            args = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            if self.top_k:
                args["top_k"] = self.top_k
        else:
            args = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.repetition_penalty != 1.0:
            args["repetition_penalty"] = self.repetition_penalty
        return {"max_new_tokens": self.max_new_tokens, **args}


@dataclass
class LoadedAdapter:
    model: torch.nn.Module
    tokenizer: object
    fmt: PromptFormat
    stop_ids: list[int]
    config: dict
    base_model: str


def base_model_of(adapter_dir, config: dict, model_override: str | None) -> str:
    """`--model` when given, else the base model recorded in the adapter's config."""
    base = model_override or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model; pass --model")
    return base


def load_for_inference(
    adapter_dir,
    model_override: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedAdapter:
    """Base model (from the adapter's config or `--model`) + adapter, ready to generate."""
    config = read_adapter_config(adapter_dir)
    base = base_model_of(adapter_dir, config, model_override)
    dev = pick_device(device)
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = load_model(base, inference_dtype(dtype, dev), dev, trust_remote_code)
    load_adapter(model, adapter_dir, dropout=0.0)
    model.eval()
    model.config.use_cache = True
    extra = read_adapter_extra(adapter_dir)
    if "prompt_format" in extra:
        fmt = PromptFormat.from_dict(extra["prompt_format"])
    else:  # an adapter trained elsewhere (e.g. with peft): use the tokenizer's own template
        fmt = PromptFormat("chat" if getattr(tokenizer, "chat_template", None) else "plain")
    stops = sorted(
        set(extra.get("stop_token_ids") or [])
        | set(stop_token_ids(tokenizer, fmt, model.generation_config))
    )
    return LoadedAdapter(model, tokenizer, fmt, stops, config, base)


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def generate_batch(
    loaded: LoadedAdapter, samples: list[Sample], settings: GenerationSettings, streamer=None
) -> list[dict]:
    """Answer the last user turn of each sample. Returns [{"answer", "stopped", "new_tokens"}]."""
    tok, model = loaded.tokenizer, loaded.model
    prompts = [encode_prompt(s, loaded.fmt, tok) for s in samples]
    limit = context_length(model)
    for p in prompts:
        if limit and len(p) + 1 > limit:
            raise UserError(
                f"the prompt is {len(p)} tokens, longer than the model's context of {limit} tokens"
            )
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    # Left padding: every prompt ends at the same position, where generation starts.
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
    )
    max_new = settings.max_new_tokens
    if limit:
        max_new = max(1, min(max_new, limit - width))
    kwargs = settings.kwargs() | {"max_new_tokens": max_new}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        eos_token_id=loaded.stop_ids,
        pad_token_id=pad,
        streamer=streamer,
        **kwargs,
    )
    results = []
    for row in out[:, width:].tolist():
        stop_at = next((i for i, t in enumerate(row) if t in loaded.stop_ids), None)
        new = row if stop_at is None else row[:stop_at]
        results.append(
            {
                "answer": tok.decode(new, skip_special_tokens=True).strip(),
                "stopped": stop_at is not None,
                "new_tokens": len(new),
            }
        )
    return results


def generate_compare(loaded: LoadedAdapter, samples, settings) -> list[dict]:
    """Base and fine-tuned answers to the same prompts: the before/after view."""
    if any(getattr(m, "merged", False) for m in loaded.model.modules()):
        raise UserError("--compare needs the adapter unmerged (drop --merge)")
    tuned = generate_batch(loaded, samples, settings)
    with lora_disabled(loaded.model):
        base = generate_batch(loaded, samples, settings)
    return [{"base": b, "tuned": t} for b, t in zip(base, tuned)]


def export_merged(
    adapter_dir, out_dir, model_override=None, trust_remote_code=False, log=print
) -> Path:
    """Write base + adapter as one plain Hugging Face checkpoint (no trace of LoRA).

    The merge happens in fp32 (the base is loaded in fp32), then the weights are cast back to
    the base checkpoint's own dtype. In bf16/fp16 that rounding changes logits slightly.
    """
    config = read_adapter_config(adapter_dir)
    base = base_model_of(adapter_dir, config, model_override)
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = load_model(base, torch.float32, "cpu", trust_remote_code)
    saved_dtype = _checkpoint_dtype(model)
    load_adapter(model, adapter_dir, dropout=0.0)
    remove_lora(model)
    model.to(saved_dtype)
    if saved_dtype != torch.float32:
        log(
            f"note: merged in fp32 and saved as {str(saved_dtype).replace('torch.', '')} like the base; "
            f"rounding makes logits differ slightly from base + adapter"
        )
    fmt = PromptFormat.from_dict(read_adapter_extra(adapter_dir).get("prompt_format"))
    stops = stop_token_ids(tokenizer, fmt, model.generation_config)
    carry_prompt(model, tokenizer, fmt, stops)  # chat template and stop tokens as trained
    model.config.use_cache = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _checkpoint_dtype(model) -> torch.dtype:
    value = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def single_turn(prompt: str, user_input: str = "") -> Sample:
    return Sample(turns=(Turn(prompt, "", user_input),))
