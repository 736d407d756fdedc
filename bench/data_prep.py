"""Data-preparation benchmark: rows/s, time to the first training step, peak memory, cache.

    python bench/data_prep.py [--rows 200000] [--skip-train] [--out bench/results]

Each measurement runs in a fresh process (so peak memory is its own) on the real Qwen2.5
tokenizer and the real files of ../shared:

    throughput   prepare_data (read + render + tokenize + label) on huatuo26M_test.json
                 (6,000 rows), no cache: wall seconds, rows/s, CPU seconds (workers included)
    first step   `train.py --data 样例_内科5000-6000.csv --columns prompt=ask,response=answer
                 --max-steps 1` on a tiny random model with the real vocabulary: seconds from
                 launch to the end of step 1, without and then with the cache
    memory       a synthetic set of --rows rows of ~150 tokens: peak RSS added by
                 prepare_data, and resident memory after loading it back (memory-mapped)
    TRL          the same two files through what TRL's SFTTrainer users run: the rows as
                 conversational prompt/completion records in a `datasets.Dataset`, tokenized
                 by SFTTrainer's own dataset preparation (chat template, completion mask,
                 truncation to 512) with its defaults; against ours without the cache

Results go to `<out>/data-prep-<date>.md` and `.json`. The machine's load average is recorded
with them: on a shared machine, wall-clock rates drop with the load; rows per CPU-second do not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models" / "qwen2.5-tokenizer"
HUATUO = SHARED / "data" / "zhongjing_huatuo26m_test" / "huatuo26M_test.json"
CSV = SHARED / "data" / "toyhom_cmd_im" / "样例_内科5000-6000.csv"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from report import write_atomic  # noqa: E402  (bench/report.py)


def rss_mb() -> float:
    """Resident memory now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Make the peak (VmHWM) start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """Peak resident memory since `reset_peak_rss` (ru_maxrss if /proc cannot say)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---------------------------------------------------------------------------------------------
# Children: one measurement each, printed as one JSON line


class Start:
    """Clocks and memory at the start of one measurement; `measured` reports from there."""

    def __init__(self):
        reset_peak_rss()
        self.rss, self.cpu, self.wall = rss_mb(), cpu_seconds(), time.perf_counter()

    def measured(self, rows: int, train_rows: int, tokens: int) -> dict:
        seconds, cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu
        return {
            "rows": rows,
            "train_rows": train_rows,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds),
            "cpu_seconds": round(cpu, 2),
            "rows_per_cpu_s": round(rows / max(cpu, 1e-9)),
            "rss_before_mb": round(self.rss),
            "peak_added_mb": round(peak_rss_mb() - self.rss),
            "rss_after_mb": round(rss_mb()),
        }


def child_prepare(data: str, columns: str | None, cache_dir: str | None) -> dict:
    from transformers import AutoTokenizer

    from lora.data.prepare import prepare_data
    from lora.data.prompt import PromptFormat
    from lora.train.config import TrainConfig

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    cfg = TrainConfig(
        data=data, columns=columns, cache=bool(cache_dir), cache_dir=cache_dir, progress=False
    )
    start = Start()
    train, _, summary = prepare_data(cfg, tok, PromptFormat("chat"), lambda *a: None)
    rows = summary["train_files"][0]["rows_read"]
    return start.measured(rows, len(train), int(train.lengths.sum())) | {
        # Workers are forked: their RSS counts pages shared with the parent.
        "largest_worker_rss_mb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        ),
    }


def child_tokenizer_only() -> dict:
    """The yardstick: the fast tokenizer alone batch-encoding huatuo's rendered rows (offsets
    included) on one thread. The issue's ≈2,200 rows/s was this, on an idle core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rows = json.loads(HUATUO.read_text(encoding="utf-8"))
    texts = [
        tok.apply_chat_template(
            [
                {"role": "user", "content": r["instruction"][0]},
                {"role": "assistant", "content": r["output"][0]},
            ],
            tokenize=False,
        )
        for r in rows
    ]
    cpu0, t0 = time.process_time(), time.perf_counter()
    tok(texts, return_offsets_mapping=True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {
        "rows": len(texts),
        "rows_per_cpu_s": round(len(texts) / cpu),
        "rows_per_s": round(len(texts) / wall),
    }


def trl_rows(path: Path) -> list[dict]:
    """The file's rows as TRL's conversational prompt/completion records (what a TRL user
    writes before calling SFTTrainer). huatuo holds one-element lists; the synthetic set strings."""

    def text(v):
        return v[0] if isinstance(v, list) else v

    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    else:
        rows = json.loads(path.read_text(encoding="utf-8"))
    return [
        {
            "prompt": [{"role": "user", "content": text(r["instruction"])}],
            "completion": [{"role": "assistant", "content": text(r["output"])}],
        }
        for r in rows
    ]


def child_trl(data: str) -> dict:
    """TRL's SFTTrainer dataset preparation (tokenize + completion mask + truncate) on `data`.

    The trainer is built once on a one-row set around a tiny model, so that model set-up is not
    timed; then its `_prepare_dataset` (what its constructor runs on `train_dataset`) prepares
    the whole file. Reading the file into records is timed too, as prepare_data's reading is.
    """
    import logging

    import datasets
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    datasets.disable_progress_bars()  # ours runs without a progress bar too
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model_with_real_vocab(Path(tmp) / "model")
        args = SFTConfig(
            output_dir=tmp, max_length=512, completion_only_loss=True, report_to=[], use_cpu=True
        )
        warm = Dataset.from_list(trl_rows(HUATUO)[:1])
        trainer = SFTTrainer(model=str(model), args=args, train_dataset=warm, processing_class=tok)
        start = Start()
        dataset = Dataset.from_list(trl_rows(Path(data)))
        prepared = trainer._prepare_dataset(dataset, tok, args, False, None, "train")
        tokens = int(sum(len(x) for x in prepared["input_ids"]))
        return start.measured(len(dataset), len(prepared), tokens)


def run_child(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Fixtures


def synthetic_file(path: Path, rows: int) -> Path:
    """`rows` Alpaca rows of ~150 tokens, made of real sentences from huatuo26M_test."""
    source = json.loads(HUATUO.read_text(encoding="utf-8"))
    questions = [r["instruction"][0] for r in source]
    answers = [r["output"][0][:180] for r in source]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            row = {"instruction": rng.choice(questions), "output": f"{i}。" + rng.choice(answers)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def tiny_model_with_real_vocab(out: Path) -> Path:
    """A 2-layer random Qwen2 with the real tokenizer: the step is instant, the data is real."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def time_to_first_step(model: Path, work: Path, cache_dir: Path, cache: bool) -> dict:
    """Wall and CPU seconds from launching train.py to the end of its single step."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model",
        str(model),
        "--data",
        str(CSV),
        "--columns",
        "prompt=ask,response=answer",
        "--max-steps",
        "1",
        "--batch-size",
        "1",
        "--grad-accum",
        "1",
        "--max-len",
        "256",
        "--output",
        str(work / "out"),
        "--overwrite",
        "--no-progress",
        "--cache-dir",
        str(cache_dir),
        "--cache" if cache else "--no-cache",
    ]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    subprocess.run(cmd, check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds() - cpu0, 1)}


# ---------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="rows of the synthetic memory test")
    p.add_argument("--skip-train", action="store_true", help="skip the time-to-first-step runs")
    p.add_argument("--skip-trl", action="store_true", help="skip the comparison with TRL")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        if args.child == ["tokenizer-only"]:
            print(json.dumps(child_tokenizer_only()))
            return 0
        if args.child[0] == "trl":
            print(json.dumps(child_trl(args.child[1])))
            return 0
        data, columns, cache_dir = (args.child + [None, None])[:3]
        print(json.dumps(child_prepare(data, columns or None, cache_dir or None)))
        return 0
    if not TOKENIZER.is_dir() or not HUATUO.is_file():
        print("bench/data_prep.py needs ../shared (tokenizer and data files)", file=sys.stderr)
        return 2

    results = {
        "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "command": "python bench/data_prep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "versions": versions(),
    }
    results["load_average_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["tokenizer_only_huatuo"] = run_child("tokenizer-only")
        print("tokenizer alone:", results["tokenizer_only_huatuo"], flush=True)
        results["throughput_huatuo"] = run_child(str(HUATUO), "", "")
        print("throughput:", results["throughput_huatuo"], flush=True)
        results["throughput_csv"] = run_child(str(CSV), "prompt=ask,response=answer", "")
        print("csv:", results["throughput_csv"], flush=True)
        if not args.skip_train:
            model = tiny_model_with_real_vocab(tmp / "model")
            results["first_step_s_no_cache"] = time_to_first_step(model, tmp, tmp / "c1", False)
            time_to_first_step(model, tmp, tmp / "c2", True)  # fills the cache
            results["first_step_s_cached"] = time_to_first_step(model, tmp, tmp / "c2", True)
            print("first step:", results["first_step_s_no_cache"], results["first_step_s_cached"])
        synthetic = synthetic_file(tmp / "synthetic.jsonl", args.rows)
        cache = str(tmp / "c3")
        results["memory_synthetic_build"] = run_child(str(synthetic), "", cache)
        print("memory (build + cache write):", results["memory_synthetic_build"], flush=True)
        results["memory_synthetic_cached"] = run_child(str(synthetic), "", cache)
        print("memory (load from cache):", results["memory_synthetic_cached"], flush=True)
        if not args.skip_trl:
            results["trl_huatuo"] = run_child("trl", str(HUATUO))
            print("TRL, huatuo:", results["trl_huatuo"], flush=True)
            results["ours_synthetic_no_cache"] = run_child(str(synthetic), "", "")
            print("ours, synthetic, no cache:", results["ours_synthetic_no_cache"], flush=True)
            results["trl_synthetic"] = run_child("trl", str(synthetic))
            print("TRL, synthetic:", results["trl_synthetic"], flush=True)
    results["load_average_at_end"] = os.getloadavg()
    write_results(results, Path(args.out))
    return 0


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"data-prep-{results['date']}"
    write_atomic(stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    h, c = results["throughput_huatuo"], results["throughput_csv"]
    k = results["tokenizer_only_huatuo"]
    b, m = results["memory_synthetic_build"], results["memory_synthetic_cached"]
    lines = [
        f"# Data preparation, {results['date']} ({results['cpus']} CPUs, load average "
        f"{results['load_average_at_start'][0]:.1f} at start, {results['load_average_at_end'][0]:.1f} at end)",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| yardstick: the fast tokenizer alone, one thread, huatuo's {k['rows']} rendered rows | "
        f"{k['rows_per_s']} rows/s, {k['rows_per_cpu_s']} rows per CPU-second |",
        f"| huatuo26M_test.json, {h['rows']} rows, no cache: read + render + tokenize + label | {h['seconds']} s, "
        f"**{h['rows_per_s']} rows/s**, {h['rows_per_cpu_s']} rows per CPU-second |",
        f"| 样例_内科5000-6000.csv, {c['rows']} rows, no cache | {c['seconds']} s, {c['rows_per_s']} rows/s |",
    ]
    if "first_step_s_no_cache" in results:
        lines += [
            f"| CSV: train.py launch to end of step 1, no cache | {results['first_step_s_no_cache']['wall_s']} s "
            f"({results['first_step_s_no_cache']['cpu_s']} CPU-s) |",
            f"| CSV: the same, cached | {results['first_step_s_cached']['wall_s']} s "
            f"({results['first_step_s_cached']['cpu_s']} CPU-s) |",
        ]
    lines += [
        f"| synthetic {b['rows']} rows, {b['tokens'] / b['train_rows']:.0f} tokens/row: peak RSS added by preparing | "
        f"{b['peak_added_mb']} MB ({b['seconds']} s, {b['rows_per_s']} rows/s) |",
        f"| the same, loaded from the cache (memory-mapped): peak RSS added | {m['peak_added_mb']} MB ({m['seconds']} s) |",
    ]
    lines += trl_lines(results)
    lines += [
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()) + ".",
        "",
        f"Command: `{results.get('command', 'python bench/data_prep.py')}`",
    ]
    write_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def trl_lines(results: dict) -> list[str]:
    """Ours vs TRL's SFTTrainer dataset preparation, both without a cache."""
    if "trl_huatuo" not in results:
        return []
    pairs = [
        ("huatuo26M_test.json", results["throughput_huatuo"], results["trl_huatuo"]),
        (
            f"synthetic {results['trl_synthetic']['rows']} rows",
            results["ours_synthetic_no_cache"],
            results["trl_synthetic"],
        ),
    ]
    lines = [
        "",
        "Ours (`prepare_data`, no cache) vs TRL's `SFTTrainer` dataset preparation (prompt/completion "
        "conversations, completion_only_loss, max_length 512, its defaults):",
        "",
        "| rows | ours rows/s | TRL rows/s | ours/TRL | ours rows per CPU-s | TRL rows per CPU-s | ours peak RSS added (MB) | TRL peak RSS added (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, o, t in pairs:
        lines.append(
            f"| {name} | {o['rows_per_s']} | {t['rows_per_s']} | {o['rows_per_s'] / t['rows_per_s']:.2f}× | "
            f"{o['rows_per_cpu_s']} | {t['rows_per_cpu_s']} | {o['peak_added_mb']} | {t['peak_added_mb']} |"
        )
    return lines


def versions() -> dict:
    """bench/run.py's: the commit measured and the libraries (imported here, in the parent only:
    it imports torch, which the measured child processes must not carry)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    return run.versions()


if __name__ == "__main__":
    sys.exit(main())
