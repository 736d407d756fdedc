"""Writing the merged model as one GGUF file, the format llama.cpp, Ollama and LM Studio read.

What GGUF is
    One binary file holding everything a runtime needs, with no Python and no config.json:

        header          magic "GGUF", version, number of tensors and of metadata entries
        metadata        typed key/value pairs: the architecture and its shape, the tokenizer
                        (vocabulary, merges, special ids, chat template), the file's weight type
        tensor infos    name, shape and type (f32, f16, bf16, q8_0, ...) of each tensor
        tensor data     the weights, each aligned to 32 bytes, so they can be memory-mapped

    We write it with the `gguf` package (llama.cpp's own Python library, an optional dependency:
    `pip install gguf`): `GGUFWriter` lays out the bytes, `gguf.constants` names the keys,
    `gguf.get_tensor_name_map` gives llama.cpp's tensor names and `gguf.quants` quantizes q8_0.

The metadata llama.cpp reads (ARCH is `qwen2` or `qwen3`)
    general.architecture                  which graph to build: qwen2 (Qwen1.5/2/2.5) or qwen3
    ARCH.block_count                      number of decoder layers
    ARCH.context_length                   max_position_embeddings: the context it was trained for
    ARCH.embedding_length                 hidden size
    ARCH.feed_forward_length              the MLP's intermediate size
    ARCH.attention.head_count(_kv)        query heads, and key/value heads (grouped-query attention)
    ARCH.attention.key_length/value_length  head dimension (Qwen3's is not hidden / heads)
    ARCH.attention.layer_norm_rms_epsilon the RMSNorm epsilon
    ARCH.rope.freq_base                   RoPE's base (rope_theta): positions are wrong without it
    general.file_type                     the weights' main type (all f32, mostly f16, ...)
    tokenizer.ggml.model = "gpt2"         byte-level BPE, like GPT-2 and every Qwen
    tokenizer.ggml.pre                    how text is split into words before BPE ("qwen2": digits
                                          one by one, "gpt-2": digit runs). A wrong value loads
                                          silently and tokenizes numbers and code differently
    tokenizer.ggml.tokens / token_type / merges   the vocabulary, each token's kind (normal,
                                          control = special, user-defined = added), BPE merges
    tokenizer.ggml.bos/eos/padding_token_id, add_bos_token   the special ids
    tokenizer.chat_template               the Jinja template rendering the trained prompt

Tensors
    HF `model.layers.N.self_attn.q_proj.weight` becomes `blk.N.attn_q.weight`, and so on (the
    package's table). Shapes stay as PyTorch has them: GGUF lists dimensions innermost first, and
    the writer reverses them. Unlike llama, llama.cpp's qwen2/qwen3 graphs do not permute the
    rows of q/k for RoPE, so q and k are written as they are (transformers reads them back the
    same way). The 1-D tensors (norms, biases) are always f32, as llama.cpp expects; q8_0 needs
    rows that are a multiple of 32 long, otherwise that tensor is written f16. With a tied
    `lm_head` no `output.weight` is written and llama.cpp reuses the embedding.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .output import check_output_path, readable_as_usual, remove_stale_temporaries, temporary_prefix

SUPPORTED_ARCHS = ("qwen2", "qwen3")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# The pre-tokenizer split of Qwen2/2.5/3 tokenizers (tokenizer.json), llama.cpp's "qwen2".
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def check_architecture(model_type: str | None) -> str:
    if model_type not in SUPPORTED_ARCHS:
        raise UserError(
            f"GGUF export supports the {' and '.join(SUPPORTED_ARCHS)} architectures (Qwen1.5/2/2.5/3), "
            f"not {model_type!r}; use --export DIR and llama.cpp's convert_hf_to_gguf.py"
        )
    return model_type


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this tokenizer splits text before BPE.

    llama.cpp knows each split by name only, so we recognise it from tokenizer.json and refuse
    any other: a wrong name would load silently and tokenize digits and code differently.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    steps = spec.get("pretokenizers") or []
    if (
        spec.get("type") == "Sequence"
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        return "qwen2"
    raise UserError(
        "this tokenizer's pre-tokenizer is neither Qwen2's nor GPT-2's, so llama.cpp "
        "could not reproduce it; GGUF export is not possible"
    )


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Tokens, token types and merges as llama.cpp's byte-level BPE wants them.

    `vocab_size` is the embedding's row count; ids the tokenizer does not use (Qwen2.5 pads
    151,665 tokens to 151,936 rows) become `[PADn]` tokens of type UNUSED, as llama.cpp writes.
    """
    gguf = import_gguf()
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError("GGUF export needs a byte-level BPE tokenizer (as every Qwen has)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _tensor_type(gguf, array: np.ndarray, gguf_type: str):
    """The GGML type a tensor is stored in: 1-D ones always f32; q8_0 needs rows % 32 == 0."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0":
        return Q.Q8_0 if array.shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


@dataclass(frozen=True)
class GGUFOptions:
    """What goes into a GGUF file besides the weights: the weight type (--gguf-type), the chat
    template and end-of-turn token the adapter was trained with, and the model's display name."""

    gguf_type: str = "f16"
    chat_template: str | None = None
    eos_token_id: int | None = None  # None: the tokenizer's own
    name: str = ""


def write_gguf(model, tokenizer, path, options: GGUFOptions | None = None, log=print) -> Path:
    """Write `model` (a merged qwen2/qwen3 `...ForCausalLM`, any dtype) and its tokenizer.

    Everything that can be refused is checked before the file is created; the file is written
    under a temporary name and renamed into place.
    """
    o = options or GGUFOptions()
    gguf = import_gguf()
    arch_name = check_architecture(getattr(model.config, "model_type", None))
    if o.gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {o.gguf_type!r}")
    path = check_output_path(path)
    pre = pre_tokenizer_name(tokenizer)
    _rope_theta(model.config)  # refuses RoPE scaling before anything is written
    state = model.state_dict()
    tied = (
        bool(getattr(model.config, "tie_word_embeddings", False)) or "lm_head.weight" not in state
    )
    vocab = tokenizer_metadata(tokenizer, state["model.embed_tokens.weight"].shape[0])

    tmp = w = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temporary_prefix(path)}-")
        os.close(fd)
        w = gguf.GGUFWriter(tmp, arch_name)
        _add_model_metadata(w, gguf, model.config, o)
        _add_tokenizer(w, tokenizer, vocab, pre, model.config, o)
        tensors = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
        _add_tensors(w, gguf, tensors, arch_name, model.config, o.gguf_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        readable_as_usual(Path(tmp))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        cause = e.strerror or str(e)
        if "requested and" in cause:  # numpy's short write: the file system took no more
            cause = f"the disk is full ({cause} bytes)"
        raise UserError(f"could not write {path}: {cause}") from None
    finally:
        if w is not None:
            w.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    log(
        f"GGUF ({o.gguf_type}, {arch_name}, pre-tokenizer {pre}, {'tied' if tied else 'untied'} "
        f"lm_head) written to {path}"
    )
    return path


def _add_model_metadata(w, gguf, config, o: GGUFOptions) -> None:
    """The architecture's hyperparameters, as llama.cpp's loader reads them."""
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    w.add_name(o.name or "merged LoRA fine-tune")
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[o.gguf_type]))
    if o.gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(n_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)


