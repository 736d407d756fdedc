"""Markdown from a benchmark results JSON (bench/run.py writes it; nothing here measures).

`render_results(data)` is the whole results file: tables, ratios (ours / each other contender at
the same checkpointing setting), and each ratio held to its target in `TARGETS`, a missed speed
target pointing at the profile that says why. `update_page` puts the same tables into the
benchmark page (docs/benchmark.md; bench/run.py --docs) between its `<!-- bench:KIND:start -->`
and `<!-- bench:KIND:end -->` markers, so the page's numbers are always regenerated from a JSON,
never typed by hand: from one run, or for the scaling table from several runs of different max
lengths (a long run split in two).
`write_atomic` is how every bench script writes a file, `read_results` how each `--render` reads
one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def contender_table(results: dict, utilization: bool = True) -> list[str]:
    head = "| contender | real tokens/s | supervised tokens/s | median step (s) | step min–max (s) | peak memory (MB) | train loss at end | held-out loss |"
    lines = [
        head + (" utilization |" if utilization else ""),
        "|---" * (8 + utilization) + "|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        row = (
            f"| {name} | {r['real_tokens_per_s']:.1f} | {r['supervised_tokens_per_s']:.1f} | "
            f"{r['median_step_s']:.2f} | {r['min_step_s']:.2f}–{r['max_step_s']:.2f} | "
            f"{r['peak_memory_mb']:.0f} | {_fmt(r['end_train_loss'], '.4f')} | {r['heldout_loss']:.4f} |"
        )
        if utilization:
            row += f" {100 * r.get('utilization', 0):.1f}% |"
        lines.append(row)
    return lines


def ratio_lines(ratios: dict) -> list[str]:
    return [
        f"- {key}: real tokens/s **{r['real tokens/s']:.2f}×**, peak memory **{r['peak memory']:.2f}×**, "
        f"held-out loss {r['held-out loss']:.3f}×"
        for key, r in ratios.items()
    ]


# What ours should reach against each contender, at the same checkpointing setting (issue:
# benchmark round 2, on the 2-core CPU): real tokens/s at least, peak memory at most.
TARGETS = {
    "trl": {"real tokens/s": 1.5, "peak memory": 0.85},
    "peft-trainer": {"real tokens/s": 1.3},
    "tutorial": {"real tokens/s": 4.0},
}
HELDOUT_TOLERANCE = 0.02  # held-out loss within 2% of the other's: the same learning


def missed_targets(other: str, ratio: dict) -> list[str]:
    """What `ratio` (ours/`other`) misses of `other`'s targets, e.g. 'real tokens/s 1.15× < 1.5×'."""
    target = TARGETS.get(other, {})
    missed = []
    if ratio["real tokens/s"] < target.get("real tokens/s", 0):
        missed.append(f"real tokens/s {ratio['real tokens/s']:.2f}× < {target['real tokens/s']:g}×")
    if ratio["peak memory"] > target.get("peak memory", float("inf")):
        missed.append(f"peak memory {ratio['peak memory']:.2f}× > {target['peak memory']:g}×")
    if abs(ratio["held-out loss"] - 1) > HELDOUT_TOLERANCE:
        missed.append(f"held-out loss {ratio['held-out loss']:.3f}× (not within 2%)")
    return missed


def profile_stem(device: str, date: str, contenders: str, length=None, tiny=False) -> str:
    """The name bench/op_profile.py gives a profile: ours vs TRL on the main rows is
    <device>-profile-<date>; other contenders, a max length, the tiny model each add a part."""
    parts = ["-tiny"] if tiny else []
    if contenders != "ours,trl":  # another file, not over the TRL profile
        parts.append("-" + contenders.replace(",", "-"))
    if length:  # --lengths: one file per max length
        parts.append(f"-{length}")
    return f"{device}-profile{''.join(parts)}-{date}"


def profile_pointer(device: str, date: str, other: str, length, gc: str) -> str:
    """The op_profile command for ours vs `other`, and the file it writes on that day."""
    contenders = "ours,trl" if other == "trl" else f"ours,{other}"
    flags = "" if other == "trl" else f" --contenders {contenders}"
    flags += (f" --lengths {length}" if length else "") + f" --grad-checkpointing {gc}"
    path = f"bench/results/{profile_stem(device, date, contenders, length)}.md"
    return f"`python bench/op_profile.py{flags}` (with this run's other flags) → `{path}`"


