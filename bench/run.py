"""Speed and memory of our trainer against TRL's SFTTrainer, peft + Trainer and the tutorial
recipe, side by side, each with gradient checkpointing off and on.

    python bench/run.py [--model DIR | --config qwen2.5-0.5b | --tiny] [--steps 16] [--repeats 1]
    python bench/run.py --lengths 256,512,1024,2048 [--steps 6]    # sequence-length scaling
    python bench/run.py --render bench/results/X.json [--docs]       # re-render from a JSON
    python bench/run.py --render A.json B.json --docs      # scaling runs of other lengths, one table

Every contender runs in a fresh process (bench/contender.py) for the same optimizer steps on
the same rows, model, seed, r=8, α=16, q/v targets, lr, batch 4, accumulation 2, max length
512. The first --warmup-steps steps (2) are excluded: tokens/s, the median step time and its
min–max come from the steady state. Ratios compare ours with another contender at the same
gradient-checkpointing setting only. Ours also gets a memory breakdown (bench/memory.py).
Writes bench/results/<device>-<date>.{json,md} (…-scaling-… for --lengths) and prints the
table; --docs (old name --readme) rewrites the tables of docs/benchmark.md from the JSON.
Defaults: the real Qwen2.5-Coder-0.5B-Instruct from ../shared/tools/get_real_qwen.sh, rows from
../shared/data/zhongjing_huatuo26m_test/huatuo26M_test.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
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
sys.path.insert(0, str(ROOT / "bench"))
from report import (  # noqa: E402
    check_combinable,
    read_results,
    render_results,
    update_page,
    write_atomic,
)

SHARED = ROOT.parent / "shared"
BENCHMARK_PAGE = "docs/benchmark.md"  # under ROOT: the page whose bench:KIND blocks --docs rewrites
REAL_MODEL = Path.home() / ".cache/qwen-real/Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_DATA = SHARED / "data/zhongjing_huatuo26m_test/huatuo26M_test.json"
TOKENIZER = SHARED / "models/qwen2.5-tokenizer"
CONTENDERS = ["ours", "trl", "peft-trainer", "tutorial"]
SCALING_CONTENDERS = ["ours", "trl"]
VERSIONED = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers"]


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
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(out)
    return out


def build_tiny_model(workdir: Path) -> Path:
    """A 2-layer, hidden-64 random Qwen2 with the real tokenizer, saved in bf16 like the real
    checkpoint: every code path of the benchmark in seconds (numbers mean nothing)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    out = workdir / "tiny-qwen2"
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# Rows


def read_rows(args):
    """The data file's samples, shuffled by the seed: (train samples, held-out samples)."""
    from lora.data.records import read_dataset

    samples, _ = read_dataset(args.data)
    random.Random(args.seed).shuffle(samples)
    # One epoch: every contender sees every row exactly once (so each meets the longest row,
    # which decides peak activation memory), and they all process the same tokens.
    n = args.steps * args.batch_size * args.grad_accum
    if len(samples) < n + args.heldout:
        raise SystemExit(f"{args.data} has {len(samples)} rows; {n + args.heldout} are needed")
    return samples[:n], samples[n : n + args.heldout]


def long_samples(samples, tokenizer, fmt, length: int):
    """Rows that fill `length` tokens: each question answered by its own answer followed by the
    next rows' answers, until the rendered row holds at least `length` tokens.

    The answers are real text (so tokenization is realistic) and the row stays one
    prompt/completion pair, which every contender supervises the same way.
    """
    from lora.data.prompt import encode_sample
    from lora.data.records import Sample, Turn

    out = []
    for i, s in enumerate(samples):
        answers, j = [s.turns[0].assistant], i
        while True:
            sample = Sample((Turn(s.turns[0].user, "\n\n".join(answers), s.turns[0].user_input),))
            if len(encode_sample(sample, fmt, tokenizer).input_ids) >= length:
                break
            j += 1
            answers.append(samples[j % len(samples)].turns[0].assistant)
        out.append(sample)
    return out


def conversation(sample) -> dict:
    """TRL's conversational prompt/completion row for a one-turn sample, as ours renders it."""
    turn = sample.turns[0]
    user = f"{turn.user}\n{turn.user_input}" if turn.user_input else turn.user
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": turn.assistant}],
    }


def write_alpaca(samples, path: Path) -> None:
    rows = [
        {
            "instruction": s.turns[0].user,
            "input": s.turns[0].user_input,
            "output": s.turns[0].assistant,
        }
        for s in samples
    ]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def build_spec(args, train, heldout, workdir: Path, max_len: int) -> dict:
    """Everything a contender process needs, written once and read by all of them."""
    from lora.data.prompt import PromptFormat, encode_sample
    from lora.model import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    fmt = PromptFormat("chat")
    encoded = [encode_sample(s, fmt, tokenizer, max_len) for s in train]
    held = [encode_sample(s, fmt, tokenizer, max_len) for s in heldout]
    if any(e is None for e in encoded + held):
        raise SystemExit("a benchmark row has nothing to supervise after truncation")
    train_file = workdir / f"rows-{max_len}.json"
    write_alpaca(train, train_file)
    return {
        "model": str(args.model),
        "train_file": str(train_file),
        "workdir": str(workdir),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": 2e-4,
        "max_len": max_len,
        "train_rows": [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded],
        "heldout": [{"input_ids": e.input_ids, "labels": e.labels} for e in held],
        "conversations": [conversation(s) for s in train],
        "device": args.device,
        "mean_len": statistics.mean(len(e.input_ids) for e in encoded),
    }


# ---------------------------------------------------------------------------------------------
# Running and summarising


