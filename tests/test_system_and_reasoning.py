"""Per-row system prompts reach inference; reasoning is shown or hidden the same way."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, overfit_rows, write_json
from lora.data.prompt import PromptFormat, split_reasoning
from lora.infer.generate import inference_system


def test_system_prompt_at_inference_comes_from_flag_then_adapter_then_data():
    fmt = PromptFormat("chat", data_system="你是一名中医。")
    assert inference_system(fmt, None) == (
        PromptFormat("chat", "你是一名中医。", False, "你是一名中医。"),
        "data",
    )
    assert inference_system(fmt, "你是药师。")[0].system == "你是药师。"
    assert inference_system(fmt, "")[0].system is None  # '' asks for no system prompt
    trained_with = PromptFormat("chat", system="全局。", data_system="你是一名中医。")
    assert inference_system(trained_with, None) == (trained_with, "adapter")
    assert inference_system(PromptFormat("chat"), None) == (PromptFormat("chat"), None)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("多休息。", ("", "多休息。")),
        ("<think>\n头痛常见于疲劳。\n</think>\n\n多休息。", ("头痛常见于疲劳。", "多休息。")),
        ("\n\n</think>\n\n多休息。", ("", "多休息。")),  # Qwen3's prompt opened the block
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


@pytest.fixture(scope="module")
def trained_with_row_system(tiny_models, tmp_path_factory):
    """A tiny adapter trained on rows that all carry the same system prompt."""
    from lora.train.config import TrainConfig
    from lora.train.loop import train

    tmp = tmp_path_factory.mktemp("system")
    rows = [dict(r, system="你是一名中医。") for r in overfit_rows(4)]
    cfg = TrainConfig(
        model=str(tiny_models["qwen2"]),
        data=str(write_json(tmp / "rows.json", rows)),
        output=str(tmp / "out"),
        max_steps=1,
        batch_size=4,
        grad_accum=1,
        progress=False,
    )
    train(cfg)
    return tmp / "out"


def test_adapter_records_the_rows_system_prompt_and_infer_says_it_uses_it(trained_with_row_system):
    from lora.adapter import read_adapter_extra

    extra = read_adapter_extra(trained_with_row_system)
    assert extra["prompt_format"]["data_system"] == "你是一名中医。"
    assert extra["prompt_format"]["system"] is None
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, str(ROOT / "infer.py"), "--adapter", str(trained_with_row_system)]
    p = subprocess.run(
        args + ["--prompt", "头痛", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "using the system prompt most training rows carried: '你是一名中医。'" in p.stderr
    p = subprocess.run(
        args + ["--prompt", "头痛", "--max-new-tokens", "2", "--system", "你是药师。"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0 and "most training rows" not in p.stderr, p.stderr
