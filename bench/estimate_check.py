"""Is the memory estimate right? train.py's printed total against the measured peak, on CPU.

    python bench/estimate_check.py [--model DIR] [--lengths 256,512,1024] [--batch-size 1]

For each max length, with gradient checkpointing off and on: `train.py` (the real code path) runs
one optimizer step on rows that fill that length (bench/run.py's long rows: real answers
chained), and the total its memory estimate printed (`lora/train/cost.py`, stored in
train_args.json) is compared with the process's peak RSS at the end. One step is enough: the
first window holds the longest batch, and the peak is reached there. Writes
bench/results/estimate-cpu-DATE.{md,json}; the target is |estimate − peak| <= 15% of the peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import REAL_MODEL, long_samples  # noqa: E402

TARGET = 0.15


def long_rows_file(model: str, length: int, rows: int, folder: Path) -> Path:
    """`rows` rows of at least `length` tokens as an Alpaca JSON file (train.py cuts to --max-len)."""
    from lora.data.prompt import PromptFormat
    from lora.data.records import read_dataset
    from lora.model import load_tokenizer

    samples, _ = read_dataset(ROOT / "data" / "chinese_med.json")
    tokenizer = load_tokenizer(model)
    long = long_samples(samples[:rows], tokenizer, PromptFormat("chat"), length)
    data = [{"instruction": s.turns[0].user, "input": s.turns[0].user_input,
             "output": s.turns[0].assistant} for s in long]  # fmt: skip
    path = folder / f"rows-{length}.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def measure(model: str, data: Path, length: int, checkpointing: bool, args, folder: Path) -> dict:
    """One train.py run; its estimate and its measured peak."""
    from lora.train.config import TrainConfig
    from lora.train.cost import total_bytes

    out = folder / f"out-{length}-{int(checkpointing)}"
    flags = ["--model", model, "--data", str(data), "--output", str(out), "--overwrite",
             "--max-len", str(length), "--max-steps", "1", "--batch-size", str(args.batch_size),
             "--grad-accum", "1", "--no-cache", "--no-progress",
             "--grad-checkpointing" if checkpointing else "--no-grad-checkpointing"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"train.py failed at {length} tokens:\n{done.stderr[-2000:]}")
    record = json.loads((out / "train_args.json").read_text())
    est, cfg = record["estimate"], TrainConfig(**record["args"])
    peak = record["final"]["peak_memory_bytes"]
    estimated = total_bytes(est, cfg)
    return {"length": length, "grad_checkpointing": checkpointing,
            "tokens": est["longest_batch_tokens"], "resident_mb": est["resident_bytes"] / 2**20,
            "estimate_mb": estimated / 2**20, "peak_mb": peak / 2**20,
            "error": estimated / peak - 1}  # fmt: skip


def report(results: list[dict], args) -> str:
    lines = [f"# Memory estimate against the measured peak (CPU, {Path(args.model).name})", "",
             f"`python bench/estimate_check.py --lengths {args.lengths} --batch-size "
             f"{args.batch_size}`: one optimizer step of train.py per row; target |error| <= "
             f"{TARGET:.0%}.", "",
             "| max length | grad ckpt | tokens | resident at the estimate (MB) | estimate (MB) | "
             "peak RSS (MB) | error |", "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['length']} | {'on' if r['grad_checkpointing'] else 'off'} | "
                     f"{r['tokens']} | {r['resident_mb']:,.0f} | {r['estimate_mb']:,.0f} | "
                     f"{r['peak_mb']:,.0f} | {r['error']:+.1%} |")  # fmt: skip
    met = sum(abs(r["error"]) <= TARGET for r in results)
    lines += [
        "",
        f"{met} of {len(results)} within {TARGET:.0%}. Where the estimate equals the peak,"
        " the peak was reached while loading (the estimate's `peak_so_far`), before training.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REAL_MODEL))
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in map(int, args.lengths.split(",")):
            data = long_rows_file(args.model, length, 4 * args.batch_size, Path(tmp))
            for checkpointing in (False, True):
                results.append(measure(args.model, data, length, checkpointing, args, Path(tmp)))
                print(results[-1], flush=True)
    stem = ROOT / "bench" / "results" / f"estimate-cpu-{datetime.date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report(results, args))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
