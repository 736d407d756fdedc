"""Where the time goes: torch.profiler's top ops for ours and TRL on the same rows.

    python bench/op_profile.py --lengths 512 --steps 4 --warmup-steps 1 --batch-size 1 --grad-accum 2

For a target bench/run.py misses, this says why with measurements instead of a guess. It takes
bench/run.py's flags (--lengths N,M,… for rows that fill N tokens, then M, else --max-len with
the ordinary rows) and runs each contender (--contenders, default ours,trl) once per
--grad-checkpointing setting in a fresh process under torch.profiler (bench/contender.py
--profile). Writes bench/results/<device>-profile-<date>.{json,md} (other --contenders: their
names after "profile"; with --lengths, one file per length, <device>-profile-<length>-<date>):
each run's top ops by self CPU time, the same time grouped into matrix products, attention, the
loss's softmax and the rest, and two estimates of the ceiling that puts on ours' speed-up.
`--render X.json` rewrites X.md from a saved profile.
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
from report import profile_stem  # noqa: E402

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


def spec_for(args, workdir: Path, length: str | None) -> dict:
    train, heldout = bench.read_rows(args)
    if not length:
        return bench.build_spec(args, train, heldout, workdir, args.max_len)
    from lora.data.prompt import PromptFormat
    from lora.model import load_tokenizer

    length, fmt = int(length), PromptFormat("chat")
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


UNAVOIDABLE = ("matrix products (linear layers, lm_head)", "attention (SDPA)")


def ceiling_lines(runs: dict, filled: bool) -> list[str]:
    """How fast ours could be against each other contender, from this profile alone.

    Both run the same decoder: the same matrix products and attention per position. If
    everything else ours does took no time, ours/other would be about

        (the other's total self time) / (ours' self time in those two kinds).

    When the rows fill the max length (`filled`: no padding, both compute the same positions;
    ours only skips lm_head on the prompt), a second estimate needs no second process: ours
    would need the other's own time in those two kinds, so about 1 / (the other's share of its
    time in them). Estimates, not bounds: the first compares two processes, so machine drift
    between them enters; the second assumes ours multiplies as fast as the other (same library,
    same shapes), and a process that ran at a faster moment of the machine can beat it. A
    target well above both cannot be met by cutting ours' overhead, only by doing less work.
    """
    lines = []
    for key, ours in runs.items():
        if not key.startswith("ours"):
            continue
        setting = key.removeprefix("ours")
        for other_key, other in runs.items():
            if other_key == key or not other_key.endswith(setting):
                continue
            name = other_key.removesuffix(setting)
            work, own = (sum(r["groups"].get(k, 0.0) for k in UNAVOIDABLE) for r in (ours, other))
            if not work or not own:  # nothing to compare (a run too short to record them)
                continue
            line = (
                f"- ours/{name}{setting}: measured"
                f" {ours['real_tokens_per_s'] / other['real_tokens_per_s']:.2f}× real tokens/s;"
                f" ceiling ≈ **{other['self_cpu_s'] / work:.2f}×** ({name}'s total"
                f" {other['self_cpu_s']:.1f} s / ours' products and attention {work:.1f} s)"
            )
            if filled:
                line += (
                    f"; {name} itself spent {own:.1f} s of its {other['self_cpu_s']:.1f} s"
                    f" ({own / other['self_cpu_s']:.0%}) on them: ≈ **{other['self_cpu_s'] / own:.2f}×**"
                    f" if ours ran them at {name}'s speed"
                )
            lines.append(line)
    if not lines:
        return []
    head = "Ceiling estimates, under the profiler (about what ours would reach if everything but its matrix products and attention, which the other contender runs too, took no time):"  # fmt: skip
    return ["", head, "", *lines]


def render(data: dict) -> str:
    lines = [f"## Profile, {data['device']}, {data['date']}", "", f"Command: `{data['command']}`"]
    if "max_len" in data:
        lines += ["", f"Rows: max length {data['max_len']}, mean {data['mean_len']:.0f} tokens."]
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
    filled = data.get("mean_len", 0) >= 0.95 * data.get("max_len", float("inf"))
    lines += ceiling_lines(runs, filled)
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
    if args.render:  # re-render the Markdown of saved profiles
        profiles = [bench.read_results(path) for path in args.render]
        for path, data in zip(args.render, profiles, strict=True):
            bench.write_atomic(Path(path).with_suffix(".md"), render(data))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="lora-profile-"))
    bench.resolve_model(args, workdir)
    command = "python bench/op_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for length in args.lengths.split(",") if args.lengths else [None]:
        print(render(profile_rows(args, length, workdir, command)))
    return 0


def profile_rows(args, length: str | None, workdir: Path, command: str) -> dict:
    """Every contender and setting on one set of rows; writes and returns the profile."""
    spec = spec_for(args, workdir, length)
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.grad_checkpointing]
    runs = {}
    contenders = args.contenders or "ours,trl"
    for gc in settings:
        for name in contenders.split(","):
            print(f"  profiling {bench.variant(name, gc)} at {spec['max_len']} tokens…", flush=True)
            runs[bench.variant(name, gc)] = profile_one(name, spec, gc, workdir)
    device = f"cpu-{os.cpu_count()}cores"
    data = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "versions": bench.versions(),
        "max_len": spec["max_len"],
        "mean_len": spec["mean_len"],
        "runs": runs,
    }
    name = profile_stem(device, data["date"], contenders, length and spec["max_len"], args.tiny)
    stem = Path(args.results) / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    for ext, text in ((".json", json.dumps(data, indent=2)), (".md", render(data))):
        bench.write_atomic(stem.with_suffix(ext), text)
    return data


if __name__ == "__main__":
    sys.exit(main())
