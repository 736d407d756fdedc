"""Injection into real (tiny) Qwen2 and Qwen3 checkpoints, and structural freezing."""

import pytest
import torch

from lora.errors import UserError
from lora.inject import apply_lora, lora_layers, lora_parameters, merge_lora, unmerge_lora
from lora.model import load_model
from lora.spec import LoRASpec


def ids(vocab, n=12, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def test_logits_equal_base_model_right_after_injection(arch_dir):
    model = load_model(str(arch_dir))
    x = ids(model.config.vocab_size)
    before = model(x).logits
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4, alpha=8, dropout=0.0))
    assert torch.equal(model(x).logits, before)


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_trainable_count_is_analytic(arch_dir, targets):
    model = load_model(str(arch_dir))
    report = apply_lora(model, LoRASpec(targets, r=4, alpha=8))
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert (
        report.trainable_params
        == expected
        == sum(p.numel() for p in model.parameters() if p.requires_grad)
    )
    n_layers = model.config.num_hidden_layers
    assert len(report.adapted_modules) == (2 if targets == "q_proj,v_proj" else 7) * n_layers
    assert "trainable params" in str(report) and "%" in str(report)


def test_all_linear_never_touches_lm_head(qwen2_dir):
    model = load_model(str(qwen2_dir))
    report = apply_lora(model, LoRASpec("all-linear", r=2))
    assert not any("lm_head" in n for n in report.adapted_modules)
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_after_optimizer_steps_only_lora_moved_and_base_is_bitwise_unchanged(arch_dir):
    model = load_model(str(arch_dir))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in lora)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = ids(model.config.vocab_size)
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, lora[n]), n


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_merge_all_equals_unmerged_and_unmerge_restores(standard_init_models, arch):
    model = load_model(str(standard_init_models[arch]))
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(model.config.vocab_size)
    base_logits = model(x).logits
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    unmerged = model(x).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    merge_lora(model)
    merge_lora(model)  # a second merge is a no-op
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        original = n.replace(".base_layer", "")
        if original in base_weights:
            torch.testing.assert_close(p, base_weights[original], atol=1e-6, rtol=0)


def test_unknown_target_is_an_error_listing_the_linear_layers(qwen2_dir):
    model = load_model(str(qwen2_dir))
    with pytest.raises(UserError) as e:
        apply_lora(model, LoRASpec("query_key_value"))
    msg = str(e.value)
    assert (
        "query_key_value" in msg and "q_proj" in msg and "down_proj" in msg and "lm_head" not in msg
    )


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.5}])
def test_bad_lora_arguments_fail_before_touching_the_model(qwen2_dir, kwargs):
    model = load_model(str(qwen2_dir))
    with pytest.raises(UserError):
        apply_lora(model, LoRASpec(**kwargs))
    assert not lora_layers(model)
