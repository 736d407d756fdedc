"""DoRA (`--dora`): W' = m · (W0 + s·BA) / ‖W0 + s·BA‖_c, PEFT-compatible both ways.

Parity tests use tiny models whose weights are re-drawn so that every tensor matters (norms
U(0.5, 1.5), biases N(0, 0.5), embeddings N(0, 0.3), linear weights N(0, 1.5/√fan_in)), with
a non-zero B and a magnitude moved away from ‖W0‖_c, so a mistake in any part shows.
"""

import json
import logging
import warnings

import pytest
import torch
from torch import nn

from conftest import (
    assert_same_adapters,
    cli_args,
    overfit_rows,
    redraw,
    run_script,
    tiny_config,
    write_json,
)
from lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from lora.dora import DoRALinear
from lora.errors import UserError
from lora.inject import apply_lora, lora_disabled, lora_layers, lora_parameters
from lora.model import load_model
from lora.spec import LoRASpec
from lora.train.loop import train

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def rich(tiny_models, tmp_path_factory):
    """{arch: dir}: the tiny qwen2 (q/k/v biases) and qwen3 models, re-drawn and saved."""
    dirs = {}
    for arch, src in tiny_models.items():
        out = tmp_path_factory.mktemp(f"rich-{arch}")
        redraw(load_model(str(src))).save_pretrained(out)
        for f in src.iterdir():  # tokenizer, chat template, generation config
            if not (out / f.name).exists():
                (out / f.name).write_bytes(f.read_bytes())
        dirs[arch] = out
    return dirs


@pytest.fixture(params=["qwen2", "qwen3"])
def rich_dir(request, rich):
    return rich[request.param]


