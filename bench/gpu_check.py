"""GPU check: train a random-init Qwen2.5-0.5B for ~20 steps in bf16 and in fp16, on a GPU.

    make gpu-check          (or: python bench/gpu_check.py [--steps 20] [--config PATH])

This project's CI and developers have no GPU. Every precision path a GPU takes runs in the
test suite on the CPU (tests/test_precision.py); what only a GPU can tell is whether CUDA
kernels, fused AdamW and memory behave too. For each of bf16 and fp16 this script trains
through `lora.train.loop.train`, exactly as `train.py` does, and checks:

    the loss falls          on 8 rows seen over and over, the mean loss of the last 5 steps
                            is at least 10% below the first step's
    the adapter reloads     `load_for_inference` gives back the saved weights, and generates

then prints tokens/s and peak GPU memory. Any failed check exits with status 1.

The model has the real architecture (config from ../shared/models/configs/qwen2.5-0.5b, or the
copy below when ../shared is absent) with random weights, saved in bf16 as real checkpoints
are: right for speed and memory, meaningless for answers. The tokenizer is a small BPE trained
on data/chinese_med.json (tools/tiny_qwen.py), so nothing is downloaded.

Without a GPU it says so and exits 0, claiming nothing. `--device cpu` runs the same checks on
the CPU (slowly: CPUs without bf16/fp16 units emulate them), to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_CONFIG = ROOT.parent / "shared/models/configs/qwen2.5-0.5b/config.json"
DATA = ROOT / "data/chinese_med.json"
# Qwen2.5-0.5B's architecture, for machines without ../shared.
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "initializer_range": 0.02,
}  # fmt: skip
ROWS = 8  # a small fixed set, seen many times in ~20 steps: the loss must fall
MIN_DROP = 0.10  # the last 5 steps' mean loss must be at least 10% below the first step's


def build_model(config_path: Path | None, out: Path, layers: int | None) -> Path:
    """A random-init checkpoint of the config's shape, saved in bf16, with a local tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from tools.tiny_qwen import build_tokenizer, demo_texts

    if config_path is not None:
        values = json.loads(config_path.read_text())
    else:
        values = dict(QWEN25_05B)
    if layers:  # fewer layers, same widths: a quick run of this script on a CPU
        values["num_hidden_layers"] = layers
        values.pop("layer_types", None)
    tokenizer = build_tokenizer(demo_texts(DATA), out)
    im_end, eot = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    values.update(bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
    config = AutoConfig.for_model(**values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(out)
    return out


def small_dataset(out: Path) -> Path:
    """The first ROWS rows of the demo data, as a file train.py reads."""
    out.write_text(json.dumps(json.loads(DATA.read_text())[:ROWS], ensure_ascii=False))
    return out


def train_once(model_dir: Path, out: Path, precision: str, device: str, steps: int) -> dict:
    """Train `steps` steps in `precision`; returns the losses, tokens/s and peak memory."""
    from lora.train.config import TrainConfig
    from lora.train.loop import train

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        model=str(model_dir), data=str(small_dataset(out.with_suffix(".json"))), output=str(out),
        precision=precision,
        device=device, max_steps=steps, batch_size=4, grad_accum=1, lr=2e-3, warmup=2,
        targets="all-linear", rank=16, alpha=32, dropout=0.0, max_len=256, progress=False,
        overwrite=True, seed=0,
    )  # fmt: skip
    history = train(cfg).history
    timed = history[1:] or history  # the first step includes one-off kernel setup
    return {
        "losses": [r["loss"] for r in history],
        "tokens_per_s": sum(r["real_tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
        "peak_mb": peak_memory_mb(device),
    }


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by tensors; on CPU, the process's peak RSS (all runs so far)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def adapter_reloads(out: Path, precision: str, device: str) -> bool:
    """The saved adapter loads onto the base, equals what was saved, and generates."""
    from safetensors.torch import load_file

    from lora.adapter import ADAPTER_WEIGHTS, lora_weights_by_key
    from lora.infer.generate import (
        GenerationSettings,
        LoadOptions,
        generate_batch,
        load_for_inference,
        single_turn,
    )

    loaded = load_for_inference(out, LoadOptions(device=device, dtype=precision))
    saved = load_file(out / ADAPTER_WEIGHTS)
    same = all(
        torch.equal(w.detach().cpu(), saved[k])
        for k, w in lora_weights_by_key(loaded.model).items()
    )
    (answer,) = generate_batch(loaded, [single_turn("你好")], GenerationSettings(max_new_tokens=4))
    return same and answer["new_tokens"] >= 1


def check(precision: str, result: dict, reloads: bool) -> list[str]:
    """The failed checks of one precision (empty when all passed)."""
    losses = result["losses"]
    late = statistics.mean(losses[-5:])
    failures = []
    if not all(math.isfinite(x) for x in losses):
        failures.append(f"{precision}: non-finite loss {losses}")
    elif late > (1 - MIN_DROP) * losses[0]:
        failures.append(
            f"{precision}: loss did not fall: first {losses[0]:.3f}, last-5 mean {late:.3f}"
        )
    if not reloads:
        failures.append(f"{precision}: the saved adapter did not reload")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--config", type=Path, default=None, help="a config.json (default: Qwen2.5-0.5B)"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--layers", type=int, default=None, help="fewer decoder layers (quick CPU runs)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine; nothing was checked or measured. "
              "(The CPU runs every precision path in `make test`.)")  # fmt: skip
        return 0
    config = args.config or (SHARED_CONFIG if SHARED_CONFIG.is_file() else None)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"gpu-check on {name}: {args.steps} steps per precision, config {config or 'built-in Qwen2.5-0.5B'}"
    )
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(config, Path(tmp) / "model", args.layers)
        for precision in ("bf16", "fp16"):
            out = Path(tmp) / precision
            result = train_once(model_dir, out, precision, args.device, args.steps)
            reloads = adapter_reloads(out, precision, args.device)
            failures += check(precision, result, reloads)
            losses = result["losses"]
            print(f"{precision}: loss {losses[0]:.3f} -> {statistics.mean(losses[-5:]):.3f} (last 5), "
                  f"{result['tokens_per_s']:.0f} tokens/s, peak memory {result['peak_mb']:.0f} MB, "
                  f"adapter reloads: {'yes' if reloads else 'NO'}")  # fmt: skip
    for line in failures:
        print(f"FAILED {line}")
    print("gpu-check: all checks passed" if not failures else "gpu-check: FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
