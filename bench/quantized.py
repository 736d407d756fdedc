"""QLoRA benchmark: the same LoRA run on an fp32, a bf16 and an NF4 base of a real model.

    nice python bench/quantized.py [--model DIR] [--steps 6] [--bases fp32,bf16,nf4]
    python bench/quantized.py --estimates      # docs/precision.md's GPU memory table, no model needed

Each base trains in a fresh process (`train.py`'s code path, `lora.train.loop.train`) for the same
optimizer steps on the same rows, seed and hyper-parameters (r=8, α=16, q_proj/v_proj, lr 2e-4,
batch 2 × accumulation 2, max length 256). The NF4 base computes in bf16, as QLoRA does
(`--quantize nf4 --precision bf16`: dequantized blocks, embeddings and lm_head in bf16), so its
row differs from the bf16 row by the quantization alone. Reported per base: the weights' memory (parameters,
buffers and quantization constants), peak memory (max RSS on CPU), real tokens/s, and the
token-averaged loss on the same held-out rows. For NF4 also: the NF4-trained adapter applied to
the unquantized fp32 base (held-out loss, and ‖Δlogits‖/‖logits‖ against the NF4 base).
Writes bench/results/quantized-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
REAL_MODEL = Path.home() / ".cache/qwen-real/Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_DATA = SHARED / "data/zhongjing_huatuo26m_test/huatuo26M_test.json"
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + 8-bit block scales + their fp32 scales
# Qwen2.5-14B has no config in ../shared; these are its published config.json values.
QWEN25_14B = dict(
    hidden_size=5120, num_hidden_layers=48, intermediate_size=13824, num_attention_heads=40,
    num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
)  # fmt: skip


def parameter_counts(cfg: dict) -> tuple[int, int]:
    """(decoder linear weights, everything else) of a qwen2 config: only the first is quantized."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    biases = layers * (h + 2 * kv)
    embeddings = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    norms = layers * 2 * h + h
    return linear, biases + embeddings + norms


def estimates() -> list[dict]:
    """Weight memory of bf16 and NF4 bases from parameter counts (no activations, no cache)."""
    configs = {
        name: json.loads((SHARED / "models/configs" / name / "config.json").read_text())
        for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
    } | {"qwen2.5-14b": QWEN25_14B}
    rows = []
    for name, cfg in configs.items():
        linear, other = parameter_counts(cfg)
        bf16 = 2 * (linear + other)
        nf4 = linear * NF4_BITS / 8 + 2 * other
        int8 = linear + 2 * other  # one byte per weight (+ one fp32 scale per row, negligible)
        rows.append({"model": name, "params_B": (linear + other) / 1e9, "bf16_GB": bf16 / 1e9,
                     "int8_GB": int8 / 1e9, "nf4_GB": nf4 / 1e9})  # fmt: skip
    return rows


def prepare(args, workdir: Path) -> dict:
    """Training rows and held-out rows as Alpaca JSON files, the same for every base."""
    from lora.data.records import read_dataset

    samples, _ = read_dataset(args.data)
    random.Random(0).shuffle(samples)
    n_train = args.steps * 2 * 2
    files = {}
    for name, part in (
        ("train", samples[:n_train]),
        ("heldout", samples[n_train:][: args.heldout]),
    ):
        rows = [{"instruction": s.turns[0].user, "input": s.turns[0].user_input,
                 "output": s.turns[0].assistant} for s in part]  # fmt: skip
        files[name] = workdir / f"{name}.json"
        files[name].write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {"model": str(args.model), "train": str(files["train"]),
            "heldout": str(files["heldout"]), "steps": args.steps}  # fmt: skip