def target_lines(device: str, scopes: dict[str | None, tuple[str, dict]]) -> list[str]:
    """Each ratio against its target; for a speed target missed, the profile that says why.

    `scopes` maps a max length (None for the main table) to (date of its run, its ratios).
    """
    wanted = ", ".join(
        f"ours/{other} ≥ {t['real tokens/s']:g}× real tokens/s"
        + (f" at ≤ {t['peak memory']:g}× peak memory" if "peak memory" in t else "")
        for other, t in TARGETS.items()
    )
    total, misses = 0, {}  # (other, length, date) -> {checkpointing setting: what it missed}
    for length, (date, ratios) in scopes.items():
        for key, ratio in ratios.items():  # "ours/trl, grad ckpt off"
            total += 1
            other, setting = key.removeprefix("ours/").split(", grad ckpt ")
            if missed := missed_targets(other, ratio):
                misses.setdefault((other, length, date), {})[setting] = missed
    n_missed = sum(len(v) for v in misses.values())
    lines = [
        f"Against the targets ({wanted}; held-out loss within 2% of each, at the same "
        f"checkpointing setting): {total - n_missed} of {total} ratios meet their targets.",
        "",
    ]
    if not misses:
        return lines
    lines += ["Missed (for speed, the profile that says why: torch.profiler's top ops, and the "
              "ceiling they put on ours' lead):", ""]  # fmt: skip
    for (other, length, date), by_setting in misses.items():
        at = f"max length {length}, " if length else ""
        what = "; ".join(f"grad ckpt {gc}: {'; '.join(m)}" for gc, m in by_setting.items())
        slow = [gc for gc, m in by_setting.items() if any(x.startswith("real tok") for x in m)]
        why = ""
        if slow:
            gc = "both" if len(slow) > 1 else slow[0]
            why = ": " + profile_pointer(device, date, other, length, gc)
        lines.append(f"- {at}ours/{other}, {what}{why}")
    return lines + [""]


def targets(data: dict, scopes: dict) -> list[str]:
    """`target_lines` for a real model's run; a tiny smoke-test model's ratios mean nothing."""
    return [] if data["settings"]["tiny"] else target_lines(data["device"], scopes)


MEMORY_PHASES = [
    ("baseline_mb", "process before loading (Python, torch, transformers)"),
    ("weights_param_bytes_mb", "parameters' own bytes (numel × element size), for comparison"),
    ("weights_mb", "base weights as loaded (RSS after load − before)"),
    ("load_transient_mb", "extra peak while loading (conversion copies), freed after"),
    ("lora_mb", "LoRA A/B added"),
    ("vocab_narrow_mb", "embedding and lm_head back to the checkpoint's bf16 (vocab_storage.py)"),
    ("activations_mb", "decoder activations kept for backward (first micro-batch)"),
    ("loss_peak_mb", "extra peak inside the chunked loss"),
    ("backward_peak_mb", "extra peak during backward over what the forward held"),
    ("after_backward_mb", "RSS after backward − after LoRA (gradients + allocator caching)"),
    ("optimizer_mb", "AdamW state, first step"),
    ("steady_peak_mb", "peak RSS over two full optimizer steps"),
    ("unexplained_mb", "peak − (baseline + weights + LoRA ± vocab + activations + loss + AdamW)"),
]


