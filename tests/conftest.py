"""Shared fixtures: tiny Qwen2/Qwen3 checkpoints built offline, loaded like real ones."""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
QWEN_TOKENIZER = SHARED / "models" / "qwen2.5-tokenizer"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Prepared-data cache of test runs: a fresh directory, never the user's ~/.cache.
os.environ["QWEN_LORA_CACHE"] = tempfile.mkdtemp(prefix="qwen-lora-cache-")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tools.tiny_qwen import build_tiny_model  # noqa: E402

FIXTURE_TEXTS = [
    "使用中医知识正确回答适合这个病例的中成药。",
    "肛门疼痛，痔疮，肛裂。",
    "可以使用地榆槐角丸。",
    "Hello world, what is LoRA?",
    "Instruction: Input: Answer:",
    "你好，世界。头痛发热咳嗽。",
] + [
    row["output"] + row["input"]
    for row in json.loads((ROOT / "data" / "chinese_med.json").read_text(encoding="utf-8"))
]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"qwen2": dir, "qwen3": dir}: saved with save_pretrained, loaded via from_pretrained."""
    base = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(base / arch, arch, FIXTURE_TEXTS) for arch in ("qwen2", "qwen3")}


@pytest.fixture(scope="session")
def standard_init_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models with the usual 0.02 init (weights of realistic size), for fp32 numerics."""
    base = tmp_path_factory.mktemp("tiny-std")
    return {
        arch: build_tiny_model(base / arch, arch, FIXTURE_TEXTS, initializer_range=0.02)
        for arch in ("qwen2", "qwen3")
    }


@pytest.fixture(scope="session")
def qwen2_dir(tiny_models) -> Path:
    return tiny_models["qwen2"]


@pytest.fixture(params=["qwen2", "qwen3"])
def arch_dir(request, tiny_models) -> Path:
    return tiny_models[request.param]


def real_tokenizer():
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip("../shared/models/qwen2.5-tokenizer is not available")
    return _load_real_tokenizer()


@functools.lru_cache(maxsize=1)
def _load_real_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def overfit_rows(n: int = 8) -> list[dict]:
    """Short, distinct Alpaca rows a tiny model can memorise."""
    rows = json.loads((ROOT / "data" / "chinese_med.json").read_text(encoding="utf-8"))[:n]
    return [
        {"instruction": r["input"], "input": "", "output": r["output"].split("。")[0] + "。"}
        for r in rows
    ]
