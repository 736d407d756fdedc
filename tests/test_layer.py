"""LoRALinear: the math, the init, the dtype policy, merge/unmerge."""

import math

import pytest
import torch
from torch import nn

from lora.errors import UserError
from lora.layer import LoRALinear


def make(in_f=32, out_f=24, r=4, alpha=8, dtype=torch.float32, bias=True, **kw):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return base, LoRALinear(base, r=r, alpha=alpha, **kw)


def test_zero_init_output_equals_base_exactly():
    base, layer = make()
    x = torch.randn(3, 5, 32)
    expected = torch.nn.functional.linear(x, base.weight, base.bias)
    assert torch.equal(layer(x), expected)


def test_init_a_kaiming_uniform_b_zero_and_shapes():
    _, layer = make(in_f=64, out_f=16, r=8)
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (16, 8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in=64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    assert layer.lora_A.bias is None and layer.lora_B.bias is None


def test_forward_is_base_plus_scaled_low_rank_update():
    base, layer = make(r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(7, 32)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = base(x) + (8 / 4) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    _, layer = make(r=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)


def test_base_is_frozen_adapter_trains():
    base, layer = make()
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_stays_fp32_with_half_precision_base_and_output_keeps_base_dtype(dtype):
    base, layer = make(dtype=dtype)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert base.weight.dtype == dtype
    x = torch.randn(2, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_merged_equals_unmerged_and_unmerge_restores_base():
    base, layer = make()
    torch.nn.init.normal_(layer.lora_B.weight)
    original = base.weight.detach().clone()
    x = torch.randn(4, 32)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


def test_merge_and_unmerge_are_idempotent():
    base, layer = make()
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.merge()
    once = base.weight.detach().clone()
    layer.merge()
    assert torch.equal(base.weight, once)
    layer.unmerge()
    after = base.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(base.weight, after)


def test_eval_mode_never_merges():
    _, layer = make()
    layer.eval()
    assert not layer.merged


def test_dropout_applies_only_to_adapter_input():
    base, layer = make(dropout=0.5)
    x = torch.randn(4, 32)
    layer.train()
    # With B = 0 the adapter contributes nothing, so dropout must not change the output.
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize(
    "kwargs",
    [{"r": 0}, {"r": -2}, {"alpha": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"dropout": -0.1}],
)
def test_bad_hyperparameters_are_clear_errors(kwargs):
    with pytest.raises(UserError) as e:
        make(**kwargs)
    name = next(iter(kwargs))
    assert {"r": "rank", "alpha": "alpha", "dropout": "dropout"}[name] in str(e.value)