def memory_lines(memory: dict) -> list[str]:
    if not memory:
        return []
    names = list(memory)
    lines = [
        "### Memory breakdown of ours (RSS, MB; bench/memory.py)",
        "",
        "| phase | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for key, what in MEMORY_PHASES:
        cells = [
            "failed" if "error" in memory[n] else _fmt(memory[n].get(key), ".0f") for n in names
        ]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    notes = {n: memory[n].get("notes") for n in names if memory[n].get("notes")}
    for n, text in notes.items():
        lines += ["", f"{n}: {text}"]
    return lines + [""]


def settings_line(data: dict) -> str:
    s = data["settings"]
    tiny = " **(tiny random smoke-test model: these numbers mean nothing)**" if s["tiny"] else ""
    return (
        f"Model `{s['model']}`{tiny}, rows of `{s['data']}`, {s['steps']} optimizer steps per run "
        f"(the first {s['warmup_steps']} untimed), {s['repeats']} run(s) per contender (order alternating), "
        f"batch {s['batch_size']} × accumulation {s['grad_accum']}, r=8, α=16, q/v, lr 2e-4, seed {s['seed']}."
    )


def machine_line(data: dict) -> str:
    load = data["load_average"]
    return (
        f"Matmul peak measured in the same run: {data['matmul_peak_flops'] / 1e9:.0f} GFLOP/s. "
        f"Load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end."
    )


def versions_line(data: dict) -> str:
    return "Versions: " + ", ".join(f"{k} {val}" for k, val in data["versions"].items()) + "."


def header(data: dict) -> list[str]:
    return [f"{settings_line(data)} {machine_line(data)}", "", versions_line(data), ""]


def render_main(data: dict) -> list[str]:
    s = data["settings"]
    return [
        f"Max length {s['max_len']}, {data['rows']} rows (one epoch; mean {data['mean_len']:.0f} tokens).",
        "",
        *contender_table(data["results"]),
        "",
        *(
            [
                "Ratios (same gradient-checkpointing setting only):",
                "",
                *ratio_lines(data["ratios"]),
                "",
                *targets(data, {None: (data["date"], data["ratios"])}),
            ]
            if data["ratios"]
            else []
        ),
        *memory_lines(data.get("memory_breakdown", {})),
    ]


def render_scaling(data: dict) -> list[str]:
    lines = [
        "Sequence-length scaling: every row is a real question whose answer is followed by the next "
        "rows' answers until it fills the max length.",
        "",
        "| max length | contender | real tokens/s | median step (s) | step min–max (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for length, block in data["lengths"].items():
        for name, r in block["results"].items():
            if "error" in r:
                lines.append(
                    f"| {length} | {name} | failed: {r['error'].splitlines()[-1][:60]} | | | |"
                )
                continue
            lines.append(
                f"| {length} | {name} | {r['real_tokens_per_s']:.1f} | {r['median_step_s']:.2f} | "
                f"{r['min_step_s']:.2f}–{r['max_step_s']:.2f} | {r['peak_memory_mb']:.0f} |"
            )
    lines += ["", "Ratios (same max length, same gradient-checkpointing setting):", ""]
    for length, block in data["lengths"].items():
        lines += [f"- max length {length}:", *["  " + x for x in ratio_lines(block["ratios"])]]
    scopes = {
        length: (block.get("date", data.get("date")), block["ratios"])
        for length, block in data["lengths"].items()
    }
    return [*lines, "", *targets(data, scopes)]


def tables(data: dict) -> list[str]:
    return render_scaling(data) if data["kind"] == "scaling" else render_main(data)


def render_results(data: dict) -> str:
    title = "Sequence-length scaling" if data["kind"] == "scaling" else "Benchmark"
    lines = [
        f"## {title}, {data['device']}, {data['date']}",
        "",
        *header(data),
        *tables(data),
        f"Command: `{data['command']}`",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """A temporary name first, then rename: an interrupted run leaves no half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_results(path: str) -> dict:
    """A saved results JSON (for --render), or a one-line error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read results {path}: {e}") from None


# Settings that must agree for two scaling runs' rows to share one table.
SHARED_SETTINGS = ("model", "tiny", "data", "steps", "warmup_steps", "repeats", "batch_size",
                   "grad_accum", "seed")  # fmt: skip


def check_combinable(runs: list[dict], names: list[str]) -> None:
    """Several results go into one page block only as scaling runs of different max lengths,
    on the same device with the same settings: one table, each ratio still within one run."""
    if len(runs) < 2:
        return
    for data, name in zip(runs, names, strict=True):
        if data["kind"] != "scaling":
            raise SystemExit(f"error: only scaling runs combine into one table; {name} is not one")
    first, first_name = runs[0], names[0]
    seen = {}
    for data, name in zip(runs, names, strict=True):
        if data["device"] != first["device"]:
            raise SystemExit(
                f"error: {first_name} and {name} ran on different devices "
                f"({first['device']} vs {data['device']}): their rows do not share a table"
            )
        for key in SHARED_SETTINGS:
            a, b = first["settings"][key], data["settings"][key]
            if a != b:
                raise SystemExit(
                    f"error: {first_name} and {name} differ in {key} ({a} vs {b}): "
                    "their rows do not share a table"
                )
        for length in data["lengths"]:
            if length in seen:
                raise SystemExit(f"error: max length {length} is in both {seen[length]} and {name}")
            seen[length] = name


def combined_scaling(runs: list[dict]) -> list[str]:
    """One scaling table from runs of different max lengths, each run's machine named."""
    runs = sorted(runs, key=lambda data: min(int(length) for length in data["lengths"]))
    lines = [
        f"Latest runs: {len(runs)} on {runs[0]['device']}, split by max length; every ratio below "
        "compares the contenders of one run.",
        "",
    ]
    for data in runs:
        lengths = ", ".join(data["lengths"])
        lines.append(
            f"- Max length {lengths}: {data['date']}, `{data['command']}`. {machine_line(data)} "
            f"{versions_line(data)}"
        )
    blocks = {  # each length's block knows its run's date, for the profile file's name
        length: block | {"date": data["date"]}
        for data in runs
        for length, block in data["lengths"].items()
    }
    merged = {
        "device": runs[0]["device"],
        "settings": runs[0]["settings"],
        "lengths": dict(sorted(blocks.items(), key=lambda item: int(item[0]))),
    }
    return [*lines, "", settings_line(runs[0]), "", *render_scaling(merged)]


def block_body(runs: list[dict]) -> str:
    if len(runs) > 1:
        return "\n".join(combined_scaling(runs))
    data = runs[0]
    return "\n".join(
        [
            f"Latest run: {data['device']}, {data['date']}, `{data['command']}`.",
            "",
            *header(data),
            *tables(data),
        ]
    )


def update_page(page: Path, *runs: dict) -> None:
    """Replace the page's block for this kind of results (docs/benchmark.md's
    `<!-- bench:KIND:start -->` … `<!-- bench:KIND:end -->`) with tables rendered from `runs`
    (one results JSON, or scaling runs of different lengths that `check_combinable` passed).
    Everything outside the block is left as it was."""
    kind = runs[0]["kind"]
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    text = page.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} … {end} block to regenerate")
    body = block_body(list(runs))
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)
    write_atomic(page, new)
