"""FSDP memory: what each process holds with one process (the whole model) and two (--shard fsdp).

    nice python bench/fsdp_memory.py                        # qwen2.5-1.5b shape, random init (slow)
    nice python bench/fsdp_memory.py --layers 2 --steps 1   # a quick smoke run of the same code
    python bench/fsdp_memory.py --estimates                 # the per-GPU table in docs/distributed.md, no model

A random-init model of the shape in ../shared/models/configs/qwen2.5-1.5b (bf16, saved once into
--work, with the real Qwen2.5 tokenizer) trains a few steps through train.py's own code (`setup`
and `train_loop`): once as a single process, once under `torchrun --nproc_per_node 2 --shard
fsdp`, on the CPU (gloo). Each process reports
    params_MB       the parameters it holds once setup is done (its shards under FSDP)
    load_peak_MB    peak resident memory up to then (loading reads the whole checkpoint: every
                    process holds the whole model for a moment, before sharding frees it)
    train_peak_MB   peak resident memory during the steps (the kernel's high-water mark, reset
                    after setup through /proc/self/clear_refs)
With 2 processes params_MB should be about half of the single process's.
Writes bench/results/fsdp-memory-<date>.{json,md} with --save.
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
SHARED = ROOT.parent / "shared"
CONFIG = SHARED / "models/configs/qwen2.5-1.5b/config.json"
TOKENIZER = SHARED / "models/qwen2.5-tokenizer"
# Published config.json values of the models docs/distributed.md's table covers (7B's is in ../shared).
QWEN25 = {
    "7B": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "14B": dict(hidden_size=5120, num_hidden_layers=48, intermediate_size=13824,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "32B": dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=27648,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "72B": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=29568,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=152064),
}  # fmt: skip


def build_model(work: Path, layers: int | None) -> Path:
    """The 1.5B shape with random bf16 weights, saved like a real checkpoint (once per shape)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIG.parent)
    if layers:
        config.num_hidden_layers = layers
        config.layer_types = config.layer_types[:layers]
    out = work / f"qwen2.5-1.5b-random-{config.num_hidden_layers}layers"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def vm_peak_kb() -> int:
    """The process's peak resident memory (VmHWM), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_vm_peak() -> None:
    """Start the high-water mark again from the current resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(args) -> None:
    """One process (of 1 or 2): setup and a few steps as train.py runs them, then its numbers."""
    import torch

    from lora.train.config import TrainConfig, check_config
    from lora.train.distributed import init_distributed, shutdown, stop_signals
    from lora.train.loop import train_loop
    from lora.train.precision import resolve_precision
    from lora.train.run import setup
    from lora.train.rundir import prepare_run_dir, run_dir_lock
    from lora.train.sharding import check_sharding

    cfg = TrainConfig(
        model=args.model, data=str(ROOT / "data/chinese_med.json"), output=args.output,
        max_steps=args.steps, batch_size=1, grad_accum=1, max_len=256, precision="bf16",
        progress=False, shard=args.shard, overwrite=True, cache=False,
    )  # fmt: skip
    check_config(cfg)
    device = torch.device("cpu")
    info = init_distributed("cpu")
    try:
        check_sharding(cfg, info)
        with run_dir_lock(Path(cfg.output), enabled=info.is_main):
            plan = prepare_run_dir(Path(cfg.output), cfg, info)
            run = setup(cfg, plan, info, device, resolve_precision("bf16", device))
            local = [
                p.to_local() if hasattr(p, "to_local") else p for p in run.forward.parameters()
            ]
            held = sum(t.numel() * t.element_size() for t in local)
            load_peak = vm_peak_kb()
            reset_vm_peak()
            with stop_signals(escalate=not info.enabled) as stop:
                train_loop(run, stop)
            result = {"rank": info.rank, "processes": info.world_size, "shard": args.shard,
                      "params_MB": held / 2**20, "load_peak_MB": load_peak / 1024,
                      "train_peak_MB": vm_peak_kb() / 1024}  # fmt: skip
        Path(f"{args.result}.{info.rank}").write_text(json.dumps(result))
    finally:
        shutdown()


def measure(model: Path, steps: int, nproc: int, tmp: Path) -> list[dict]:
    """Run the worker as 1 plain process or `nproc` under torchrun; each process's numbers."""
    shard = "fsdp" if nproc > 1 else "ddp"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = tmp / f"result-{nproc}"
    cmd = [*launcher, __file__, "--worker", "--model", str(model), "--steps", str(steps),
           "--shard", shard, "--output", str(tmp / f"out-{nproc}"), "--result", str(result)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(max(1, 2 // nproc)))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(nproc)]


def table(rows: list[dict]) -> list[str]:
    lines = ["| processes | shard | rank | parameters held | peak while loading | peak while training |",
             "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['processes']} | {r['shard'] if r['processes'] > 1 else '-'} | "
                     f"{r['rank']} | {r['params_MB']:,.0f} MB | {r['load_peak_MB']:,.0f} MB | "
                     f"{r['train_peak_MB']:,.0f} MB |")  # fmt: skip
    return lines


def per_gpu_estimate(cfg: dict, gpus: int) -> dict:
    """Bytes of bf16 weights one GPU holds under FSDP, from parameter counts.

    At rest each GPU keeps 1/N of everything. While it computes it also holds the root unit
    gathered (embeddings, lm_head, final norm: they stay whole for the step) and two decoder
    layers gathered (the one computing, the next one prefetched).
    """
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + (h + 2 * kv) + 2 * h
    root = 2 * cfg["vocab_size"] * h + h  # untied embeddings and lm_head, final norm
    total = n * layer + root
    return {"params_B": total / 1e9, "whole_GB": 2 * total / 1e9,
            "fsdp_GB": 2 * (total / gpus + root + 2 * layer) / 1e9}  # fmt: skip


def estimates() -> list[str]:
    lines = ["| model | parameters | whole model (DDP, each GPU) | FSDP, 2 GPUs | FSDP, 4 GPUs | FSDP, 8 GPUs |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, cfg in QWEN25.items():
        est = [per_gpu_estimate(cfg, g) for g in (2, 4, 8)]
        cells = " | ".join(f"{e['fsdp_GB']:.0f} GB" for e in est)
        lines.append(
            f"| Qwen2.5-{name} | {est[0]['params_B']:.1f} B | {est[0]['whole_GB']:.0f} GB | {cells} |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, help="decoder layers (default: the config's 28)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per measurement")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fsdp-memory-bench"),
                   help="where the random-init model is saved (reused by later runs)")  # fmt: skip
    p.add_argument("--save", action="store_true", help="write bench/results/fsdp-memory-<date>.*")
    p.add_argument(
        "--estimates", action="store_true", help="print the per-GPU table in docs/distributed.md"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process
    for hidden in ("--model", "--shard", "--output", "--result"):  # the worker's settings
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.estimates:
        print("\n".join(estimates()))
        return 0
    if args.worker:
        worker(args)
        return 0
    model = build_model(Path(args.work), args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(model, args.steps, 1, Path(tmp)) + measure(model, args.steps, 2, Path(tmp))
    lines = table(rows)
    single, shards = rows[0]["params_MB"], [r["params_MB"] for r in rows[1:]]
    lines.append(
        f"\nparameters held per process with 2: {max(shards) / single:.2f} × one process's"
    )
    print("\n".join(lines))
    if args.save:
        name = ROOT / "bench/results" / f"fsdp-memory-{datetime.date.today()}"
        meta = {"model": model.name, "steps": args.steps, "rows": rows}
        name.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        name.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
