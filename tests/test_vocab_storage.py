"""An fp32 run of a bf16 checkpoint keeps the embedding and the head in bf16, computing the same:
the values are the checkpoint's either way, and every product still runs in fp32."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    assert_same_adapters,
    bf16_checkpoint,
    overfit_rows,
    tiny_config,
    train_cli,
    write_json,
)
from lora.inject import apply_lora
from lora.model import load_model
from lora.spec import LoRASpec
from lora.train import loss as loss_module
from lora.train.loss import CausalLMLoss
from lora.train.run import load_model_with_lora
from lora.train.vocab_storage import keep_vocab_matrices_narrow

CPU = torch.device("cpu")


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def bf16_dir(request, tiny_models, tmp_path):
    return bf16_checkpoint(tiny_models["qwen2"], tmp_path / "ckpt", tied=request.param)


def lora_model(path, narrow: bool):
    torch.manual_seed(0)  # the same A and B for both models
    model = load_model(str(path), torch.float32, CPU)
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4, alpha=8, dropout=0.0))
    for layer in model.modules():  # B ≠ 0, so every adapter shapes the output
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    if narrow:
        assert keep_vocab_matrices_narrow(model, torch.bfloat16) > 0
    return model


def loss_and_grads(model):
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    loss, _ = CausalLMLoss(model)(ids, torch.ones_like(ids), labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_training_run_stores_embedding_and_head_in_bf16_and_the_rest_in_fp32(bf16_dir, tmp_path):
    cfg = tiny_config(bf16_dir, tmp_path / "d.json", tmp_path / "out")
    model, _ = load_model_with_lora(cfg, CPU, "fp32")
    narrow = {model.model.embed_tokens.weight, model.lm_head.weight}
    assert {p.dtype for p in narrow} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if all(p is not q for q in narrow)} == {
        torch.float32
    }
    ids = torch.tensor([[1, 5, 9, 2]])
    assert model.model.embed_tokens(ids).dtype == torch.float32


def test_saves_two_bytes_per_element_of_each_distinct_matrix(bf16_dir):
    model = load_model(str(bf16_dir), torch.float32, CPU)
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4, alpha=8, dropout=0.0))
    matrices = 1 if model.config.tie_word_embeddings else 2
    elements = model.config.vocab_size * model.config.hidden_size
    assert keep_vocab_matrices_narrow(model, torch.bfloat16) == matrices * elements * 2


def test_same_loss_and_gradients_as_fp32_storage(bf16_dir, monkeypatch):
    # Blocks of 7 vocabulary rows: many blocks and a shorter last one, as the real head has.
    hidden = load_model(str(bf16_dir), torch.float32, CPU).config.hidden_size
    monkeypatch.setattr(loss_module, "WIDEN_BLOCK_FLOATS", 7 * hidden)
    wide_loss, wide = loss_and_grads(lora_model(bf16_dir, narrow=False))
    narrow_loss, narrow = loss_and_grads(lora_model(bf16_dir, narrow=True))
    assert torch.equal(wide_loss, narrow_loss)  # each logit is the same fp32 dot product
    assert wide.keys() == narrow.keys() and len(wide) > 0
    for name in wide:  # ∂loss/∂h sums the head's blocks in another order: fp32 rounding only
        error = (narrow[name] - wide[name]).norm() / wide[name].norm()
        assert error < 1e-5, name


def test_full_forward_logits_are_unchanged(bf16_dir):
    """Generation and evaluation call the head and the embedding through the model's forward."""
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    wide = lora_model(bf16_dir, narrow=False)(ids).logits
    narrow = lora_model(bf16_dir, narrow=True)(ids).logits
    assert narrow.dtype == torch.float32
    assert torch.equal(wide, narrow)


def test_weights_that_bf16_cannot_hold_stay_fp32(qwen2_dir):
    """The tiny test models are fp32 checkpoints: narrowing them would round, so nothing moves."""
    model = load_model(str(qwen2_dir), torch.float32, CPU)
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4, alpha=8, dropout=0.0))
    assert keep_vocab_matrices_narrow(model, torch.bfloat16) == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "forward" not in vars(model.model.embed_tokens)  # the stock forward


def test_bf16_and_sharded_runs_are_left_as_they_are(tiny_models, tmp_path):
    path = bf16_checkpoint(tiny_models["qwen2"], tmp_path / "ckpt", tied=False)
    cfg = tiny_config(path, tmp_path / "d.json", tmp_path / "out")
    model, _ = load_model_with_lora(cfg, CPU, "bf16")
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert "forward" not in vars(model.model.embed_tokens)
    cfg.shard = "fsdp"  # FSDP all-gathers the root's parameters as one group: one dtype
    model, _ = load_model_with_lora(cfg, CPU, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_two_processes_equal_one_on_a_bf16_checkpoint(tiny_models, tmp_path):
    """DDP broadcasts every parameter at start, the bf16 ones beside the fp32 ones."""
    path = bf16_checkpoint(tiny_models["qwen2"], tmp_path / "ckpt", tied=False)
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    args = ["--model", path, "--data", data, "--rank", "4", "--alpha", "8", "--dropout", "0",
            "--lr", "1e-2", "--warmup", "0", "--max-steps", "3", "--no-progress"]  # fmt: skip
    train_cli([*args, "--output", tmp_path / "single", "--batch-size", "4"])
    train_cli([*args, "--output", tmp_path / "ddp", "--batch-size", "2"], nproc=2)
    assert_same_adapters(tmp_path / "single", tmp_path / "ddp", atol=1e-5)


def test_head_products_widen_block_by_block_to_the_wide_results(monkeypatch):
    monkeypatch.setattr(loss_module, "WIDEN_BLOCK_FLOATS", 5 * 16)  # 5-row blocks, last one of 3
    g = torch.Generator().manual_seed(0)
    narrow = torch.randn(23, 16, generator=g).bfloat16()
    wide, bias = narrow.float(), torch.randn(23, generator=g)
    h, probs = torch.randn(4, 16, generator=g), torch.randn(4, 23, generator=g)
    logits = loss_module.head_logits(h, narrow, bias)
    torch.testing.assert_close(logits, torch.nn.functional.linear(h, wide, bias), rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_module.times_head(probs, narrow), probs @ wide)
