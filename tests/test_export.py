"""Export for serving: GGUF (tensors, metadata, tokenizer), Ollama Modelfile, HF chat template.

Parity needs weights where every tensor matters: at the fixture's init a tiny model nearly
repeats its input token, so its logits would hardly notice a swapped or missing tensor. The
models here are re-drawn (norms U(0.5, 1.5), biases N(0, 0.5), embeddings N(0, 0.3), linear
weights N(0, 1.5/sqrt(fan_in))) and get an adapter with a random, non-zero B.
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, real_tokenizer, redraw
from infer import main as infer_main
from lora.adapter import ADAPTER_CONFIG, current_umask, save_adapter
from lora.data.prompt import PromptFormat, prompt_text, stop_token_ids
from lora.data.records import Sample, Turn
from lora.errors import UserError
from lora.inject import apply_lora, lora_layers
from lora.spec import LoRASpec

gguf = pytest.importorskip("gguf")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lora.export.gguf import GGUFOptions, export_gguf, write_gguf  # noqa: E402
from lora.export.merged import export_merged  # noqa: E402
from lora.export.serving import chat_template, modelfile  # noqa: E402

# Texts the tokenizer round trip must encode identically: Chinese, English, digits, code, spaces.
TEXTS = [
    "你好，世界。头痛发热咳嗽，可以使用地榆槐角丸。",
    "Hello world, what is LoRA? It's a low-rank adapter.",
    "digits 0 1 12 123 1234 12345 3.14159 2026-11-25",
    "def f(x):\n    return x ** 2  # code\n\tindent",
    "  spaces   and\n\nnewlines \r\n end",
]


def parity_base(src, dst, tied: bool, head_dim: int | None = None):
    """The fixture's architecture and tokenizer with re-drawn weights, saved like a real model."""
    config = AutoConfig.from_pretrained(src)
    config.tie_word_embeddings = tied
    if head_dim:
        config.head_dim = head_dim
    model = redraw(AutoModelForCausalLM.from_config(config), seed=1)
    model.generation_config = AutoModelForCausalLM.from_pretrained(src).generation_config
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def make_adapter(base, out, fmt: PromptFormat, seed=2):
    model = AutoModelForCausalLM.from_pretrained(str(base))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.3)
    tok = AutoTokenizer.from_pretrained(str(base))
    stops = stop_token_ids(tok, fmt, model.generation_config)
    save_adapter(model, out, str(base), {"prompt_format": fmt.to_dict(), "stop_token_ids": stops})
    return out


@pytest.fixture(scope="module")
def parity(tiny_models, tmp_path_factory):
    """{arch: (adapter, merged HF dir, fmt)}: qwen2 with an untied lm_head; qwen3 tied, with
    head_dim 128 != hidden/heads like the real Qwen3 (transformers' GGUF reader assumes 128)."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for arch, tied, head_dim, fmt in [
        ("qwen2", False, None, PromptFormat("chat", "你是中医。")),
        ("qwen3", True, 128, PromptFormat("chat", None, False)),
    ]:
        base = parity_base(tiny_models[arch], root / arch, tied, head_dim)
        adapter = make_adapter(base, root / f"{arch}-adapter", fmt)
        merged = export_merged(adapter, root / f"{arch}-merged", log=lambda *_: None)
        out[arch] = (adapter, merged, fmt)
    return out


@pytest.fixture(scope="module")
def gguf_files(parity, tmp_path_factory):
    """{(arch, type): path}, each exported once through `export_gguf`."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for arch, (adapter, _, _) in parity.items():
        for kind in ("f32", "f16", "bf16", "q8_0"):
            (root / f"{arch}-{kind}").mkdir()
            path, _ = export_gguf(
                adapter, root / f"{arch}-{kind}" / "model.gguf", kind, log=lambda *_: None
            )
            files[arch, kind] = path
    return files


