"""Shared fixtures: tiny Qwen2/Qwen3 checkpoints built offline, loaded like real ones."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
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


def tiny_config(model_dir, data, out, **overrides):
    """A TrainConfig for runs on a tiny model: fast, deterministic, every linear layer adapted."""
    from lora.train.config import TrainConfig

    base = dict(model=str(model_dir), data=str(data), output=str(out), rank=4, alpha=8,
                dropout=0.0, batch_size=2, grad_accum=1, lr=1e-2, warmup=0, max_steps=4,
                progress=False, seed=0, targets="all-linear")  # fmt: skip
    return TrainConfig(**(base | overrides))


def cli_args(**flags) -> list[str]:
    """Command-line arguments from keywords: `max_steps=4, progress=False` -> --max-steps 4 --no-progress."""
    args = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def assert_same_adapters(dir_a: Path, dir_b: Path, atol: float = 1e-6) -> None:
    """The two adapter files hold the same tensors, equal within `atol`."""
    from safetensors.torch import load_file

    a = load_file(Path(dir_a) / "adapter_model.safetensors")
    b = load_file(Path(dir_b) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def run_script(script: str, *args, **kw) -> subprocess.CompletedProcess:
    """Run `train.py` or `infer.py` as a user would, offline; output captured as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    kw = {"timeout": 600} | kw
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, **kw)  # fmt: skip


# torchrun (gloo on CPU, one thread per process: two processes share the two cores)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"]  # fmt: skip


def train_cli(args, nproc=None, ok=True) -> subprocess.CompletedProcess:
    """`train.py ARGS`, under `torchrun --nproc_per_node=NPROC` when given; must succeed if ok."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = torchrun(nproc) if nproc else [sys.executable]
    p = subprocess.run([*launcher, str(ROOT / "train.py"), *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def ctrl_c_under_torchrun(args, out: Path, nproc: int = 2) -> tuple[str, str, Path]:
    """Start `torchrun train.py ARGS --output OUT` in its own process group and, once the first
    step is logged, send SIGINT to the whole group, as Ctrl-C in a terminal does (torchrun and
    every worker get it). Asserts one checkpoint was saved once, without a traceback;
    returns (stdout, stderr, that checkpoint)."""
    import signal
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [*torchrun(nproc), str(ROOT / "train.py"), *map(str, args), "--output", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, stdout + stderr[-3000:]
    assert stdout.count("interrupted: saved") == 1
    assert "KeyboardInterrupt" not in stderr
    return stdout, stderr, checkpoints[0]


def single_process_run(model, autocast=None, scaler=None):
    """The few parts of a `Run` that `trainer.backward_window` reads, for a model on the CPU."""
    from types import SimpleNamespace

    from lora.train.distributed import DistInfo
    from lora.train.loss import CausalLMLoss

    autocast = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
    return SimpleNamespace(forward=CausalLMLoss(model), device=torch.device("cpu"),
                           autocast=autocast, scaler=scaler, dist=DistInfo())  # fmt: skip


def redraw(model, seed: int = 0):
    """Re-draw every weight at a size where each tensor changes the logits, for parity tests.

    At the default init (std 0.02, biases 0, norms 1) a tiny model nearly repeats its input
    token, whatever its layers hold, so a comparison of logits would pass with swapped,
    transposed or missing tensors. Norms U(0.5, 1.5), biases N(0, 0.5), embeddings N(0, 0.3),
    linear weights N(0, 1.5/√fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[1]))
    return model


def kept_for_backward(forward, exclude=()) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while `forward()` runs, one per storage, leaving
    out those that share storage with `exclude` (the weights, which are there anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        storage = t.untyped_storage().data_ptr()
        if storage not in skip:
            kept.setdefault(storage, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return list(kept.values())


def bf16_checkpoint(src, dst, tied: bool, shard: str | None = None):
    """`src`'s architecture and tokenizer with re-drawn weights, stored in bf16 as real Qwen
    checkpoints are (so loading in fp32 converts every tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.tie_word_embeddings = tied
    model = redraw(AutoModelForCausalLM.from_config(config), seed=2).to(torch.bfloat16)
    model.save_pretrained(dst, **({"max_shard_size": shard} if shard else {}))
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if not (dst / f.name).exists() and not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst
