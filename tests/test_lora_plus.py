"""LoRA+: B's learning rate is ratio × A's, at every step of the schedule, like peft's grouping."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import cfg, run_cli

from conftest import overfit_rows, write_json
from lora.errors import UserError
from lora.inject import apply_lora, lora_layers, lora_parameters
from lora.lora_plus import optimizer_param_groups
from lora.model import load_model
from lora.spec import LoRASpec
from lora.train.loop import train
from lora.train.schedule import lr_factor, warmup_cosine


def lora_model(model_dir):
    model = load_model(str(model_dir))
    apply_lora(model, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    return model


def test_ratio_puts_every_a_at_lr_and_every_b_at_ratio_times_lr(qwen2_dir):
    model = lora_model(qwen2_dir)
    groups = optimizer_param_groups(model, lr=1e-3, ratio=16)
    layers = lora_layers(model).values()
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert groups[0]["params"] == [m.lora_A.weight for m in layers]
    assert groups[1]["params"] == [m.lora_B.weight for m in layers]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(lora_parameters(model))


def test_without_ratio_the_optimizer_is_exactly_the_plain_one(qwen2_dir):
    model = lora_model(qwen2_dir)
    plain = torch.optim.AdamW(lora_parameters(model), lr=1e-3, weight_decay=0.1)
    grouped = torch.optim.AdamW(optimizer_param_groups(model, 1e-3), lr=1e-3, weight_decay=0.1)
    assert grouped.state_dict() == plain.state_dict()  # old checkpoints resume unchanged


def test_schedule_keeps_the_ratio_at_every_step(qwen2_dir):
    model = lora_model(qwen2_dir)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 2e-4, ratio=16), lr=2e-4)
    scheduler = warmup_cosine(optimizer, warmup=3, total=10)
    for step in range(10):
        lr_a, lr_b = (g["lr"] for g in optimizer.param_groups)
        assert lr_a == pytest.approx(2e-4 * lr_factor(step, 3, 10), rel=1e-12)
        assert lr_b == pytest.approx(16 * lr_a, rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_groups_give_each_parameter_the_rate_peft_gives_it(qwen2_dir):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ours = lora_model(qwen2_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(load_model(str(qwen2_dir)), config)
    their_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    their_names = {id(p): n for n, p in theirs.named_parameters()}
    their_lr = {
        their_names[id(p)].replace("base_model.model.", "").replace(".default", ""): g["lr"]
        for g in their_opt.param_groups
        for p in g["params"]
    }
    our_names = {id(p): n for n, p in ours.named_parameters()}
    our_lr = {
        our_names[id(p)]: g["lr"]
        for g in optimizer_param_groups(ours, lr=1e-3, ratio=16)
        for p in g["params"]
    }
    assert len(our_lr) == 2 * len(lora_layers(ours)) and our_lr == their_lr


@pytest.mark.parametrize("ratio", [0, -2.0, float("nan"), float("inf")])
def test_a_ratio_that_is_not_positive_is_a_clear_error(qwen2_dir, ratio):
    with pytest.raises(UserError, match="--lora-plus-ratio"):
        optimizer_param_groups(lora_model(qwen2_dir), 1e-3, ratio)


def first_step_b_size(qwen2_dir, tmp_path, **kw):
    """(max |B| after one AdamW step from B = 0, the run's directory).

    Adam's first step moves each element by ±lr whatever its gradient's size (m̂/√v̂ = ±1)."""
    data = write_json(tmp_path / "rows.json", overfit_rows(4))
    out = tmp_path / f"out{kw.get('lora_plus_ratio')}"
    train(cfg(qwen2_dir, data, out, max_steps=1, lr=1e-3, max_grad_norm=0, **kw))
    tensors = load_file(out / "adapter_model.safetensors")
    return max(t.abs().max().item() for k, t in tensors.items() if ".lora_B." in k), out


def test_training_moves_b_ratio_times_further_and_records_the_ratio(qwen2_dir, tmp_path):
    plain, _ = first_step_b_size(qwen2_dir, tmp_path)
    plus, out = first_step_b_size(qwen2_dir, tmp_path, lora_plus_ratio=16.0)
    assert plain == pytest.approx(1e-3, rel=1e-3) and plus == pytest.approx(16e-3, rel=1e-3)
    args = json.loads((out / "train_args.json").read_text())["args"]
    assert args["lora_plus_ratio"] == 16.0


def test_resuming_with_another_ratio_is_refused(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=2, stop_after_steps=1, lora_plus_ratio=16.0))
    with pytest.raises(UserError, match="lora_plus_ratio"):
        train(cfg(qwen2_dir, data, out, max_steps=2, resume="auto", lora_plus_ratio=4.0))


def test_cli_bad_ratio_is_one_line_before_the_model_loads(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(4))
    p = run_cli(
        "--model", str(qwen2_dir), "--data", str(data), "--output", str(tmp_path / "o"),
        "--max-steps", "1", "--no-progress", "--lora-plus-ratio", "-1",
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --lora-plus-ratio must be positive (the paper suggests 16), got -1.0"
    ]