def load_gguf_model(path):
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def rounded_like(model, kind):
    """The merged model with each 2-D weight rounded as the GGUF stores it (1-D stay f32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim != 2 or kind == "f32":
                continue
            if kind in ("f16", "bf16"):
                p.copy_(p.to(torch.float16 if kind == "f16" else torch.bfloat16).float())
            else:
                q = gguf.GGMLQuantizationType.Q8_0
                w = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)
                p.copy_(torch.from_numpy(w.reshape(p.shape)))
    return model


def sample_ids(merged):
    tok = AutoTokenizer.from_pretrained(str(merged))
    return torch.tensor([tok(" ".join(TEXTS[:3]))["input_ids"]])


# Max |logit difference| GGUF vs the merged fp32 model, measured on these models (logits up to
# ~10): f32 0 (both archs), f16 0.021, bf16 0.13 (qwen2) / 0.19 (qwen3), q8_0 0.38 / 0.49.
# Against the same weights rounded as stored, every type measured 0. Tolerances: ~2x measured.
TOLERANCE = {"f32": 1e-5, "f16": 0.05, "bf16": 0.4, "q8_0": 1.0}


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gguf_logits_match_the_merged_model(parity, gguf_files, arch, kind):
    _, merged, _ = parity[arch]
    ids = sample_ids(merged)
    reference = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    loaded = load_gguf_model(gguf_files[arch, kind])
    with torch.no_grad():
        want, got = reference(ids).logits, loaded(ids).logits
        # Exact up to float noise against the same weights rounded as stored.
        same_rounding = rounded_like(reference, kind)(ids).logits
    torch.testing.assert_close(got, same_rounding, atol=1e-4, rtol=0)
    # And close to the unrounded merge within the measured tolerance of the type.
    assert (got - want).abs().max().item() <= TOLERANCE[kind]
    assert want.abs().max().item() > 3  # logits of a size where a tolerance means something


def test_a_broken_tensor_fails_parity(parity, tmp_path):
    """The parity check is sensitive: swapping two same-shaped tensors (layer 0's gate and up
    projections) or transposing o_proj moves the logits far beyond every tolerance."""
    _, merged, _ = parity["qwen2"]
    tok = AutoTokenizer.from_pretrained(str(merged))
    reference = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ids = sample_ids(merged)
    breaks = {
        "swap gate/up": lambda m: _swap(
            m.model.layers[0].mlp.gate_proj, m.model.layers[0].mlp.up_proj
        ),
        "transpose o_proj": lambda m: m.model.layers[1].self_attn.o_proj.weight.data.copy_(
            m.model.layers[1].self_attn.o_proj.weight.data.T.clone()
        ),
    }
    for name, breaker in breaks.items():
        broken = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
        breaker(broken)
        path = write_gguf(
            broken, tok, tmp_path / "broken.gguf", GGUFOptions("f32"), log=lambda *_: None
        )
        with torch.no_grad():
            diff = (load_gguf_model(path)(ids).logits - reference(ids).logits).abs().max().item()
        assert diff > 2 * max(TOLERANCE.values()), name  # measured: 7.6 and 8.2


def _swap(a, b):
    with torch.no_grad():
        tmp = a.weight.data.clone()
        a.weight.data.copy_(b.weight.data)
        b.weight.data.copy_(tmp)


def read_fields(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gguf_metadata_is_what_llama_cpp_reads(parity, gguf_files, arch):
    _, merged, _ = parity[arch]
    config = AutoConfig.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    fields, tensors = read_fields(gguf_files[arch, "q8_0"])
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == config.num_hidden_layers
    assert fields[f"{arch}.context_length"] == config.max_position_embeddings
    assert fields[f"{arch}.embedding_length"] == config.hidden_size
    assert fields[f"{arch}.feed_forward_length"] == config.intermediate_size
    assert fields[f"{arch}.attention.head_count"] == config.num_attention_heads
    assert fields[f"{arch}.attention.head_count_kv"] == config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert fields[f"{arch}.attention.key_length"] == head_dim
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.chat_template  # what --export writes too
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)
    Q = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert list(tensors["token_embd.weight"].shape) == [config.hidden_size, config.vocab_size]
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in tensors
    else:
        assert "blk.0.attn_q_norm.weight" in tensors and "blk.0.attn_q.bias" not in tensors


def specials(tok):
    return [t.content for t in tok.added_tokens_decoder.values()]


def assert_same_tokenizer(ours, from_gguf):
    every_special = "".join(f"{s} x{s}" for s in specials(ours))
    for text in TEXTS + [every_special]:
        want = ours(text, add_special_tokens=False)["input_ids"]
        assert from_gguf(text, add_special_tokens=False)["input_ids"] == want, text
        assert from_gguf(text)["input_ids"] == ours(text)["input_ids"], text  # no BOS added
    for s in specials(ours):
        assert from_gguf.convert_tokens_to_ids(s) == ours.convert_tokens_to_ids(s)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tokenizer_rebuilt_from_gguf_encodes_like_ours(parity, gguf_files, arch):
    """The fixture tokenizers: qwen2's loads with Qwen's split ("qwen2"), qwen3's with
    GPT-2's ("gpt-2"), so both llama.cpp pre-tokenizers are covered."""
    _, merged, fmt = parity[arch]
    path = gguf_files[arch, "f16"]
    ours = AutoTokenizer.from_pretrained(str(merged))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert_same_tokenizer(ours, theirs)
    messages = [{"role": "user", "content": "你好"}]
    assert theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == prompt_text(Sample((Turn("你好", ""),)), fmt, ours)


