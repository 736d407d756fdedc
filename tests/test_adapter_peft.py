"""Adapter files: PEFT's format both ways, parity of logits and gradients with peft, bad files."""

import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open

from lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from lora.errors import UserError
from lora.inject import apply_lora, lora_layers
from lora.model import load_model
from lora.spec import LoRASpec

peft = pytest.importorskip("peft")


def ids(vocab, seed=0):
    return torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=1):
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)


def peft_model_like(model_dir, targets, r=4, alpha=8):
    base = load_model(str(model_dir))
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(base, config)


def copy_ours_into_peft(ours, theirs):
    their_modules = dict(theirs.named_modules())
    for name, layer in lora_layers(ours).items():
        target = their_modules[f"base_model.model.{name}"]
        with torch.no_grad():
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_logits_and_adapter_gradients_equal_peft(arch_dir, targets):
    ours = load_model(str(arch_dir))
    names = targets if isinstance(targets, str) else ",".join(targets)
    apply_lora(ours, LoRASpec(names, r=4, alpha=8, dropout=0.0))
    randomize_b(ours)
    theirs = peft_model_like(arch_dir, targets)
    copy_ours_into_peft(ours, theirs)
    x = ids(ours.config.vocab_size)
    out_ours, out_theirs = ours(x, labels=x), theirs(x, labels=x)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    their_modules = dict(theirs.named_modules())
    n_compared = 0
    for name, layer in lora_layers(ours).items():
        target = their_modules[f"base_model.model.{name}"]
        torch.testing.assert_close(
            layer.lora_A.weight.grad, target.lora_A["default"].weight.grad, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            layer.lora_B.weight.grad, target.lora_B["default"].weight.grad, atol=1e-5, rtol=0
        )
        n_compared += 1
    assert n_compared == len(lora_layers(ours)) > 0


def test_saved_file_has_peft_keys_fp32_contiguous_and_pt_metadata(qwen2_dir, tmp_path):
    model = load_model(str(qwen2_dir))
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4, alpha=8))
    save_adapter(model, tmp_path, base_model_name_or_path=str(qwen2_dir))
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in keys}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(
        ".default." not in k and (k.endswith("lora_A.weight") or k.endswith("lora_B.weight"))
        for k in keys
    )
    assert len(keys) == 2 * 2 * model.config.num_hidden_layers
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    expected = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(qwen2_dir),
    }
    assert {k: config[k] for k in expected} == expected
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_our_adapter_loads_in_peft_without_warnings_and_same_logits(arch_dir, tmp_path, caplog):
    ours = load_model(str(arch_dir))
    apply_lora(ours, LoRASpec("all-linear", r=4, alpha=8, dropout=0.0))
    randomize_b(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(arch_dir))
    base = load_model(str(arch_dir))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], (
        messages
    )
    x = ids(ours.config.vocab_size)
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=1e-5, rtol=0)


def test_peft_saved_adapter_loads_in_ours_with_same_logits(arch_dir, tmp_path):
    theirs = peft_model_like(arch_dir, ["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(3)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = load_model(str(arch_dir))
    load_adapter(ours, tmp_path)
    x = ids(ours.config.vocab_size)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=0)


def test_adapter_dir_without_files_is_a_clear_error(qwen2_dir, tmp_path):
    model = load_model(str(qwen2_dir))
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")


def test_truncated_safetensors_is_a_clear_error(qwen2_dir, tmp_path):
    model = load_model(str(qwen2_dir))
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4))
    save_adapter(model, tmp_path)
    data = (tmp_path / ADAPTER_WEIGHTS).read_bytes()
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_adapter(load_model(str(qwen2_dir)), tmp_path)


def test_adapter_for_another_hidden_size_is_a_clear_error(qwen2_dir, tmp_path):
    from tools.tiny_qwen import build_tiny_model

    bigger = build_tiny_model(tmp_path / "bigger", "qwen2", ["abc def"], hidden_size=96)
    model = load_model(str(bigger))
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(UserError, match="hidden_size"):
        load_adapter(load_model(str(qwen2_dir)), tmp_path / "adapter")


def test_shape_mismatch_without_recorded_shape_names_the_tensor(qwen2_dir, tmp_path):
    from tools.tiny_qwen import build_tiny_model

    bigger = build_tiny_model(tmp_path / "bigger", "qwen2", ["abc def"], hidden_size=96)
    theirs = peft_model_like(bigger, ["q_proj", "v_proj"])
    theirs.save_pretrained(
        str(tmp_path / "peft")
    )  # peft records no base shape: tensor shapes decide
    with pytest.raises(UserError, match="shape"):
        load_adapter(load_model(str(qwen2_dir)), tmp_path / "peft")


def test_missing_keys_are_an_error(qwen2_dir, tmp_path):
    model = load_model(str(qwen2_dir))
    apply_lora(model, LoRASpec("q_proj,v_proj", r=4))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj"]
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match="missing key"):
        load_adapter(load_model(str(qwen2_dir)), tmp_path)