def run_process(script: str, name: str, spec: dict, gc: bool, workdir: Path) -> dict:
    """One contender (or the memory breakdown) in a fresh process; a failure is recorded."""
    tag = f"{name}-{'gc' if gc else 'nogc'}-{spec['max_len']}"
    spec_path, result_path = workdir / f"spec-{tag}.json", workdir / f"{tag}.json"
    spec_path.write_text(json.dumps(spec | {"grad_checkpointing": gc}), encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "bench" / script), name, "--spec", str(spec_path)]
    t = time.perf_counter()
    p = subprocess.run(
        [*cmd, "--result", str(result_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        # -9 on Linux is usually the kernel's OOM killer: exactly what long rows provoke.
        why = "killed (out of memory?)" if p.returncode == -9 else p.stderr.strip()[-1500:]
        print(f"  {tag}: FAILED, exit {p.returncode}: {why[-300:]}", flush=True)
        return {"error": f"exit {p.returncode}: {why}", "wall_s": wall}
    result = json.loads(result_path.read_text())
    result["wall_s"] = wall
    return result


def summarize(runs: list[dict], warmup: int) -> dict:
    """Steady state over the repeats: steps after the first `warmup` of each run, pooled."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"], "runs": runs}
    times = [t for r in ok for t in r["step_times"][warmup:]]
    real = sum(n for r in ok for n in r["step_real_tokens"][warmup:])
    supervised = sum(n for r in ok for n in r["step_supervised_tokens"][warmup:])
    if not times:
        raise SystemExit(f"--steps must exceed --warmup-steps ({warmup}) to time anything")
    seconds = sum(times)
    return {
        "real_tokens_per_s": real / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "max_step_s": max(times),
        "timed_steps": len(times),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in ok),
        "end_train_loss": ok[0]["end_train_loss"],
        "heldout_loss": ok[0]["heldout_loss"],
        "runs": runs,
    }


def variant(name: str, gc: bool) -> str:
    return f"{name}, grad ckpt {'on' if gc else 'off'}"


def run_all(args, spec, workdir, contenders, gc_settings) -> dict:
    """Every contender × checkpointing setting, --repeats times; odd repeats run in reverse
    order, so no contender always runs first (or last) on a machine that warms up or slows."""
    order = [(name, gc) for gc in gc_settings for name in contenders]
    runs = {variant(n, gc): [] for n, gc in order}
    for r in range(args.repeats):
        for name, gc in order if r % 2 == 0 else reversed(order):
            print(f"  [{spec['max_len']}] {variant(name, gc)} (repeat {r + 1})…", flush=True)
            runs[variant(name, gc)].append(run_process("contender.py", name, spec, gc, workdir))
    return {key: summarize(rs, args.warmup_steps) for key, rs in runs.items()}


def ratios(results: dict, gc_settings) -> dict:
    """ours / other at the same checkpointing setting: like with like only."""
    out = {}
    for gc in gc_settings:
        ours = results.get(variant("ours", gc))
        for key, other in results.items():
            if not ours or key.startswith("ours") or not key.endswith(variant("", gc)):
                continue
            if "error" in ours or "error" in other:
                continue
            out[f"ours/{key}"] = {
                "real tokens/s": ours["real_tokens_per_s"] / other["real_tokens_per_s"],
                "peak memory": ours["peak_memory_mb"] / other["peak_memory_mb"],
                "held-out loss": ours["heldout_loss"] / other["heldout_loss"],
            }
    return out


def code_version() -> str:
    """This repository's commit, "+changes" when the work tree differs from it: the code measured."""

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    # What runs, not what runs write: results and the benchmark page change during `make bench`.
    code = ["lora", "bench", "train.py", ":(exclude)bench/results"]
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *code)
    return head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def versions() -> dict:
    out = {"this code": code_version(), "python": platform.python_version()}
    for package in VERSIONED:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help=f"checkpoint dir (default {REAL_MODEL})")
    src.add_argument(
        "--config", default=None, help="random-init model from ../shared/models/configs/NAME"
    )
    src.add_argument(
        "--tiny",
        action="store_true",
        help="smoke test: a 2-layer hidden-64 random Qwen2 (every code path, meaningless numbers)",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument(
        "--steps",
        type=int,
        default=16,
        help="optimizer steps per contender: one epoch over steps × batch × accumulation rows",
    )
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of timing")
    p.add_argument("--repeats", type=int, default=1, help="run every contender N times")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument(
        "--lengths",
        default=None,
        help="sequence-length scaling instead: comma-separated max lengths, rows that fill them",
    )
    p.add_argument("--grad-checkpointing", choices=["both", "off", "on"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--contenders", default=None, help=f"default {','.join(CONTENDERS)}")
    p.add_argument("--no-memory-breakdown", dest="memory_breakdown", action="store_false")
    p.add_argument("--results", default=str(ROOT / "bench/results"))
    p.add_argument(
        "--render",
        nargs="+",
        default=None,
        metavar="JSON",
        help="re-render the Markdown of results JSONs (with --docs, several scaling runs of "
        "different max lengths make one table)",
    )
    p.add_argument(
        "--docs",
        "--readme",
        dest="docs",
        action="store_true",
        help=f"also rewrite the tables of {BENCHMARK_PAGE} from the results (--readme: the old "
        "name, when they lived in README.md)",
    )
    return p.parse_args(argv)


def resolve_model(args, workdir: Path) -> None:
    if args.tiny:
        args.model = str(build_tiny_model(workdir))
    elif args.config:
        args.model = str(build_random_model(args.config, workdir))
    args.model = args.model or str(REAL_MODEL)
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(
            f"no model at {args.model}: run `PYTHON=.venv/bin/python ../shared/tools/get_real_qwen.sh` "
            f"or pass --model DIR / --config NAME / --tiny"
        )
    if not Path(args.data).is_file():
        raise SystemExit(f"no data at {args.data} (needs ../shared, or pass --data)")


def measure_main(args, workdir, gc_settings, peak) -> dict:
    train, heldout = read_rows(args)
    spec = build_spec(args, train, heldout, workdir, args.max_len)
    contenders = (args.contenders or ",".join(CONTENDERS)).split(",")
    results = run_all(args, spec, workdir, contenders, gc_settings)
    fpt = flops_per_token(args.model, spec["mean_len"])
    for r in results.values():
        if "error" not in r:
            r["utilization"] = fpt * r["real_tokens_per_s"] / peak
    memory = {}
    if args.memory_breakdown:
        for gc in gc_settings:
            print(f"  memory breakdown of {variant('ours', gc)}…", flush=True)
            memory[variant("ours", gc)] = run_process("memory.py", "ours", spec, gc, workdir)
    return {
        "kind": "main",
        "flops_per_token": fpt,
        "mean_len": spec["mean_len"],
        "rows": len(train),
        "results": results,
        "ratios": ratios(results, gc_settings),
        "memory_breakdown": memory,
    }


def measure_scaling(args, workdir, gc_settings) -> dict:
    from lora.data.prompt import PromptFormat
    from lora.model import load_tokenizer

    train, heldout = read_rows(args)
    heldout = heldout[: min(args.heldout, 4)]  # held-out forward passes at 2048 tokens are slow
    tokenizer, fmt = load_tokenizer(args.model), PromptFormat("chat")
    contenders = (args.contenders or ",".join(SCALING_CONTENDERS)).split(",")
    lengths = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        rows = long_samples(train, tokenizer, fmt, length)
        held = long_samples(heldout, tokenizer, fmt, length)
        spec = build_spec(args, rows, held, workdir, length)
        results = run_all(args, spec, workdir, contenders, gc_settings)
        lengths[str(length)] = {
            "mean_len": spec["mean_len"],
            "results": results,
            "ratios": ratios(results, gc_settings),
        }
    return {"kind": "scaling", "rows": len(train), "lengths": lengths}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        runs = [read_results(path) for path in args.render]
        if args.docs:
            check_combinable(runs, args.render)
        for path, data in zip(args.render, runs, strict=True):
            markdown = render_results(data)
            write_atomic(Path(path).with_suffix(".md"), markdown)
            print(markdown)
        if args.docs:
            update_page(ROOT / BENCHMARK_PAGE, *runs)
        return 0
    if args.tiny and args.docs:
        raise SystemExit(
            f"--tiny numbers mean nothing: they never go into {BENCHMARK_PAGE} (drop --docs)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    resolve_model(args, workdir)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    gc_settings = {"both": [False, True], "off": [False], "on": [True]}[args.grad_checkpointing]
    load_start = os.getloadavg()
    peak = matmul_peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(
        f"benchmark on {device}: {args.steps} steps ({args.warmup_steps} untimed) × batch "
        f"{args.batch_size} × accum {args.grad_accum}, matmul peak {peak / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    if args.lengths:
        measured = measure_scaling(args, workdir, gc_settings)
    else:
        measured = measure_main(args, workdir, gc_settings, peak)

    device_name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{os.cpu_count()}cores"
    ).replace(" ", "_")
    date = datetime.date.today().isoformat()
    argv_used = argv if argv is not None else sys.argv[1:]
    data = {
        "device": device_name,
        "date": date,
        "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in argv_used),
        "versions": versions(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "matmul_peak_flops": peak,
        "settings": {
            "model": Path(args.model).name,
            "tiny": args.tiny,
            "data": Path(args.data).name,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "max_len": args.max_len,
            "lengths": args.lengths,
            "seed": args.seed,
        },
        **measured,
    }
    markdown = render_results(data)
    print(markdown)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    kind = "-scaling" if args.lengths else ""
    stem = out / f"{device_name}{kind}{'-tiny' if args.tiny else ''}-{date}"
    for suffix, text in ((".json", json.dumps(data, indent=2)), (".md", markdown)):
        write_atomic(stem.with_suffix(suffix), text)
    if args.docs:
        update_page(ROOT / BENCHMARK_PAGE, data)
    print(f"written {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