def _add_tokenizer(w, tokenizer, vocab: dict, pre: str, config, o: GGUFOptions) -> None:
    """The byte-level BPE vocabulary, merges, special tokens and the chat template."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    if bos is not None:
        w.add_bos_token_id(bos)
    eos = o.eos_token_id if o.eos_token_id is not None else tokenizer.eos_token_id
    if eos is not None:
        w.add_eos_token_id(eos)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if o.chat_template:
        w.add_chat_template(o.chat_template)


def _add_tensors(w, gguf, state: dict, arch_name: str, config, gguf_type: str) -> None:
    """Every weight under its GGUF name, in the asked type (norms and biases stay f32); `state`
    holds lm_head.weight only when the head is not tied to the embedding."""
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in state.items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise UserError(f"no GGUF name for tensor {hf_name} of a {arch_name} model")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        qtype = _tensor_type(gguf, array, gguf_type)
        w.add_tensor(f"{gguf_base}.{suffix}", gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise UserError(f"RoPE scaling {kind!r} is not supported by GGUF export yet")
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    if theta is None:
        raise UserError("the model config has no rope_theta")
    return float(theta)


def export_gguf(
    adapter_dir,
    out_path,
    gguf_type: str = "f16",
    model_override: str | None = None,
    trust_remote_code: bool = False,
    log=print,
) -> tuple[Path, Path]:
    """Base + adapter merged in fp32, written as one GGUF file, with an Ollama `Modelfile` beside it.

    Everything that can be refused is checked before the model loads, and both files are written
    under a temporary name and renamed, so a failure leaves nothing half-written.
    """
    from transformers import AutoConfig

    from ..adapter import (
        atomic_write_bytes,
        base_model_of,
        load_adapter,
        read_adapter_config,
        read_adapter_extra,
    )
    from ..data.prompt import PromptFormat, stop_token_ids
    from ..inject import remove_lora
    from ..model import load_model, load_tokenizer
    from .serving import chat_template, end_token_id, modelfile, usable_format

    import_gguf()
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    path = check_output_path(out_path)
    config = read_adapter_config(adapter_dir)
    base = base_model_of(adapter_dir, config, model_override)
    tokenizer = load_tokenizer(base, trust_remote_code)
    try:
        model_type = AutoConfig.from_pretrained(
            base, trust_remote_code=trust_remote_code
        ).model_type
    except Exception as e:
        raise UserError(f"could not read the config of {base}: {e}") from None
    check_architecture(model_type)
    pre_tokenizer_name(tokenizer)
    extra = read_adapter_extra(adapter_dir)
    fmt = usable_format(tokenizer, PromptFormat.from_dict(extra.get("prompt_format")))
    model = load_model(base, torch.float32, "cpu", trust_remote_code)
    load_adapter(model, adapter_dir, dropout=0.0)
    remove_lora(model)  # merged in fp32; the GGUF type is applied per tensor when writing
    stops = sorted(
        set(extra.get("stop_token_ids") or [])
        | set(stop_token_ids(tokenizer, fmt, model.generation_config))
    )
    modelfile_text = modelfile(path.name, tokenizer, fmt, stops)  # refuses before writing
    options = GGUFOptions(
        gguf_type,
        chat_template=chat_template(tokenizer, fmt),
        eos_token_id=end_token_id(tokenizer, fmt),
        name=f"{Path(str(base)).name} + LoRA",
    )
    write_gguf(model, tokenizer, path, options, log=log)
    modelfile_path = path.parent / "Modelfile"
    try:
        atomic_write_bytes(modelfile_path, modelfile_text.encode("utf-8"))
    except OSError as e:
        path.unlink(missing_ok=True)
        raise UserError(f"could not write {modelfile_path}: {e.strerror or e}") from None
    log(f"Ollama Modelfile written to {modelfile_path}")
    return path, modelfile_path