def test_real_qwen_tokenizer_round_trips_through_gguf(tmp_path):
    """The real Qwen2.5 vocabulary (151,665 tokens padded to 151,936 rows, 22 special tokens)."""
    tok = real_tokenizer()
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=151643,
    )
    model = AutoModelForCausalLM.from_config(config)
    path = write_gguf(model, tok, tmp_path / "real.gguf", GGUFOptions("f16"), log=lambda *_: None)
    fields, _ = read_fields(path)
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["tokenizer.ggml.tokens"]) == 151936
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="real.gguf")
    assert_same_tokenizer(tok, theirs)


# --- Ollama's Modelfile, through a small renderer of the Go template subset it uses ---------


def render_go(template: str, system: str, messages: list[dict]) -> str:
    """Go's text/template for what our Modelfiles use: "literals", .System, .Content, .Role,
    if/else if/else/end with `eq .Role "..."`, range .Messages, and {{- / -}} trimming."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    for i, part in enumerate(parts):  # trim markers eat the whitespace beside them
        if part.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if part.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    tokens = [p if not p.startswith("{{") else ("act", p.strip("{}- \t\n")) for p in parts]
    pos = 0

    def block(scope, live=True):
        """Render up to the next else/end; `live=False` only walks past a branch not taken."""
        nonlocal pos
        out = ""
        while pos < len(tokens):
            tok = tokens[pos]
            if isinstance(tok, str):
                out += tok
                pos += 1
                continue
            action = tok[1]
            if action in ("end", "else") or action.startswith("else if"):
                return out if live else ""
            pos += 1
            if action.startswith("if "):
                out += conditional(action[3:], scope, live)
            elif action == "range .Messages":
                start = pos
                for message in messages if live else []:
                    pos = start
                    out += block(message)
                if not live or not messages:
                    pos = start
                    block(scope, live=False)
                pos += 1  # its end
            elif action.startswith('"'):
                out += json.loads(action)
            elif live:
                out += value(action, scope)
        return out if live else ""

    def value(expr, scope):
        return {".System": system, ".Content": scope.get("content"), ".Role": scope.get("role")}[
            expr
        ]

    def truth(cond, scope):
        m = re.fullmatch(r'eq (\.\w+) "(\w+)"', cond)
        return value(m[1], scope) == m[2] if m else bool(value(cond, scope))

    def conditional(cond, scope, live):
        nonlocal pos
        taken = live and truth(cond, scope)
        result = block(scope, taken)
        done = taken
        while True:
            action = tokens[pos][1]
            pos += 1
            if action == "end":
                return result
            branch = live and not done
            if branch and action != "else":
                branch = truth(action[len("else if ") :], scope)
            body = block(scope, branch)
            if branch:
                result, done = body, True

    return block({})


def ollama_render(modelfile_text: str, messages: list[dict]) -> str:
    """What Ollama sends the model: .System is the request's system message, else SYSTEM."""
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile_text, re.S)[1]
    default = re.search(r'SYSTEM """(.*?)"""', modelfile_text, re.S)
    # Ollama joins every system message of the request into .System; the Modelfile's SYSTEM
    # is used only when there is none.
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = "\n\n".join(systems) if systems else (default[1] if default else "")
    return render_go(template, system, messages)


