"""Markdown from a benchmark results JSON (bench/run.py writes it; nothing here measures).

`render_results(data)` is the whole results file; `update_readme` puts the same tables into
README.md between its `<!-- bench:KIND:start -->` and `<!-- bench:KIND:end -->` markers, so the
README's numbers are always regenerated from a JSON, never typed by hand: from one run, or for
the scaling table from several runs of different max lengths (a long run split in two). `write_atomic` is how
every bench script writes a file, `read_results` how each `--render` reads one.
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
    lengths = ",".join(data["lengths"])
    return lines + [
        "",
        f"Where a ratio misses its target, `python bench/op_profile.py --lengths {lengths}"
        " --grad-checkpointing both` (with this run's other flags) profiles both contenders on"
        f" the same rows (`bench/results/{data['device']}-profile-<length>-<date>.md`), with"
        " the ceiling that the matrix products and attention both run put on ours' lead.",
        "",
    ]


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
    """Several results go into one README block only as scaling runs of different max lengths,
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
    blocks = {length: block for data in runs for length, block in data["lengths"].items()}
    merged = {
        "device": runs[0]["device"],
        "lengths": dict(sorted(blocks.items(), key=lambda item: int(item[0]))),
    }
    return [*lines, "", settings_line(runs[0]), "", *render_scaling(merged)]


def readme_body(runs: list[dict]) -> str:
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


def update_readme(readme: Path, *runs: dict) -> None:
    """Replace the README's block for this kind of results with tables rendered from `runs`
    (one results JSON, or scaling runs of different lengths that `check_combinable` passed)."""
    kind = runs[0]["kind"]
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} … {end} block to regenerate")
    body = readme_body(list(runs))
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)
    write_atomic(readme, new)
