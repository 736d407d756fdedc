"""Keeping less for backward, computing the same: the SwiGLU MLP keeps g and u, not silu(g);
LoRA's dropout keeps a bool mask and the shared input."""

from __future__ import annotations

import pytest
import torch

from conftest import kept_for_backward, redraw, tiny_config
from lora.inject import apply_lora
from lora.layer import LoRALinear
from lora.model import load_model
from lora.spec import LoRASpec
from lora.train.activations import (
    dropout_then_project,
    keep_less_for_backward,
    lora_forward_keeping_a_mask,
    swiglu_mlp_forward,
)
from lora.train.loss import CausalLMLoss
from lora.train.run import load_model_with_lora

CPU = torch.device("cpu")


def lora_model(model_dir, lean: bool, dtype=torch.float32, targets="all-linear"):
    torch.manual_seed(0)  # the same A and B for both models
    model = redraw(load_model(str(model_dir), torch.float32, CPU)).to(dtype)
    apply_lora(model, LoRASpec(targets, r=4, alpha=8, dropout=0.0))
    for layer in model.modules():  # B ≠ 0, so every adapter shapes the output
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    if lean:
        assert keep_less_for_backward(model) == model.config.num_hidden_layers
    return model


def loss_and_grads(model, autocast: bool):
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = CausalLMLoss(model)(ids, torch.ones_like(ids), labels)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_same_loss_and_gradients_bit_for_bit(arch_dir, precision):
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    autocast = precision == "bf16-autocast"
    stock_loss, stock = loss_and_grads(lora_model(arch_dir, False, dtype), autocast)
    lean_loss, lean = loss_and_grads(lora_model(arch_dir, True, dtype), autocast)
    assert torch.equal(stock_loss, lean_loss)
    assert stock.keys() == lean.keys() and any("gate_proj" in n for n in stock)
    for name in stock:
        assert torch.equal(stock[name], lean[name]), name


def saved_activation_numels(model_dir, lean: bool) -> tuple[list[int], int]:
    """Sizes of the tensors a frozen MLP keeps for backward (its weights excluded), and the
    size of one (1, 5, intermediate) activation."""
    model = lora_model(model_dir, lean, targets="q_proj,v_proj")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, model.config.hidden_size, requires_grad=True)
    kept = kept_for_backward(lambda: mlp(x), exclude=mlp.parameters())
    return [t.numel() for t in kept], 5 * model.config.intermediate_size


def test_mlp_keeps_two_intermediate_tensors_instead_of_three(qwen2_dir):
    stock, intermediate = saved_activation_numels(qwen2_dir, lean=False)
    lean, _ = saved_activation_numels(qwen2_dir, lean=True)
    assert stock.count(intermediate) == 3  # g (for silu), silu(g) and u (for the product)
    assert lean.count(intermediate) == 2  # g and u
    assert sum(stock) - sum(lean) == intermediate


def test_other_activations_keep_their_own_forward(qwen2_dir):
    model = load_model(str(qwen2_dir), torch.float32, CPU)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert keep_less_for_backward(model) == 0


def test_training_models_use_it(qwen2_dir, tmp_path):
    cfg = tiny_config(qwen2_dir, tmp_path / "data.json", tmp_path / "out")
    model, _ = load_model_with_lora(cfg, CPU, "fp32")
    for layer in model.model.layers:
        assert layer.mlp.forward.__func__ is swiglu_mlp_forward


def test_training_gives_lora_dropout_the_lean_forward(qwen2_dir, tmp_path):
    cfg = tiny_config(qwen2_dir, tmp_path / "data.json", tmp_path / "out", dropout=0.1)
    model, _ = load_model_with_lora(cfg, CPU, "fp32")
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert adapted and all(m.forward.__func__ is lora_forward_keeping_a_mask for m in adapted)
    assert "forward" not in vars(LoRALinear(torch.nn.Linear(4, 4), dropout=0.1))  # plain by default


# LoRA's dropout: a bool mask and the shared input, instead of a mask and a dropped copy each


def test_dropped_projection_equals_autograd_with_the_same_mask():
    p = 0.3
    x = torch.randn(2, 7, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(0)
    ours = dropout_then_project(x, a, p)
    ours.square().sum().backward()
    ours_grads = x.grad.clone(), a.grad.clone()
    x.grad = a.grad = None
    torch.manual_seed(0)  # the same draws give the same mask
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    reference = torch.nn.functional.linear(x * keep / (1 - p), a)
    reference.square().sum().backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours_grads[0], x.grad)
    torch.testing.assert_close(ours_grads[1], a.grad)
    assert 0 < int((~keep).sum()) < keep.numel()  # some dropped, some kept


def test_q_and_v_keep_one_shared_input_and_a_byte_mask_each():
    torch.manual_seed(0)
    q, v = (LoRALinear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.1) for _ in range(2))
    assert keep_less_for_backward(torch.nn.ModuleList([q, v])) == 2  # what training does
    x = torch.randn(3, 16, requires_grad=True)
    weights = [p for m in (q, v) for p in m.parameters()]
    kept = kept_for_backward(lambda: q(x) + v(x), exclude=weights)
    kept = sorted(((t.dtype, t.numel()) for t in kept), key=str)
    assert kept == sorted([(torch.float32, 48), (torch.bool, 48), (torch.bool, 48),
                           (torch.float32, 12), (torch.float32, 12)], key=str)  # fmt: skip


class FixedMask(torch.nn.Module):
    """Dropout with a given keep-mask: the plain layer's forward with the saver's mask."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep * (1 / (1 - self.p))


@pytest.mark.parametrize("autocast", [False, True])
def test_the_saver_computes_the_plain_layer_formula(autocast):
    """LoRALinear.forward is h = base(x) + s·B(A(dropout(x))) in plain PyTorch; the forward
    training installs (activations.py) gives the same output and gradients for the same mask."""
    p = 0.3
    torch.manual_seed(0)
    plain = LoRALinear(torch.nn.Linear(16, 8), r=4, alpha=8, dropout=p)
    torch.nn.init.normal_(plain.lora_B.weight)
    lean = LoRALinear(torch.nn.Linear(16, 8), r=4, alpha=8, dropout=p)
    lean.load_state_dict(plain.state_dict())
    assert keep_less_for_backward(lean) == 1
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16 if autocast else torch.float32)  # as it arrives
    torch.manual_seed(1)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)  # the draw the saver makes
    plain.lora_dropout = FixedMask(keep, p)
    outputs, grads = [], []
    for layer in (plain, lean):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.float().square().sum().backward()
        outputs.append(out)
        grads.append([layer.lora_A.weight.grad, layer.lora_B.weight.grad])
    assert torch.equal(outputs[0], outputs[1])
    for ours, reference in zip(grads[1], grads[0]):
        assert torch.equal(ours, reference)  # bit for bit: the same kernels on the same tensors


@pytest.mark.parametrize("state", ["eval", "merged", "disabled"])
def test_the_saver_steps_aside_where_the_layer_has_no_dropout_to_apply(state):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), r=4, alpha=8, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = {"eval": layer.eval, "merged": layer.merge, "disabled": lambda: None}
        expected[state]()
        layer.disabled = state == "disabled"
        plain = layer(x)
        keep_less_for_backward(layer)
        assert torch.equal(layer(x), plain) and torch.equal(layer(x), layer(x))


def test_dropout_is_off_in_eval_mode():
    layer = LoRALinear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.5).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), layer(x))
