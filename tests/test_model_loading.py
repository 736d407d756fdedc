"""Loading the base: a local safetensors checkpoint is read one tensor at a time (pread), and the
model is exactly what `AutoModelForCausalLM.from_pretrained` builds from the same directory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import bf16_checkpoint
from lora.model import load_model


@pytest.mark.parametrize(
    "arch, tied, shard",
    [("qwen2", False, None), ("qwen3", True, None), ("qwen2", False, "100KB")],
    ids=["qwen2", "qwen3-tied", "qwen2-sharded"],
)
def test_loading_in_fp32_gives_exactly_the_model_from_pretrained_builds(
    tiny_models, tmp_path, arch, tied, shard
):
    path = bf16_checkpoint(tiny_models[arch], tmp_path / "ckpt", tied, shard)
    assert shard is None or (path / "model.safetensors.index.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with pytest.MonkeyPatch.context() as mp:  # not through from_pretrained's memory map
        mp.setattr(AutoModelForCausalLM, "from_pretrained", _refuse)
        model = load_model(str(path), torch.float32)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in theirs.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], p), name
    tied_now = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied_now == tied
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert model.name_or_path == str(path)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_bf16_load_keeps_bf16(tiny_models, tmp_path):
    path = bf16_checkpoint(tiny_models["qwen2"], tmp_path / "ckpt", tied=False)
    model = load_model(str(path), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _refuse(*args, **kwargs):
    raise AssertionError("AutoModelForCausalLM.from_pretrained read the checkpoint")


def test_loading_prints_no_loading_weights_bar(tiny_models, capfd):
    """transformers 5's "Loading weights 0/291" bar went with every command; loading is ours
    to report, in one line where it matters."""
    import torch

    load_model(str(tiny_models["qwen2"]), torch.float32)
    assert "Loading weights" not in capfd.readouterr().err