def trained_looking(model, seed=1):
    """B ~ N(0, 0.3) and m = ‖W0‖_c · U(0.8, 1.2): an adapter that has moved in every part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
            m = layer.lora_magnitude_vector
            m.mul_(torch.rand(m.shape, generator=g) * 0.4 + 0.8)
    return model


def dora_model(model_dir, **kw):
    model = load_model(str(model_dir))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0, use_dora=True, **kw))
    return model


def ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=g)


def peft_dora(model_dir):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                             use_dora=True, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(load_model(str(model_dir)), config)


def peft_parts(theirs, name):
    module = dict(theirs.named_modules())[f"base_model.model.{name}"]
    return (module.lora_A["default"].weight, module.lora_B["default"].weight,
            module.lora_magnitude_vector["default"].weight)  # fmt: skip


def our_parts(layer):
    return layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector


# ---- the layer ------------------------------------------------------------------------------


def test_magnitude_starts_at_the_row_norms_of_w0_and_zero_init_output_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    layer = DoRALinear(base, r=4, alpha=8)
    assert layer.lora_magnitude_vector.shape == (24,)
    assert torch.equal(layer.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1))
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), nn.functional.linear(x, base.weight, base.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_papers_formula(bias):
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=bias)
    layer = DoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        layer.lora_magnitude_vector.uniform_(0.5, 2.0)
    W0 = base.weight.double()
    A, B, m = (p.double() for p in our_parts(layer))
    V = W0 + 2.0 * B @ A  # s = α/r = 2
    W = m[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(7, 32)
    expected = x.double() @ W.T + (base.bias.double() if bias else 0)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=0)


def test_the_norm_is_detached_so_only_the_numerator_carries_gradients():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 8), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    A, B, m = our_parts(layer)
    n = layer.weight_norm()
    # d/dB of Σ (m/n) ⊙ (W0 x + s·B A x) with n constant: s · (m/n) ⊗ Σ_rows (A x)
    expected_B = layer.scaling * (m / n)[:, None] * (x @ A.T).sum(0)[None, :]
    torch.testing.assert_close(B.grad, expected_B.detach(), atol=1e-5, rtol=0)
    assert not n.requires_grad and m.grad is not None and A.grad.abs().sum() > 0


def test_bf16_base_keeps_fp32_adapter_and_magnitude_and_zero_init_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(torch.bfloat16)
    layer = DoRALinear(base, r=4, alpha=8)
    assert {p.dtype for p in layer.trainable_parameters()} == {torch.float32}
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32


def test_injection_trains_a_b_and_the_magnitude_only(qwen2_dir):
    model = dora_model(qwen2_dir)
    layers = lora_layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.{part}" for name in layers
                for part in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}  # fmt: skip
    assert trainable == expected
    assert len(lora_parameters(model)) == 3 * len(layers)


# ---- parity with peft -----------------------------------------------------------------------


def test_logits_and_gradients_of_a_b_and_m_equal_peft(rich_dir):
    ours = trained_looking(dora_model(rich_dir))
    theirs = peft_dora(rich_dir)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for mine, their in zip(our_parts(layer), peft_parts(theirs, name)):
                their.copy_(mine)
    x = ids(ours)
    out_ours, out_theirs = ours(x, labels=x), theirs(x, labels=x)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=2e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    compared = 0
    for name, layer in lora_layers(ours).items():
        for mine, their in zip(our_parts(layer), peft_parts(theirs, name)):
            assert mine.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, their.grad, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared == 3 * len(TARGETS) * ours.config.num_hidden_layers


def test_our_file_has_peft_keys_and_loads_in_peft_with_the_same_logits(rich_dir, tmp_path, caplog):
    ours = trained_looking(dora_model(rich_dir))
    save_adapter(ours, tmp_path, base_model_name_or_path=str(rich_dir))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(tmp_path / ADAPTER_WEIGHTS).keys()
    magnitudes = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == len(lora_layers(ours)) == len(keys) / 3
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load_model(str(rich_dir)), str(tmp_path))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    x = ids(ours)
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=2e-5, rtol=0)


def test_a_dora_adapter_trained_and_saved_by_peft_loads_in_ours_with_the_same_logits(
    rich_dir, tmp_path
):
    theirs = peft_dora(rich_dir)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    x = ids(theirs)
    for _ in range(3):  # moves A, B and m
        optimizer.zero_grad()
        theirs(x, labels=x).loss.backward()
        optimizer.step()
    theirs.save_pretrained(str(tmp_path))
    ours = load_model(str(rich_dir))
    config = load_adapter(ours, tmp_path)
    assert config["use_dora"] and all(isinstance(m, DoRALinear) for m in lora_layers(ours).values())
    y = ids(ours, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(y).logits, theirs(y).logits, atol=2e-5, rtol=0)


# ---- merging, exporting, loading ------------------------------------------------------------


def test_merged_equals_unmerged_and_unmerge_restores_w0(rich_dir):
    model = trained_looking(dora_model(rich_dir))
    w0 = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
    x = ids(model)
    with torch.no_grad():
        unmerged = model(x).logits
        for layer in lora_layers(model).values():
            assert layer.merge() < 1e-6  # fp32: nothing of the update is lost
        merged = model(x).logits
        for layer in lora_layers(model).values():
            layer.unmerge()
        again = model(x).logits
    torch.testing.assert_close(merged, unmerged, atol=2e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=2e-5, rtol=0)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, w0[name], atol=1e-6, rtol=0)


def test_export_merges_dora_into_a_plain_checkpoint_with_the_same_logits(rich, tmp_path):
    from lora.export.merged import export_merged

    ours = trained_looking(dora_model(rich["qwen2"]))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(rich["qwen2"]))
    merged_dir = export_merged(tmp_path / "adapter", tmp_path / "merged", log=lambda *_: None)
    merged = load_model(str(merged_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = ids(ours)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ours(x).logits, atol=2e-5, rtol=0)


def test_inspect_reports_the_low_rank_part_and_the_magnitude_change(rich, tmp_path):
    from lora.inspect import format_report, inspect_adapter

    model = trained_looking(dora_model(rich["qwen2"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():  # m = 1.1 · ‖W0‖_c: a 10% change
            w0_norm = torch.linalg.vector_norm(layer.base_layer.weight, dim=1)
            layer.lora_magnitude_vector.copy_(1.1 * w0_norm)
    save_adapter(model, tmp_path, base_model_name_or_path=str(rich["qwen2"]))
    report = inspect_adapter(tmp_path, load_model(str(rich["qwen2"])))
    assert report["dora"] and len(report["modules"]) == len(lora_layers(model))
    for row in report["modules"]:
        layer = lora_layers(model)[row["module"]]
        expected = torch.linalg.svdvals(layer.delta_weight().double())[: layer.r]
        torch.testing.assert_close(
            torch.tensor(row["singular_values"], dtype=torch.float64),
            expected,
            atol=1e-6,
            rtol=1e-5,
        )
        assert row["magnitude_change"] == pytest.approx(0.1, abs=1e-6)
    assert "low-rank part s·BA only" in "\n".join(format_report(report))


def test_loading_a_dora_adapter_into_plain_lora_layers_is_a_clear_error(rich, tmp_path):
    save_adapter(trained_looking(dora_model(rich["qwen2"])), tmp_path)
    model = load_model(str(rich["qwen2"]))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8))
    with pytest.raises(UserError, match="is a DoRA adapter, but the model's adapter layers are"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_works_dequantized_for_the_norm(rich, kind):
    pytest.importorskip("bitsandbytes")
    from lora.quantize import dequantized_weight, quantization_config

    config = quantization_config(kind, torch.float32)
    model = load_model(str(rich["qwen2"]), quantization_config=config).eval()
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0, use_dora=True))
    layer = next(iter(lora_layers(model).values()))
    w0 = dequantized_weight(layer.base_layer)
    assert torch.equal(layer.lora_magnitude_vector, torch.linalg.vector_norm(w0, dim=1))
    x = ids(model)
    with torch.no_grad():
        with lora_disabled(model):
            base = model(x).logits
        torch.testing.assert_close(model(x).logits, base, atol=1e-5, rtol=0)  # zero init
        trained_looking(model)
        tuned = model(x).logits  # eval mode: bitsandbytes' inference path
        torch.testing.assert_close(dequantized_weight(layer.base_layer), w0, atol=0, rtol=0)
    model.train()
    loss = model(x, labels=x).loss
    if kind == "nf4":  # int8's eval matmul also quantizes the input, so it differs by design
        torch.testing.assert_close(model(x).logits.detach(), tuned, atol=1e-4, rtol=0)
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in lora_parameters(model))
    with pytest.raises(UserError, match="quantized"):
        layer.merge()


# ---- training -------------------------------------------------------------------------------


def test_train_cli_with_dora_lowers_the_loss_and_saves_a_file_peft_loads(rich, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    out = tmp_path / "out"
    p = run_script("train.py", *cli_args(model=rich["qwen2"], data=data, output=out, rank=4,
                                         alpha=8, dropout=0.0, batch_size=8, grad_accum=1, lr=1e-2,
                                         warmup=0, max_steps=12, targets="all-linear", seed=0,
                                         progress=False, dora=True))  # fmt: skip
    assert p.returncode == 0, p.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses
    assert json.loads((out / "train_args.json").read_text())["args"]["dora"] is True
    ours = load_model(str(rich["qwen2"]))
    load_adapter(ours, out)
    moved = [m.lora_magnitude_vector.detach() - m.weight_norm() for m in lora_layers(ours).values()]
    assert max(float(d.abs().max()) for d in moved) > 1e-3  # m learned, apart from the norm
    theirs = peft.PeftModel.from_pretrained(load_model(str(rich["qwen2"])), str(out))
    x = ids(ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=2e-5, rtol=0)


def test_resume_with_dora_gives_the_same_adapter_as_an_uninterrupted_run(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(12))
    common = dict(max_steps=6, dropout=0.1, grad_accum=2, dora=True)  # dropout: PEFT's DoRA path
    train(tiny_config(qwen2_dir, data, tmp_path / "straight", **common))
    partial = train(
        tiny_config(qwen2_dir, data, tmp_path / "resumed", stop_after_steps=3, **common)
    )
    assert not partial.finished
    resumed = train(tiny_config(qwen2_dir, data, tmp_path / "resumed", resume="auto", **common))
    assert resumed.steps == 6
    assert_same_adapters(tmp_path / "straight", tmp_path / "resumed", atol=1e-6)
    with pytest.raises(UserError, match="dora"):
        train(tiny_config(qwen2_dir, data, tmp_path / "resumed", resume="auto",
                          **(common | {"dora": False, "max_steps": 8})))  # fmt: skip
