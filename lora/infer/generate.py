"""Inference with a trained adapter: load, prompt exactly as in training, generate, merge.

The adapter directory records how training built its prompts (template, system prompt) and
which tokens end an answer. Inference reuses `prompt.encode_prompt`, the same builder that
made the training data, so the model sees token for token what it was trained on up to the
answer, and generation stops on every end token the model knows (for Qwen: `<|im_end|>` and
`<|endoftext|>`). Generating is transformers' `model.generate` on our LoRA-injected model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    base_model_of,
    load_adapter,
    read_adapter_config,
    read_adapter_extra,
)
from ..data.prompt import PromptFormat, encode_prompt, split_reasoning, stop_token_ids
from ..data.records import Sample, Turn
from ..errors import UserError
from ..inject import lora_disabled, merge_lora
from ..model import load_model, load_tokenizer
from ..quantize import quantization_config
from ..train.precision import inference_dtype, pick_device
from .sampling import GenerationSettings  # noqa: F401  (re-exported: generate's settings)


@dataclass
class LoadedAdapter:
    model: torch.nn.Module
    tokenizer: object
    fmt: PromptFormat
    stop_ids: list[int]
    config: dict
    base_model: str
    system_source: str | None = None  # "--system", "adapter" (train.py --system), "data", None
    adapter_sha256: str = ""  # of the adapter's weights and config: which adapter answers
    quantize: str = "none"  # how the base was loaded (--quantize)


@dataclass(frozen=True)
class LoadOptions:
    """How to load the base under an adapter: infer.py's --model, --device, --dtype, --quantize,
    --trust-remote-code and --system, with their defaults."""

    model: str | None = None  # None: the base model recorded in the adapter's config
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    quantize: str = "none"
    trust_remote_code: bool = False
    system: str | None = None


def load_for_inference(adapter_dir, options: LoadOptions | None = None) -> LoadedAdapter:
    """Base model (from the adapter's config or `--model`) + adapter, ready to generate.

    The system prompt of a question without its own: `options.system` (infer.py --system), else
    the one training gave every row (train.py --system), else the one most training rows carried.
    `options.quantize` ("nf4", "int8") loads the base quantized (QLoRA, see quantize.py),
    whatever base the adapter was trained on; the adapter itself stays in full precision.
    """
    o = options or LoadOptions()
    config = read_adapter_config(adapter_dir)
    base = base_model_of(adapter_dir, config, o.model)
    dev = pick_device(o.device)
    tokenizer = load_tokenizer(base, o.trust_remote_code)
    compute_dtype = inference_dtype(o.dtype, dev)
    quantized = quantization_config(o.quantize, compute_dtype)
    model = load_model(base, compute_dtype, dev, o.trust_remote_code, quantized)
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
    fmt, source = inference_system(fmt, o.system)
    return LoadedAdapter(
        model, tokenizer, fmt, stops, config, base, source, adapter_digest(adapter_dir), o.quantize
    )


def adapter_digest(adapter_dir) -> str:
    """sha256 of the adapter's weights and config: the same digest, the same adapter, wherever
    its directory is (answers.py records it beside every answer)."""
    h = hashlib.sha256()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        path = Path(adapter_dir) / name
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def inference_system(fmt: PromptFormat, system: str | None) -> tuple[PromptFormat, str | None]:
    """The format with the system prompt inference uses, and where that prompt comes from."""
    if system is not None:
        return replace(fmt, system=system or None), "--system"
    if fmt.system:
        return fmt, "adapter"
    if fmt.data_system:
        return replace(fmt, system=fmt.data_system), "data"
    return fmt, None


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def generate_batch(
    loaded: LoadedAdapter, samples: list[Sample], settings: GenerationSettings, streamer=None
) -> list[dict]:
    """Answer the last user turn of each sample.

    Returns [{"answer", "reasoning", "stopped", "new_tokens"}]: a `<think>…</think>` block the
    model writes first (reasoning-trained adapters) is `reasoning`, the rest is `answer`.
    """
    tok, model = loaded.tokenizer, loaded.model
    prompts = [encode_prompt(s, loaded.fmt, tok) for s in samples]
    limit = context_length(model)
    for p in prompts:
        if limit and len(p) + 1 > limit:
            raise UserError(
                f"the prompt is {len(p)} tokens, longer than the model's context of {limit} tokens"
            )
    # Left padding: every prompt ends at the same position, where generation starts.
    input_ids, attention = left_padded(prompts, tok.pad_token_id, next(model.parameters()).device)
    width, pad = input_ids.shape[1], tok.pad_token_id
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
        reasoning, answer = split_reasoning(tok.decode(new, skip_special_tokens=True))
        results.append(
            {
                "answer": answer,
                "reasoning": reasoning,
                "stopped": stop_at is not None,
                "new_tokens": len(new),
            }
        )
    return results


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (batch, longest): shorter prompts padded on the left, so that
    every prompt ends at the last position."""
    width = max(map(len, prompts))
    ids = [[pad] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def generate_compare(loaded: LoadedAdapter, samples, settings, streamer_for=None) -> list[dict]:
    """Base and fine-tuned answers to the same prompts: the before/after view.

    `streamer_for(model)`, if given, returns the streamer of that model's generation
    ("fine-tuned", then "base"): answers.py shows with it which model is answering.
    """
    if any(getattr(m, "merged", False) for m in loaded.model.modules()):
        raise UserError("--compare needs the adapter unmerged (drop --merge)")
    streamer = streamer_for or (lambda model: None)
    tuned = generate_batch(loaded, samples, settings, streamer("fine-tuned"))
    with lora_disabled(loaded.model):
        base = generate_batch(loaded, samples, settings, streamer("base"))
    return [{"base": b, "tuned": t} for b, t in zip(base, tuned)]


@dataclass
class MergeReport:
    dtype: torch.dtype  # of the merged weights
    lost: float  # largest fraction of a layer's ΔW lost to rounding
    max_logit_diff: float  # max |logit| difference, merged vs unmerged, on the measured prompt

    def message(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        if self.dtype == torch.float32:
            head = "merged in fp32 (exact up to float rounding)"
        else:
            head = (
                f"merged in fp32 and rounded into {name} weights: up to {self.lost:.0%} of a "
                f"layer's update was rounded away (--dtype fp32 merges exactly)"
            )
        return f"note: {head}; max |logit difference| merged vs unmerged on the prompt: {self.max_logit_diff:.3g}"


@torch.no_grad()
def merge_and_measure(loaded: LoadedAdapter, sample: Sample) -> MergeReport:
    """Merge the adapters for generation, measuring what merging changed on `sample`'s prompt.

    Merging is meant to change nothing but speed. In fp32 that holds; in bf16/fp16 rounding
    the merged weights loses part of the update, so we measure the logits before and after.
    """
    model = loaded.model
    ids = torch.tensor([encode_prompt(sample, loaded.fmt, loaded.tokenizer)])
    ids = ids.to(next(model.parameters()).device)
    before = model(ids).logits.float()
    lost = merge_lora(model)
    after = model(ids).logits.float()
    dtype = next(model.parameters()).dtype
    return MergeReport(dtype, lost, float((after - before).abs().max()))


def single_turn(prompt: str, user_input: str = "") -> Sample:
    return Sample(turns=(Turn(prompt, "", user_input),))
