"""QLoRA: LoRA on a bitsandbytes NF4/int8 base, on CPU (bitsandbytes >= 0.48).

Parity tests use a tiny model whose weights are re-drawn so that every tensor matters (norms
U(0.5, 1.5), biases N(0, 0.5), embeddings N(0, 0.3), linear weights N(0, 1.5/√fan_in)) and
adapters with a non-zero B, so a mistake in any part shows in the logits.
"""

import importlib.metadata

import pytest
import torch
from safetensors.torch import load_file

from conftest import overfit_rows, redraw, write_json
from lora.adapter import load_adapter, save_adapter
from lora.data.batching import collate
from lora.data.prompt import PromptFormat, encode_sample
from lora.data.records import Sample, Turn
from lora.errors import UserError
from lora.inject import apply_lora, lora_disabled, lora_layers, lora_parameters
from lora.model import load_model, load_tokenizer
from lora.quantize import check_quantize, dequantized_weight, quantization_config
from lora.spec import LoRASpec
from lora.train.activations import enable_activation_checkpointing
from lora.train.config import TrainConfig
from lora.train.loop import train
from lora.train.loss import CausalLMLoss

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def rich_dir(tmp_path_factory, qwen2_dir):
    """The tiny qwen2 model with every weight re-drawn large enough to matter."""
    model = load_model(str(qwen2_dir))
    redraw(model)
    out = tmp_path_factory.mktemp("rich")
    model.save_pretrained(out)
    for f in qwen2_dir.iterdir():  # tokenizer and chat template
        if not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def quantized(model_dir, kind="nf4"):
    return load_model(str(model_dir), quantization_config=quantization_config(kind, torch.float32))


def with_random_adapter(model, seed=1, std=0.3):
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=std)
    return model


def ids(model, seed=0):
    return torch.randint(
        3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed)
    )


def train_cfg(model_dir, data, out, **kw):
    base = dict(
        model=str(model_dir), data=str(data), output=str(out), rank=8, alpha=16, dropout=0.0,
        batch_size=8, grad_accum=1, lr=2e-2, warmup=0, max_steps=6, progress=False, seed=0,
        targets="all-linear", quantize="nf4",
    )  # fmt: skip
    return TrainConfig(**(base | kw))


