"""Markdown from a benchmark results JSON (bench/run.py writes it; nothing here measures).

`render_results(data)` is the whole results file; `update_readme` puts the same tables into
README.md between its `<!-- bench:KIND:start -->` and `<!-- bench:KIND:end -->` markers, so the
README's numbers are always regenerated from a JSON, never typed by hand. `write_atomic` is how
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


def header(data: dict) -> list[str]:
    s, v = data["settings"], data["versions"]
    tiny = " **(tiny random smoke-test model: these numbers mean nothing)**" if s["tiny"] else ""
    return [
        f"Model `{s['model']}`{tiny}, rows of `{s['data']}`, {s['steps']} optimizer steps per run "
        f"(the first {s['warmup_steps']} untimed), {s['repeats']} run(s) per contender (order alternating), "
        f"batch {s['batch_size']} × accumulation {s['grad_accum']}, r=8, α=16, q/v, lr 2e-4, seed {s['seed']}. "
        f"Matmul peak measured in the same run: {data['matmul_peak_flops'] / 1e9:.0f} GFLOP/s. "
        f"Load average {data['load_average']['start'][0]:.1f} at start, {data['load_average']['end'][0]:.1f} at end.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]


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


def update_readme(readme: Path, data: dict) -> None:
    """Replace the README's block for this kind of results with tables rendered from `data`."""
    start, end = f"<!-- bench:{data['kind']}:start -->", f"<!-- bench:{data['kind']}:end -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} … {end} block to regenerate")
    body = "\n".join(
        [
            f"Latest run: {data['device']}, {data['date']}, `{data['command']}`.",
            "",
            *header(data),
            *tables(data),
        ]
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)
    write_atomic(readme, new)