CONVERSATIONS = [
    [("头痛发热怎么办？", "")],
    [("Q1 12345", "A1 答案"), ("问题二", "回答二"), ("Q3", "")],
]
FORMATS = [
    ("qwen2", PromptFormat("chat")),
    ("qwen2", PromptFormat("chat", "你是中医。\n回答要简短。")),
    ("qwen3", PromptFormat("chat", None, False)),
    ("qwen3", PromptFormat("chat", "sys", True)),
    ("qwen2", PromptFormat("plain")),
    ("qwen3", PromptFormat("plain", "你是中医。")),
]


def as_messages(turns, system=None):
    out = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        out.append({"role": "user", "content": user})
        if answer:
            out.append({"role": "assistant", "content": answer})
    return out


@pytest.mark.parametrize("arch,fmt", FORMATS)
def test_modelfile_template_renders_the_training_prompt(tiny_models, arch, fmt):
    tok = AutoTokenizer.from_pretrained(str(tiny_models[arch]))
    stops = stop_token_ids(tok, fmt, None)
    text = modelfile("model.gguf", tok, fmt, stops)
    assert text.startswith("FROM ./model.gguf\n")
    assert [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.M)] == [
        tok.convert_ids_to_tokens(i) for i in stops
    ]
    assert ('SYSTEM """' in text) == bool(fmt.system)
    for turns in CONVERSATIONS:
        sample = Sample(tuple(Turn(u, a) for u, a in turns))
        assert ollama_render(text, as_messages(turns)) == prompt_text(sample, fmt, tok)
        # A system message in the request replaces the trained one, as in training data.
        sample = Sample(sample.turns, "另一个系统提示")
        got = ollama_render(text, as_messages(turns, "另一个系统提示"))
        assert got == prompt_text(sample, fmt, tok)


def test_go_renderer_follows_go_semantics():
    """The test's renderer itself: branches, trimming, loops (so a pass above means something)."""
    template = '{{ if .System }}S={{ .System }}{{ else }}none{{ end }}\n{{- range .Messages }}\n{{- if eq .Role "user" }}[u:{{ .Content }}]{{ else if eq .Role "assistant" }}[a:{{ .Content }}]{{ end }}\n{{- end }}{{ "\\n!" }}'
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    assert render_go(template, "x", messages) == "S=x[u:1][a:2]\n!"
    assert render_go(template, "", []) == "none\n!"


# --- The merged HF checkpoint (--export) serves the trained prompt ---------------------------


@pytest.mark.parametrize("arch,fmt", FORMATS)
def test_exported_chat_template_equals_prompt_text(tiny_models, tmp_path, arch, fmt):
    tok = AutoTokenizer.from_pretrained(str(tiny_models[arch]))
    adapter = make_adapter(tiny_models[arch], tmp_path / "adapter", fmt)
    out = export_merged(adapter, tmp_path / "merged", log=lambda *_: None)
    exported = AutoTokenizer.from_pretrained(str(out))
    for turns in CONVERSATIONS:
        sample = Sample(tuple(Turn(u, a) for u, a in turns))
        got = exported.apply_chat_template(
            as_messages(turns), tokenize=False, add_generation_prompt=True
        )
        assert got == prompt_text(sample, fmt, tok)
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(stop_token_ids(tok, fmt, None)) <= set(generation["eos_token_id"])


