"""Speed and memory of our trainer against peft + Trainer and the tutorial recipe, side by side.

    python bench/run.py [--model DIR | --config qwen2.5-0.5b] [--steps 4] [--rows 64]

Every contender runs in a fresh process (bench/contender.py) for the same number of optimizer
steps on the same rows, model, seed, r=8, α=16, q/v targets, lr, batch 4, accumulation 2,
max length 512. Writes bench/results/<device>-<date>.{json,md} and prints the table.
Defaults: the real Qwen2.5-Coder-0.5B-Instruct from ../shared/tools/get_real_qwen.sh, rows from
../shared/data/zhongjing_huatuo26m_test/huatuo26M_test.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
REAL_MODEL = Path.home() / ".cache/qwen-real/Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_DATA = SHARED / "data/zhongjing_huatuo26m_test/huatuo26M_test.json"
CONTENDERS = ["ours", "peft-trainer", "tutorial"]


def matmul_peak_flops(device, dtype, n=2048, repeats=5) -> float:
    """Measured dense matmul throughput on this machine (FLOP/s), median of a few runs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[1:])


def flops_per_token(model_dir, mean_len) -> float:
    """≈ 4 × matmul parameters (forward + input-gradient backward; frozen weights get no weight
    gradient) + attention score/value FLOPs at the mean row length."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, inter, vocab = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    heads, kv = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
    )
    head_dim = cfg.get("head_dim") or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter
    matmul_params = layers * per_layer + h * vocab
    attention = 4 * 2 * layers * mean_len * heads * head_dim / 2  # QKᵀ and AV, causal half, fwd+bwd
    return 4 * matmul_params + attention


def build_random_model(config_name: str, workdir: Path) -> Path:
    """Random-init checkpoint of a real architecture (speed/memory only) with the real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(SHARED / "models/configs" / config_name))
    model = AutoModelForCausalLM.from_config(config)
    out = workdir / config_name
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(SHARED / "models/qwen2.5-tokenizer")).save_pretrained(out)
    return out


def prepare(args, workdir: Path) -> dict:
    from lora.data import read_dataset
    from lora.model import load_tokenizer
    from lora.prompt import PromptFormat, encode_sample

    samples, _ = read_dataset(args.data)
    random.Random(args.seed).shuffle(samples)
    # One epoch: every contender sees every row exactly once (so each meets the longest row,
    # which decides peak activation memory), and they all process the same tokens.
    args.rows = args.steps * 4 * 2
    train, heldout = samples[: args.rows], samples[args.rows : args.rows + args.heldout]
    tokenizer = load_tokenizer(args.model)
    fmt = PromptFormat("chat")
    encoded = [encode_sample(s, fmt, tokenizer, args.max_len) for s in train]
    train_file = workdir / "rows.json"
    train_file.write_text(
        json.dumps(
            [
                {
                    "instruction": s.turns[0].user,
                    "input": s.turns[0].user_input,
                    "output": s.turns[0].assistant,
                }
                for s in train
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    held = [encode_sample(s, fmt, tokenizer, args.max_len) for s in heldout]
    return {
        "model": str(args.model),
        "train_file": str(train_file),
        "workdir": str(workdir),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 2e-4,
        "max_len": args.max_len,
        "train_rows": [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded],
        "heldout": [{"input_ids": e.input_ids, "labels": e.labels} for e in held],
        "device": args.device,
        "mean_len": statistics.mean(len(e.input_ids) for e in encoded),
    }


def run_contender(name, spec_path, workdir) -> dict:
    result_path = workdir / f"{name}.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench/contender.py"),
        name,
        "--spec",
        str(spec_path),
        "--result",
        str(result_path),
    ]
    t = time.perf_counter()
    p = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - t
    print(
        f"  {name}: {result['real_tokens'] / result['seconds']:.1f} real tokens/s, wall {result['wall_s']:.0f}s",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help=f"checkpoint dir (default {REAL_MODEL})")
    p.add_argument(
        "--config",
        default=None,
        help="random-init model from ../shared/models/configs/NAME instead",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument(
        "--steps",
        type=int,
        default=4,
        help="optimizer steps per contender: exactly one epoch over steps × 8 rows",
    )
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--results", default=str(ROOT / "bench/results"))
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    if args.config:
        args.model = str(build_random_model(args.config, workdir))
    args.model = args.model or str(REAL_MODEL)
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(
            f"no model at {args.model}: run `PYTHON=.venv/bin/python ../shared/tools/get_real_qwen.sh` "
            f"or pass --model DIR / --config NAME"
        )
    if not Path(args.data).is_file():
        raise SystemExit(f"no data at {args.data} (needs ../shared, or pass --data)")

    spec = prepare(args, workdir)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    peak = matmul_peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    fpt = flops_per_token(args.model, spec["mean_len"])
    print(
        f"benchmark on {device}: {args.steps} steps × batch 4 × accum 2, max_len {args.max_len}, "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s",
        flush=True,
    )

    results = {}
    for name in args.contenders.split(","):
        results[name] = r = run_contender(name, spec_path, workdir)
        r["real_tokens_per_s"] = r["real_tokens"] / r["seconds"]
        r["supervised_tokens_per_s"] = r["supervised_tokens"] / r["seconds"]
        r["utilization"] = fpt * r["real_tokens_per_s"] / peak

    device_name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{os.cpu_count()}cores"
    ).replace(" ", "_")
    date = datetime.date.today().isoformat()
    command = "python bench/run.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    ratios = {}
    if "ours" in results:
        for other in ("peft-trainer", "tutorial"):
            if other in results:
                ratios[f"ours/{other} real tokens/s"] = (
                    results["ours"]["real_tokens_per_s"] / results[other]["real_tokens_per_s"]
                )
                ratios[f"ours/{other} peak memory"] = (
                    results["ours"]["peak_memory_mb"] / results[other]["peak_memory_mb"]
                )
                ratios[f"ours/{other} held-out loss"] = (
                    results["ours"]["heldout_loss"] / results[other]["heldout_loss"]
                )
    lines = [
        f"## Benchmark, {device_name}, {date}",
        "",
        f"Model `{Path(args.model).name}`, {args.rows} rows of `{Path(args.data).name}` (mean {spec['mean_len']:.0f} tokens), "
        f"{args.steps} optimizer steps (one epoch, all timed), batch 4 × accumulation 2, r=8, α=16, q/v, lr 2e-4, max length {args.max_len}. "
        f"Matmul peak measured in the same run: {peak / 1e9:.0f} GFLOP/s. torch {torch.__version__}, {platform.python_version()}.",
        "",
        "| contender | real tokens/s | supervised tokens/s | peak memory (MB) | train loss at end | held-out loss | utilization |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['real_tokens_per_s']:.1f} | {r['supervised_tokens_per_s']:.1f} | {r['peak_memory_mb']:.0f} | "
            f"{r['end_train_loss']:.4f} | {r['heldout_loss']:.4f} | {100 * r['utilization']:.1f}% |"
        )
    lines += [
        "",
        *[f"- {k}: **{v:.2f}×**" for k, v in ratios.items()],
        "",
        f"Command: `{command}`",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{device_name}-{date}"
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "device": device_name,
                "date": date,
                "command": command,
                "matmul_peak_flops": peak,
                "flops_per_token": fpt,
                "spec": {k: v for k, v in spec.items() if k not in ("train_rows", "heldout")},
                "results": results,
                "ratios": ratios,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    print(f"written {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
