"""Build a tiny, random-weight Qwen-architecture checkpoint and a tokenizer, fully offline.

Tests and `make demo` need a model that loads through exactly the same code path as a real
Qwen (`AutoModelForCausalLM.from_pretrained(dir)`), but trains in seconds on a CPU and needs no
download. This builds one: a byte-level BPE tokenizer trained on the given texts (with Qwen's
special tokens and a ChatML chat template) and a 2-layer qwen2 or qwen3 model of hidden size 64.
Its answers are meaningless; it exists to prove the pipeline.

    python tools/tiny_qwen.py OUT_DIR [--arch qwen2|qwen3] [--data data/chinese_med.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's ChatML template, minus tool calling.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's behaviour that matters for us: the final assistant turn and the generation prompt carry
# an empty think block when thinking is disabled.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def demo_texts(data_path) -> list[str]:
    """Every string in an Alpaca JSON file: enough to train a small tokenizer on."""
    rows = json.loads(Path(data_path).read_text(encoding="utf-8"))
    return [str(v) for row in rows for v in row.values()]


def build_tokenizer(texts, out_dir, vocab_size: int = 1000, arch: str = "qwen2"):
    """Train a byte-level BPE (any text encodes, no unknown token) and save it as a HF tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = ["Instruction", "Input", "Answer", "system", "user", "assistant", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + extra * 10, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = QWEN3_CHAT_TEMPLATE if arch == "qwen3" else QWEN2_CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def build_tiny_model(
    out_dir,
    arch: str = "qwen2",
    texts=None,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    initializer_range: float = 0.2,
):
    """Save a random-init tiny `arch` model plus tokenizer into `out_dir`; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if texts is None:
        texts = ["你好，世界。", "Hello world.", "地榆槐角丸用于痔疮。"]
    tokenizer = build_tokenizer(texts, out_dir, arch=arch)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        # Real checkpoints have output rows of large norm; with the usual 0.02 init and hidden
        # size 64, every logit stays below ~1.3 and no adapter could ever fit the data.
        initializer_range=initializer_range,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
    )
    if arch == "qwen3":
        common["head_dim"] = hidden_size // 4
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False
    )
    model.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=["qwen2", "qwen3"], default="qwen2")
    parser.add_argument(
        "--data",
        default="data/chinese_med.json",
        help="Alpaca JSON whose text trains the tokenizer",
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out_dir, args.arch, demo_texts(args.data), args.hidden_size, args.layers
    )
    print(
        f"tiny random {args.arch} model (meaningless answers, for offline checks) written to {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
