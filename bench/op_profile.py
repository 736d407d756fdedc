"""Where the time goes: torch.profiler's top ops for ours and TRL on the same rows.

    python bench/op_profile.py --lengths 512 --steps 4 --warmup-steps 1 --batch-size 1 --grad-accum 2

For a target bench/run.py misses, this says why with measurements instead of a guess. It takes
bench/run.py's flags (one max length: --lengths N for rows that fill N tokens, else --max-len
with the ordinary rows) and runs each contender (--contenders, default ours,trl) once per
--grad-checkpointing setting in a fresh process under torch.profiler (bench/contender.py
--profile). Writes bench/results/<device>-profile-<date>.{json,md} (other --contenders: their
names after "profile"): each run's top ops by self CPU time, and the same time grouped into
matrix products, attention, the loss's softmax, and the rest.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import run as bench  # noqa: E402  (bench/run.py)

GROUPS = {  # op-name fragments → what they are
    "matrix products (linear layers, lm_head)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention (SDPA)": ("scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "softmax / cross-entropy": ("softmax", "nll_loss", "cross_entropy", "logsumexp"),
}


def group_of(op: str) -> str:
    for group, fragments in GROUPS.items():
        if any(f in op for f in fragments):
            return group
    return "everything else"


def spec_for(args, workdir: Path) -> dict:
    train, heldout = bench.read_rows(args)
    if not args.lengths:
        return bench.build_spec(args, train, heldout, workdir, args.max_len)
    from lora.model import load_tokenizer
    from lora.prompt import PromptFormat

    length, fmt = int(args.lengths), PromptFormat("chat")
    tokenizer = load_tokenizer(args.model)
    rows = bench.long_samples(train, tokenizer, fmt, length)
    held = bench.long_samples(heldout[:1], tokenizer, fmt, length)
    return bench.build_spec(args, rows, held, workdir, length)


def profile_one(name: str, spec: dict, gc: bool, workdir: Path) -> dict:
    tag = f"{name}-{'gc' if gc else 'nogc'}"
    spec_path = workdir / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec | {"grad_checkpointing": gc}), encoding="utf-8")
    result, prof = workdir / f"{tag}.json", workdir / f"{tag}-profile.json"
    cmd = [sys.executable, str(ROOT / "bench/contender.py"), name, "--spec", str(spec_path)]
    p = subprocess.run([*cmd, "--result", str(result), "--profile", str(prof)],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"{tag} failed: {p.stderr.strip()[-1500:]}")
    out = json.loads(prof.read_text())
    steps = json.loads(result.read_text())
    out["real_tokens_per_s"] = sum(steps["step_real_tokens"]) / sum(steps["step_times"])
    out["self_cpu_s"] = sum(row["self_cpu_s"] for row in out["ops"])
    out["groups"] = {}
    for row in out["ops"]:
        group = group_of(row["op"])
        out["groups"][group] = out["groups"].get(group, 0.0) + row["self_cpu_s"]
    out["top"] = out.pop("ops")[:15]
    return out


def render(data: dict) -> str:
    lines = [f"## Profile, {data['device']}, {data['date']}", "", f"Command: `{data['command']}`"]
    if "versions" in data:  # profiles written before the versions were recorded have none
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items())]
    lines += [
        "",
        "Self time in seconds by kind of op (wall time of each op on the main thread, its intra-op threads included; the whole process: loading, steps, one held-out row):",
        "",
    ]
    runs = data["runs"]
    lines += ["| kind | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    kinds = [*GROUPS, "everything else"]
    for kind in kinds:
        cells = [
            f"{r['groups'].get(kind, 0):.1f} ({r['groups'].get(kind, 0) / r['self_cpu_s']:.0%})"
            for r in runs.values()
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append(
        "| total self time (s) | "
        + " | ".join(f"{r['self_cpu_s']:.1f}" for r in runs.values())
        + " |"
    )
    lines.append(
        "| of which training steps (wall s) | "
        + " | ".join(f"{r['step_s']:.1f}" for r in runs.values())
        + " |"
    )
    lines.append(
        "| real tokens/s under the profiler, all steps | "
        + " | ".join(f"{r['real_tokens_per_s']:.1f}" for r in runs.values())
        + " |"
    )
    for key, r in runs.items():
        lines += [
            "",
            f"Top ops, {key}:",
            "",
            "| op | calls | self time (s) | share |",
            "|---|---|---|---|",
        ]
        for row in r["top"]:
            lines.append(
                f"| `{row['op']}` | {row['calls']} | {row['self_cpu_s']:.2f} | {row['self_cpu_s'] / r['self_cpu_s']:.1%} |"
            )
    return "\n".join(lines) + "\n"  # fmt: skip


def main(argv=None) -> int:
    args = bench.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="lora-profile-"))
    bench.resolve_model(args, workdir)
    spec = spec_for(args, workdir)
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.grad_checkpointing]
    runs = {}
    contenders = args.contenders or "ours,trl"
    for gc in settings:
        for name in contenders.split(","):
            print(f"  profiling {bench.variant(name, gc)}…", flush=True)
            runs[bench.variant(name, gc)] = profile_one(name, spec, gc, workdir)
    device = f"cpu-{os.cpu_count()}cores"
    data = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "command": "python bench/op_profile.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": bench.versions(),
        "max_len": spec["max_len"],
        "mean_len": spec["mean_len"],
        "runs": runs,
    }
    suffix = "-tiny" if args.tiny else ""
    if contenders != "ours,trl":  # other contenders: another file, not over the TRL profile
        suffix += "-" + contenders.replace(",", "-")
    stem = Path(args.results) / f"{device}-profile{suffix}-{data['date']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    markdown = render(data)
    for suffix, text in ((".json", json.dumps(data, indent=2)), (".md", markdown)):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(stem.with_suffix(suffix))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