def test_exported_qwen3_template_still_honours_an_explicit_enable_thinking(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen3"]))
    fmt = PromptFormat("chat", None, False)
    exported = AutoTokenizer.from_pretrained(tiny_models["qwen3"])
    exported.chat_template = chat_template(tok, fmt)
    messages = as_messages([("hi", "")])
    default = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    thinking = exported.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert default.endswith("<think>\n\n</think>\n\n") and not thinking.endswith("</think>\n\n")


def test_adapter_config_names_what_vllm_needs(parity):
    adapter, _, _ = parity["qwen2"]
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"]


# --- The command line, and bad inputs -------------------------------------------------------


def infer(capsys, *args):
    """infer.py's main in this process (its flags, its error handling), much faster than a
    subprocess; test_infer.py runs the script itself."""
    code = infer_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_gguf_and_modelfile(parity, tmp_path, capsys):
    adapter, _, _ = parity["qwen2"]
    code, out, err = infer(
        capsys,
        "--adapter",
        str(adapter),
        "--export-gguf",
        str(tmp_path / "m.gguf"),
        "--gguf-type",
        "q8_0",
    )
    assert code == 0, err
    assert "ollama create" in out
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", "m.gguf"]
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf\n")
    fields, _ = read_fields(tmp_path / "m.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def _llama_dir(tiny_models, tmp_path):
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(AutoTokenizer.from_pretrained(str(tiny_models["qwen2"]))),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    AutoTokenizer.from_pretrained(str(tiny_models["qwen2"])).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_bad_inputs_are_one_clear_line_and_leave_nothing(
    parity, tiny_models, tmp_path, capsys, monkeypatch
):
    adapter, _, _ = parity["qwen2"]
    out = tmp_path / "out"
    out.mkdir()
    unknown_base = tmp_path / "unknown-base"
    unknown_base.mkdir()
    for name in os.listdir(adapter):
        (unknown_base / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((unknown_base / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-model")
    (unknown_base / ADAPTER_CONFIG).write_text(json.dumps(config))
    cases = [
        (
            ["--adapter", str(adapter), "--export-gguf", str(tmp_path / "a-file" / "m.gguf")],
            "is a file, not a directory",
        ),
        (["--adapter", str(adapter), "--export-gguf", str(out)], "is a directory"),
        (
            ["--adapter", str(unknown_base), "--export-gguf", str(out / "m.gguf")],
            "no-such-model does not exist",
        ),
        (
            [
                "--adapter",
                str(adapter),
                "--model",
                str(_llama_dir(tiny_models, tmp_path)),
                "--export-gguf",
                str(out / "m.gguf"),
            ],
            "not 'llama'",
        ),
    ]
    cases.append(  # checked before --export writes its directory
        (
            ["--adapter", str(adapter), "--export", str(out / "merged"), "--export-gguf", str(out)],
            "is a directory",
        )
    )
    (tmp_path / "a-file").write_text("")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: let the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: real_access(p, mode) and "readonly" not in str(p)
        )
    cases.append(
        (["--adapter", str(adapter), "--export-gguf", str(readonly / "m.gguf")], "not writable")
    )
    capsys.readouterr()  # what building the cases printed
    for args, needle in cases:
        code, _, err = infer(capsys, *args)
        assert code == 2 and needle in err, err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()]
    assert os.listdir(out) == []


def test_a_failed_write_leaves_no_temporary_file(parity, tmp_path, monkeypatch):
    adapter, merged, _ = parity["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(UserError, match="No space left"):
        write_gguf(model, tok, tmp_path / "m.gguf", GGUFOptions("f16"), log=lambda *_: None)
    assert os.listdir(tmp_path) == []


def test_missing_gguf_package_is_a_clear_error(parity, tmp_path, monkeypatch):
    adapter, _, _ = parity["qwen2"]
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserError, match="GGUF export needs the gguf package: pip install gguf"):
        export_gguf(adapter, tmp_path / "m.gguf")


def test_q8_0_is_quantized_by_the_gguf_package(parity, gguf_files):
    """q8_0 blocks: 32 int8 values and one f16 scale, 34 bytes; what `gguf.quants` makes."""
    _, merged, _ = parity["qwen2"]
    _, tensors = read_fields(gguf_files["qwen2", "q8_0"])
    weight = AutoModelForCausalLM.from_pretrained(str(merged)).model.layers[0].mlp.up_proj.weight
    stored = tensors["blk.0.ffn_up.weight"]
    assert stored.data.nbytes == weight.numel() // 32 * 34
    expected = gguf.quants.quantize(weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(stored.data).reshape(-1), expected.reshape(-1))


def test_a_tokenizer_without_chat_template_exports_the_plain_prompt(tiny_models):
    """Adapters trained elsewhere record no format; like inference, export then uses plain."""
    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen2"]))
    tok.chat_template = None
    template = chat_template(tok, PromptFormat("chat"))
    tok.chat_template = template
    sample = Sample((Turn("问题", ""),))
    got = tok.apply_chat_template(
        as_messages([("问题", "")]), tokenize=False, add_generation_prompt=True
    )
    assert got == "Instruction: 问题\nAnswer:\n" == prompt_text(sample, PromptFormat("plain"), tok)


# ---------------------------------------------------------------------------------------------
# Exports as files a server can use: whole or absent, readable, where the user said


def test_exports_create_their_directory_and_are_readable_by_other_users(parity, tmp_path, capsys):
    adapter, _, _ = parity["qwen2"]
    gguf_path, merged = tmp_path / "dist" / "sub" / "m.gguf", tmp_path / "serve" / "merged"
    code, _, err = infer(capsys, "--adapter", str(adapter), "--export-gguf", str(gguf_path),
                         "--export", str(merged))  # fmt: skip
    assert code == 0, err
    expected = 0o666 & ~current_umask()
    for f in [gguf_path, gguf_path.parent / "Modelfile", *merged.iterdir()]:
        assert f.stat().st_mode & 0o777 == expected, f


SLOW_RENAME = """
import os, sys, time
sys.path.insert(0, {root!r})
real = {{"rename": os.rename, "replace": os.replace}}
def slow(name):
    def call(src, dst, *a, **k):
        if ".tmp-" in os.fspath(src):  # an export moving its temporary into place
            print("renaming", flush=True)
            time.sleep(120)
        return real[name](src, dst, *a, **k)
    return call
os.rename, os.replace = slow("rename"), slow("replace")
import infer
sys.exit(infer.main({argv!r}))
"""


def export_in_a_subprocess(argv):
    """infer.py with its final rename slowed down, so that a signal lands inside the write."""
    code = SLOW_RENAME.format(root=str(ROOT), argv=argv)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.strip() == "renaming":
            return proc
    raise AssertionError(proc.stderr.read())


@pytest.mark.parametrize("flag", ["--export", "--export-gguf"])
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_export_exits_cleanly_and_leaves_no_temporary(
    parity, tmp_path, flag, sig, status
):
    adapter, _, _ = parity["qwen2"]
    target = tmp_path / ("merged" if flag == "--export" else "m.gguf")
    proc = export_in_a_subprocess(["--adapter", str(adapter), flag, str(target)])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name != "Modelfile"] == []


@pytest.mark.parametrize("flag", ["--export", "--export-gguf"])
def test_a_killed_exports_temporary_is_removed_by_the_next_export(parity, tmp_path, capsys, flag):
    adapter, _, _ = parity["qwen2"]
    target = tmp_path / ("merged" if flag == "--export" else "m.gguf")
    proc = export_in_a_subprocess(["--adapter", str(adapter), flag, str(target)])
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait()
    stale = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(stale) == 1  # what the audit found left behind forever
    code, _, err = infer(capsys, "--adapter", str(adapter), flag, str(target))
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