def test_nf4_base_quantizes_decoder_linears_only_with_double_quantization(rich_dir):
    model = quantized(rich_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and isinstance(q_proj, torch.nn.Linear)
    state = q_proj.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
    assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.numel() == 64 * 64 // 2
    # Embeddings and lm_head stay in the run's dtype, as in the paper.
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    # Each weight is within half the widest NF4 gap (0.304 / 2, between -1 and -0.696) of its
    # block's absmax, plus a little for the 8-bit absmax itself (measured: 0.146 of absmax).
    original = load_model(str(rich_dir)).model.layers[0].self_attn.q_proj.weight.detach()
    blocks_err = (dequantized_weight(q_proj) - original).reshape(-1, 64).abs().amax(1)
    blocks_absmax = original.reshape(-1, 64).abs().amax(1)
    assert (blocks_err <= 0.16 * blocks_absmax).all()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_on_a_quantized_base_lowers_the_loss_and_moves_only_adapters(
    qwen2_dir, tmp_path, kind
):
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    result = train(train_cfg(qwen2_dir, data, tmp_path / "out", quantize=kind))
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < 0.5 * first, (first, last)  # measured: 8.2 -> ~1.6 in 6 steps (nf4)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)


def lora_gradients(model, batch) -> list[torch.Tensor]:
    model.zero_grad()
    loss_sum, n = CausalLMLoss(model)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    (loss_sum / n).backward()
    return [p.grad.clone() for p in lora_parameters(model)]


def test_gradient_checkpointing_on_an_nf4_base_keeps_lora_gradients_exact(rich_dir):
    tokenizer = load_tokenizer(str(rich_dir))
    fmt = PromptFormat("chat")
    rows = [
        encode_sample(Sample((Turn(q, a),)), fmt, tokenizer)
        for q, a in [("问", "短。"), ("头痛", "地榆槐角丸。")]
    ]
    batch = collate(rows, tokenizer.pad_token_id)
    model = with_random_adapter(quantized(rich_dir))
    model.train()
    plain = lora_gradients(model, batch)
    enable_activation_checkpointing(model)
    checkpointed = lora_gradients(model, batch)
    assert all(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_our_nf4_adapter_is_peft_format_and_peft_on_a_bnb_base_agrees(rich_dir, tmp_path):
    ours = with_random_adapter(quantized(rich_dir))
    save_adapter(ours, tmp_path, base_model_name_or_path=str(rich_dir))
    theirs = peft.PeftModel.from_pretrained(quantized(rich_dir), str(tmp_path))
    their_q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(their_q, peft.tuners.lora.bnb.Linear4bit)  # peft's own QLoRA layer
    x = ids(ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=1e-5, rtol=0)


def test_the_adapter_path_is_the_same_on_a_quantized_and_a_full_base(rich_dir):
    """Layer by layer: (NF4 base + adapter) - NF4 base = (full base + adapter) - full base, so
    the adapter adds nothing of its own to the quantization error.

    Compared through each base layer's own output, not `dequantized_weight`: on CPUs with
    AVX512-BF16, bitsandbytes runs a 4-bit inference kernel with bf16-rounded block scales,
    whose output differs from the dequantized weight's by ~1e-2 on this model."""
    nf4 = with_random_adapter(quantized(rich_dir))
    full = load_model(str(rich_dir))
    apply_lora(full, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    full.load_state_dict({k: v for k, v in nf4.state_dict().items() if "lora_" in k}, strict=False)
    full_layers = lora_layers(full)
    with torch.no_grad():
        for name, layer in lora_layers(nf4).items():
            twin = full_layers[name]
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
            update = layer(x) - layer.base_layer(x)
            assert update.abs().max() > 1e-2  # the random adapter really acts
            torch.testing.assert_close(update, twin(x) - twin.base_layer(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def nf4_adapter(rich_dir, tmp_path_factory):
    """An adapter trained for 6 steps on the NF4-quantized rich model."""
    tmp = tmp_path_factory.mktemp("nf4-adapter")
    data = write_json(tmp / "rows.json", overfit_rows(8))
    train(train_cfg(rich_dir, data, tmp / "out"))
    return tmp / "out"


def test_nf4_trained_adapter_on_the_unquantized_base_gives_close_logits(rich_dir, nf4_adapter):
    nf4, full = quantized(rich_dir), load_model(str(rich_dir))
    for model in (nf4, full):
        load_adapter(model, nf4_adapter, dropout=0.0)
    x = ids(full)
    with torch.no_grad():
        tuned_nf4, tuned_full = nf4(x).logits, full(x).logits
        with lora_disabled(nf4), lora_disabled(full):
            base_nf4, base_full = nf4(x).logits, full(x).logits

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # ‖Δlogits‖/‖logits‖, measured: 0.27 with the adapter, 0.31 between the bare bases, while
    # the adapter itself moves the logits by 0.75 (this tiny model's weights are large, so NF4
    # rounding shows). The adapter adds no error of its own: at most 1.1× the bases' difference.
    measured, base_error = rel(tuned_nf4, tuned_full), rel(base_nf4, base_full)
    assert measured <= 1.1 * base_error, (measured, base_error)
    assert rel(tuned_full, base_full) > 2 * measured  # the adapter really changes the model


def test_resume_on_an_nf4_base_gives_the_uninterrupted_adapter(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    common = dict(max_steps=4, batch_size=4)
    train(train_cfg(qwen2_dir, data, tmp_path / "straight", **common))
    train(train_cfg(qwen2_dir, data, tmp_path / "resumed", stop_after_steps=2, **common))
    resumed = train(train_cfg(qwen2_dir, data, tmp_path / "resumed", resume="auto", **common))
    assert resumed.steps == 4
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_merging_into_a_quantized_base_is_refused(qwen2_dir):
    model = with_random_adapter(quantized(qwen2_dir))
    with pytest.raises(UserError, match="cannot merge LoRA into a quantized"):
        next(iter(lora_layers(model).values())).merge()


def test_unknown_quantize_value_and_missing_bitsandbytes_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match="--quantize must be one of none, nf4, int8, got 'nf3'"):
        check_quantize("nf3")
    real_version = importlib.metadata.version

    def no_bitsandbytes(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", no_bitsandbytes)
    with pytest.raises(UserError, match=r"needs bitsandbytes.*pip install 'bitsandbytes>=0.48'"):
        quantization_config("nf4", torch.float32)
    assert quantization_config("none", torch.float32) is None  # no --quantize: never imported


def test_export_of_an_nf4_adapter_merges_into_the_unquantized_checkpoint(
    rich_dir, nf4_adapter, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM

    import infer

    argv = [
        "--adapter",
        str(nf4_adapter),
        "--export",
        str(tmp_path / "merged"),
        "--quantize",
        "nf4",
    ]
    assert infer.main(argv) == 0
    said = capsys.readouterr()
    assert "merges into the unquantized base" in said.err
    assert "trained on a nf4-quantized base" in said.out
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    full = load_model(str(rich_dir))
    load_adapter(full, nf4_adapter, dropout=0.0)
    x = ids(full)
    with torch.no_grad():  # fp32 merge: equal to base + adapter up to fp32 rounding
        torch.testing.assert_close(exported(x).logits, full(x).logits, atol=1e-4, rtol=0)


def test_infer_generates_on_an_nf4_base_and_refuses_merge_with_quantize(nf4_adapter, capsys):
    import infer

    ask = ["--adapter", str(nf4_adapter), "--prompt", "头痛", "--max-new-tokens", "3"]
    assert infer.main([*ask, "--quantize", "nf4"]) == 0
    capsys.readouterr()
    assert infer.main([*ask, "--quantize", "nf4", "--merge"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --merge and --quantize nf4 do not combine") and err.count("\n") == 1
    )
    with pytest.raises(SystemExit):
        infer.main([*ask, "--quantize", "nf3"])
    assert "invalid choice: 'nf3'" in capsys.readouterr().err


def test_train_refuses_an_unknown_quantize_from_a_config_file(qwen2_dir, tmp_path, capsys):
    import train as train_cli

    data = write_json(tmp_path / "rows.json", overfit_rows(2))
    config = write_json(tmp_path / "run.json", {"quantize": "nf3"})
    argv = ["--config", str(config), "--model", str(qwen2_dir), "--data", str(data)]
    assert train_cli.main([*argv, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "error: --quantize must be one of none, nf4, int8, got 'nf3'" in capsys.readouterr().err