def train_config(spec: dict, base: str, out: Path):
    from lora.train.config import TrainConfig

    return TrainConfig(
        model=spec["model"], data=spec["train"], output=str(out), targets="q_proj,v_proj",
        rank=8, alpha=16, dropout=0.0, lr=2e-4, warmup=0, batch_size=2, grad_accum=2,
        max_steps=spec["steps"], max_len=256, seed=0, progress=False, device="cpu",
        precision="fp32" if base == "fp32" else "bf16",
        quantize="nf4" if base == "nf4" else "none",
    )  # fmt: skip


def heldout_batches(spec: dict, tokenizer) -> list[dict]:
    from lora.data.batching import collate
    from lora.data.prompt import PromptFormat, encode_sample
    from lora.data.records import read_dataset

    samples, _ = read_dataset(spec["heldout"])
    rows = [encode_sample(s, PromptFormat("chat"), tokenizer, 256) for s in samples]
    return [collate(rows[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(rows), 4)]


def heldout_loss_and_logits(model, batches) -> tuple[float, list]:
    """Token-averaged held-out loss (the training loss's definition) and the first batch's logits."""
    import torch

    from lora.train.loss import CausalLMLoss

    loss, model = CausalLMLoss(model), model.eval()
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            loss_sum, n = loss(b["input_ids"], b["attention_mask"], b["labels"])
            total, count = total + float(loss_sum), count + n
        logits = model(input_ids=batches[0]["input_ids"]).logits
    return total / count, logits


def base_weights(spec: dict, base: str) -> dict:
    """The base's weight memory, and its decoder linear layers' share (what NF4 quantizes)."""
    import torch

    from lora.model import load_model
    from lora.quantize import is_quantized, quantization_config, weight_bytes

    # NF4 as a GPU run holds it: embeddings, norms and lm_head in bf16 beside the 4-bit linears.
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    qconfig = quantization_config("nf4", dtype) if base == "nf4" else None
    model = load_model(spec["model"], dtype, "cpu", quantization_config=qconfig)
    linears = [
        m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)
    ]
    assert base != "nf4" or all(is_quantized(m) for m in linears)
    return {"weights_MB": weight_bytes(model) / 2**20,
            "decoder_linears_MB": sum(weight_bytes(m) for m in linears) / 2**20}  # fmt: skip


def run_one(spec: dict, base: str, out: Path, write) -> None:
    """In a fresh process: the weights' memory, then train on this base and measure; `write`
    gets the record after each stage, so a run cut short still reports what it measured."""
    import torch

    from lora.adapter import load_adapter
    from lora.errors import UserError
    from lora.model import load_model, load_tokenizer
    from lora.train.loop import train

    torch.set_num_threads(os.cpu_count() or 1)
    record = {"base": base, **base_weights(spec, base)}  # smaller than training's peak below
    write(record)
    try:
        result = train(train_config(spec, base, out))
    except UserError as e:
        return write(record | {"pending": str(e)})
    record["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = result.history
    record["real_tokens_per_s"] = sum(r["real_tokens"] for r in steps) / sum(
        r["step_time_s"] for r in steps
    )
    record["train_loss_last"] = steps[-1]["loss"]
    tokenizer = load_tokenizer(spec["model"])
    batches = heldout_batches(spec, tokenizer)
    record["heldout_tokens"] = sum(int((b["labels"] != -100).sum()) for b in batches)
    write(record)
    if base != "nf4":
        model = load_model(spec["model"], torch.float32, "cpu")
        load_adapter(model, out, dropout=0.0)
        record["heldout_loss"], _ = heldout_loss_and_logits(model, batches)
        return write(record)
    from lora.quantize import quantization_config

    nf4 = load_model(spec["model"], quantization_config=quantization_config("nf4", torch.float32))
    load_adapter(nf4, out, dropout=0.0)
    record["heldout_loss"], logits_nf4 = heldout_loss_and_logits(nf4, batches)
    write(record)
    del nf4
    full = load_model(spec["model"], torch.float32, "cpu")
    load_adapter(full, out, dropout=0.0)
    record["heldout_loss_on_fp32_base"], logits_full = heldout_loss_and_logits(full, batches)
    record["logits_rel_diff_nf4_vs_fp32_base"] = float(
        (logits_nf4 - logits_full).norm() / logits_full.norm()
    )
    write(record)


def table(results: list[dict]) -> list[str]:
    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else "pending"

    lines = [
        "| base | weights MB | decoder linears MB | peak RSS MB | real tokens/s | held-out loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['base']} | {r['weights_MB']:.0f} | {r['decoder_linears_MB']:.0f} | "
            f"{f(r, 'peak_rss_MB', '.0f')} | {f(r, 'real_tokens_per_s', '.1f')} | "
            f"{f(r, 'heldout_loss', '.4f')} |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REAL_MODEL))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--heldout", type=int, default=16, help="held-out rows")
    p.add_argument("--bases", default="fp32,bf16,nf4")
    p.add_argument("--estimates", action="store_true", help="print the GPU memory estimates")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: BASE
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.estimates:
        print("| model | parameters | bf16 weights | int8 weights | NF4 weights |")
        print("|---|---:|---:|---:|---:|")
        for r in estimates():
            print(f"| {r['model']} | {r['params_B']:.2f} B | {r['bf16_GB']:.1f} GB | "
                  f"{r['int8_GB']:.1f} GB | {r['nf4_GB']:.1f} GB |")  # fmt: skip
        return 0
    if args.one:
        spec, result = json.loads(Path(args.spec).read_text()), Path(args.result)
        run_one(
            spec, args.one, result.with_suffix(".out"), lambda r: result.write_text(json.dumps(r))
        )
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(prepare(args, workdir)))
        for base in args.bases.split(","):
            result_path = workdir / f"{base}.json"
            cmd = [sys.executable, __file__, "--one", base, "--spec", str(spec_path),
                   "--result", str(result_path)]  # fmt: skip
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{base} failed:\n{done.stderr[-3000:]}")
            results.append(
                json.loads(result_path.read_text()) | {"wall_s": time.perf_counter() - t}
            )
            print(json.dumps(results[-1]), flush=True)
    save(args, results)
    return 0


def save(args, results: list[dict]) -> None:
    import torch

    bf16 = next((r for r in results if r["base"] == "bf16"), None)
    fp32 = next((r for r in results if r["base"] == "fp32"), None)
    nf4 = next((r for r in results if r["base"] == "nf4"), None)
    lines = [f"# QLoRA benchmark, {datetime.date.today()}", "",
             f"`{' '.join(shlex.quote(a) for a in sys.argv)}` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU threads (load average {os.getloadavg()[0]:.1f}: shared machine), "
             f"torch {torch.__version__}; {args.steps} steps.", "",
             *table(results), ""]  # fmt: skip
    if nf4 and bf16:
        lines.append(f"NF4 / bf16 weights: {nf4['weights_MB'] / bf16['weights_MB']:.3f} (whole model), "
                     f"{nf4['decoder_linears_MB'] / bf16['decoder_linears_MB']:.3f} (decoder linears)")  # fmt: skip
    ref = bf16 if bf16 and "heldout_loss" in bf16 else fp32
    if nf4 and "heldout_loss" in nf4 and ref and "heldout_loss" in ref:
        lines.append(f"NF4 held-out loss vs {ref['base']}: {nf4['heldout_loss'] / ref['heldout_loss'] - 1:+.2%}; "
                     f"the NF4-trained adapter on the fp32 base: {nf4['heldout_loss_on_fp32_base']:.4f}, "
                     f"‖Δlogits‖/‖logits‖ = {nf4['logits_rel_diff_nf4_vs_fp32_base']:.3f}")  # fmt: skip
    for r in results:
        if "pending" in r:
            lines.append(f"{r['base']} training: pending ({r['pending']})")
    stem = ROOT / "bench/results" / f"quantized-cpu-{os.cpu_count()}threads-{datetime.date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
