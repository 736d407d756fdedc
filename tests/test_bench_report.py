"""The benchmark's arithmetic and reports: steady-state timing, like-with-like ratios, and the
tables of docs/benchmark.md regenerated from a results JSON, the README's summary held to them
(bench/run.py, bench/report.py; nothing timed)."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run  # noqa: E402


def one_run(times, real, supervised, peak=100.0, loss=2.0):
    return {
        "step_times": times,
        "step_real_tokens": real,
        "step_supervised_tokens": supervised,
        "peak_memory_mb": peak,
        "end_train_loss": loss,
        "heldout_loss": loss,
    }


def test_summary_leaves_out_each_runs_warmup_steps_and_pools_the_repeats():
    runs = [
        one_run([50.0, 9.0, 2.0, 4.0], [1, 1, 10, 30], [0, 0, 5, 15], peak=100),
        one_run([70.0, 8.0, 3.0, 1.0], [1, 1, 20, 20], [0, 0, 10, 10], peak=120),
    ]
    s = run.summarize(runs, warmup=2)
    assert s["timed_steps"] == 4
    assert s["real_tokens_per_s"] == pytest.approx(80 / 10)
    assert s["supervised_tokens_per_s"] == pytest.approx(40 / 10)
    assert (s["median_step_s"], s["min_step_s"], s["max_step_s"]) == (2.5, 1.0, 4.0)
    assert s["peak_memory_mb"] == 120


def test_a_failed_run_is_reported_not_averaged_in():
    failed = {"error": "exit -9: killed (out of memory?)", "wall_s": 1.0}
    assert "error" in run.summarize([failed], warmup=2)
    s = run.summarize([failed, one_run([5.0, 1.0], [1, 4], [1, 2])], warmup=1)
    assert s["real_tokens_per_s"] == 4.0


def summary(tps, peak, loss):
    return {"real_tokens_per_s": tps, "peak_memory_mb": peak, "heldout_loss": loss}


def test_ratios_compare_only_runs_with_the_same_gradient_checkpointing():
    results = {
        run.variant("ours", False): summary(90.0, 700.0, 2.0),
        run.variant("trl", False): summary(45.0, 1000.0, 2.0),
        run.variant("ours", True): summary(60.0, 400.0, 2.0),
        run.variant("trl", True): summary(30.0, 500.0, 2.0),
    }
    r = run.ratios(results, [False, True])
    assert set(r) == {"ours/trl, grad ckpt off", "ours/trl, grad ckpt on"}
    assert r["ours/trl, grad ckpt off"]["real tokens/s"] == pytest.approx(2.0)
    assert r["ours/trl, grad ckpt on"]["peak memory"] == pytest.approx(0.8)


def results_json():
    results = {
        run.variant("ours", False): summary(90.0, 700.0, 2.0)
        | {"supervised_tokens_per_s": 40.0, "median_step_s": 11.0, "min_step_s": 10.0}
        | {"max_step_s": 12.5, "end_train_loss": 2.1, "utilization": 0.5},
    }
    return {
        "kind": "main",
        "device": "cpu-2cores",
        "date": "2026-12-06",
        "command": "python bench/run.py --steps 16",
        "versions": {"torch": "2.13.0", "trl": "1.16.0"},
        "load_average": {"start": [0.5, 0, 0], "end": [0.7, 0, 0]},
        "matmul_peak_flops": 1.8e11,
        "settings": {
            "model": "m", "tiny": False, "data": "d.json", "steps": 16, "warmup_steps": 2,
            "repeats": 1, "batch_size": 4, "grad_accum": 2, "max_len": 512, "seed": 0,
        },
        "rows": 128,
        "mean_len": 126.0,
        "results": results,
        "ratios": {},
        "memory_breakdown": {},
    }  # fmt: skip


def test_the_results_file_names_the_command_the_versions_and_the_setting():
    text = report.render_results(results_json())
    assert "`python bench/run.py --steps 16`" in text
    assert "trl 1.16.0" in text
    assert "| ours, grad ckpt off | 90.0 | 40.0 | 11.00 | 10.00–12.50 | 700 |" in text


def test_the_versions_name_the_commit_that_was_measured():
    import subprocess

    head = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)  # fmt: skip
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    measured = run.versions()["this code"]
    assert measured in (head.stdout.strip(), head.stdout.strip() + "+changes")


def test_the_profile_and_data_preparation_results_carry_the_same_versions():
    import data_prep
    import op_profile

    assert data_prep.versions().keys() == run.versions().keys()
    profile = {"device": "cpu-2cores", "date": "2026-12-06", "command": "python bench/op_profile.py",
               "versions": {"this code": "abc1234", "torch": "2.13.0"}, "runs": {}}  # fmt: skip
    assert "Versions: this code abc1234, torch 2.13.0" in op_profile.render(profile)


def test_the_profile_estimates_ours_ceiling_from_the_work_both_contenders_do():
    import op_profile

    def run(matmul, attention, rest, tokens_per_s):
        groups = {"matrix products (linear layers, lm_head)": matmul, "attention (SDPA)": attention,
                  "everything else": rest}  # fmt: skip
        return {"groups": groups, "self_cpu_s": matmul + attention + rest, "step_s": 1.0,
                "real_tokens_per_s": tokens_per_s, "top": []}  # fmt: skip

    runs = {"ours, grad ckpt off": run(36.0, 4.0, 5.0, 72.0),
            "trl, grad ckpt off": run(40.0, 4.0, 16.0, 54.0),
            "ours, grad ckpt on": run(50.0, 5.0, 5.0, 60.0),
            "trl, grad ckpt on": run(52.0, 5.0, 9.0, 50.0)}  # fmt: skip
    lines = op_profile.ceiling_lines(runs, filled=True)
    # TRL's 60 s against ours' 40 s of matrix products and attention: 1.5x at best; TRL itself
    # spent 44 of its 60 s on them: 1.36x at TRL's speed. With checkpointing 66 / 55 = 1.2x and
    # 66 / 57 = 1.16x. Settings are never mixed.
    off = [line for line in lines if "grad ckpt off" in line]
    on = [line for line in lines if "grad ckpt on" in line]
    assert len(off) == len(on) == 1
    assert "measured 1.33×" in off[0] and "ceiling ≈ **1.50×**" in off[0]
    assert "≈ **1.36×** if ours ran them at trl's speed" in off[0]
    assert "measured 1.20×" in on[0] and "ceiling ≈ **1.20×**" in on[0]
    assert "≈ **1.16×** if ours ran them at trl's speed" in on[0]
    # Rows that do not fill the max length are padded differently by each contender: the
    # other's own share says nothing about ours' work then.
    assert "trl itself" not in "".join(op_profile.ceiling_lines(runs, filled=False))
    # A run too short to record any matrix product gives no estimate rather than a crash.
    idle = {
        "ours, grad ckpt off": run(0.0, 0.0, 1.0, 1.0),
        "trl, grad ckpt off": run(0.0, 0.0, 1.0, 1.0),
    }
    assert op_profile.ceiling_lines(idle, filled=True) == []


def test_render_of_a_missing_or_broken_results_file_is_a_one_line_error(tmp_path):
    import op_profile

    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    for main in (run.main, op_profile.main):
        for path in (tmp_path / "missing.json", broken):
            with pytest.raises(SystemExit, match=f"cannot read results {path}"):
                main(["--render", str(path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]  # nothing written


def test_the_page_block_is_regenerated_from_the_json_and_nothing_else_changes(tmp_path):
    page = tmp_path / "benchmark.md"
    page.write_text("before\n<!-- bench:main:start -->\nold 64.8\n<!-- bench:main:end -->\nafter\n")
    report.update_page(page, results_json())
    text = page.read_text()
    assert text.startswith("before\n<!-- bench:main:start -->\nLatest run: cpu-2cores")
    assert "old 64.8" not in text and "| ours, grad ckpt off | 90.0 |" in text
    assert text.endswith("<!-- bench:main:end -->\nafter\n")


def test_a_page_without_the_markers_is_a_clear_error(tmp_path):
    page = tmp_path / "benchmark.md"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench:main:start -->"):
        report.update_page(page, results_json())
    assert page.read_text() == "no markers\n"


def fake_checkout(tmp_path, monkeypatch):
    """A README and a benchmark page, both with a main block, under a stand-in for the repo."""
    monkeypatch.setattr(run, "ROOT", tmp_path)
    block = "<!-- bench:main:start -->\nold 64.8\n<!-- bench:main:end -->\n"
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/benchmark.md"):
        (tmp_path / name).write_text(f"# {name}\n{block}", encoding="utf-8")
    results = tmp_path / "main.json"
    results.write_text(json.dumps(results_json()), encoding="utf-8")
    return results


@pytest.mark.parametrize("flag", ["--docs", "--readme"])
def test_docs_flag_rewrites_the_benchmark_page_and_never_the_readme(tmp_path, monkeypatch, flag):
    results = fake_checkout(tmp_path, monkeypatch)
    readme_before = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert run.main(["--render", str(results), flag]) == 0
    page = (tmp_path / "docs/benchmark.md").read_text(encoding="utf-8")
    assert "old 64.8" not in page and "| ours, grad ckpt off | 90.0 |" in page
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == readme_before


def test_without_the_docs_flag_the_benchmark_page_is_left_alone(tmp_path, monkeypatch):
    results = fake_checkout(tmp_path, monkeypatch)
    assert run.main(["--render", str(results)]) == 0
    assert "old 64.8" in (tmp_path / "docs/benchmark.md").read_text(encoding="utf-8")
    assert (tmp_path / "main.md").is_file()  # the results' own Markdown is still rendered


def test_the_benchmark_blocks_live_on_the_benchmark_page_not_in_the_readme():
    page = (ROOT / run.BENCHMARK_PAGE).read_text(encoding="utf-8")
    for kind in ("main", "scaling"):
        assert f"<!-- bench:{kind}:start -->" in page and f"<!-- bench:{kind}:end -->" in page
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- bench:" not in readme
    assert "(docs/benchmark.md)" in readme  # the README's short table links to the page


def generated_ratios(page: str) -> dict:
    """{(contender, "off"/"on"): (tokens/s, peak memory, held-out loss)} from the main block."""
    block = page.split("<!-- bench:main:start -->")[1].split("<!-- bench:main:end -->")[0]
    pattern = (r"^- ours/([\w-]+), grad ckpt (off|on): real tokens/s \*\*([\d.]+)×\*\*, "
               r"peak memory \*\*([\d.]+)×\*\*, held-out loss ([\d.]+)×$")  # fmt: skip
    return {(m[1], m[2]): m.group(3, 4, 5) for m in re.finditer(pattern, block, re.M)}


def test_the_readmes_short_benchmark_table_repeats_the_generated_numbers():
    generated = generated_ratios((ROOT / run.BENCHMARK_PAGE).read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Benchmark\n")[1].split("\n## ")[0]
    names = {"TRL": "trl", "peft": "peft-trainer", "tutorial": "tutorial"}
    seen = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        label = [key for word, key in names.items() if word in cells[0]]
        if not line.startswith("|") or not label:
            continue
        # Each figure cell is "off / on", as bold or plain ratios.
        columns = [c.replace("*", "").replace("×", "").split(" / ") for c in cells[1:4]]
        for i, setting in enumerate(("off", "on")):
            key = (label[0], setting)
            assert key in generated, f"README names {key}, the generated table does not"
            assert tuple(col[i] for col in columns) == generated[key], key
            seen.add(key)
    assert seen == set(generated), set(generated) - seen


def scaling_json(lengths, command, peak=2.0e11, steps=16):
    data = results_json()
    block = {
        "rows": 8,
        "mean_len": 250.0,
        "results": {
            run.variant("ours", False): summary(70.0, 3000.0, 2.0)
            | {"median_step_s": 7.0, "min_step_s": 6.0, "max_step_s": 8.0},
        },
        "ratios": {"ours/trl, grad ckpt off": {"real tokens/s": 1.25, "peak memory": 0.8,
                                               "held-out loss": 1.0}},
    }  # fmt: skip
    data |= {"kind": "scaling", "command": command, "matmul_peak_flops": peak}
    data["settings"] = data["settings"] | {"steps": steps, "batch_size": 1, "lengths": lengths}
    data["lengths"] = {length: block for length in lengths.split(",")}
    return data


def test_scaling_runs_of_different_lengths_make_one_table_in_length_order(tmp_path):
    page = tmp_path / "benchmark.md"
    page.write_text("<!-- bench:scaling:start -->\nold\n<!-- bench:scaling:end -->\n")
    long = scaling_json("2048,1024", "python bench/run.py --lengths 2048,1024", peak=2.56e11)
    short = scaling_json("256,512", "python bench/run.py --lengths 256,512", peak=2.32e11)
    report.check_combinable([long, short], ["long.json", "short.json"])
    report.update_page(page, long, short)
    text = page.read_text()
    # Each run is named with its own command and machine speed, the shorter lengths first...
    assert text.index("--lengths 256,512`") < text.index("--lengths 2048,1024`")
    assert "232 GFLOP/s" in text and "256 GFLOP/s" in text
    # ...the settings they share once, and one table whose rows run 256 → 2048.
    assert text.count("16 optimizer steps per run") == 1
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and
            "ours, grad ckpt off" in line]  # fmt: skip
    assert rows == ["| 256", "| 512", "| 1024", "| 2048"]
    assert [line for line in text.splitlines() if line.startswith("- max length") and
            line.endswith(":")] == [  # fmt: skip
        "- max length 256:", "- max length 512:", "- max length 1024:", "- max length 2048:"
    ]  # fmt: skip
    assert "old" not in text


def test_only_like_scaling_runs_of_disjoint_lengths_combine(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "ROOT", tmp_path)  # --docs would write tmp_path/docs/benchmark.md
    a = scaling_json("256,512", "python bench/run.py --lengths 256,512")
    unlike = {
        "differ in steps (16 vs 4)": scaling_json("1024", "c", steps=4),
        "max length 512 is in both a.json and b.json": scaling_json("512,1024", "c"),
        "b.json is not one": results_json(),
    }
    for message, b in unlike.items():
        paths = []
        for name, data in (("a.json", a), ("b.json", b)):
            (tmp_path / name).write_text(json.dumps(data), encoding="utf-8")
            paths.append(str(tmp_path / name))
        with pytest.raises(SystemExit, match=re.escape(message.replace("a.json", paths[0])
                                                       .replace("b.json", paths[1]))):  # fmt: skip
            run.main(["--render", *paths, "--docs"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # nothing written


def test_each_ratio_is_held_to_its_target_and_a_speed_miss_names_the_profile_that_explains_it():
    data = results_json()
    data["ratios"] = {
        "ours/trl, grad ckpt off": {"real tokens/s": 2.0, "peak memory": 0.7, "held-out loss": 1.0},
        "ours/tutorial, grad ckpt off": {"real tokens/s": 3.5, "peak memory": 0.6,
                                         "held-out loss": 1.0},
        "ours/peft-trainer, grad ckpt on": {"real tokens/s": 1.4, "peak memory": 0.5,
                                            "held-out loss": 1.03},
        "ours/trl, grad ckpt on": {"real tokens/s": 1.6, "peak memory": 0.9, "held-out loss": 1.0},
    }  # fmt: skip
    text = report.render_results(data)
    assert "1 of 4 ratios meet their targets" in text
    # The ratio lines above carry bold figures; the misses after them do not.
    misses = [x for x in text.splitlines() if x.startswith("- ours/") and "**" not in x]
    assert misses == [
        # Too slow: the profile of the same contenders and setting says where the time went...
        "- ours/tutorial, grad ckpt off: real tokens/s 3.50× < 4×: `python bench/op_profile.py "
        "--contenders ours,tutorial --grad-checkpointing off` (with this run's other flags) → "
        "`bench/results/cpu-2cores-profile-ours-tutorial-2026-12-06.md`",
        # ...a profile of CPU time says nothing about a loss or memory miss: listed, no pointer.
        "- ours/peft-trainer, grad ckpt on: held-out loss 1.030× (not within 2%)",
        "- ours/trl, grad ckpt on: peak memory 0.90× > 0.85×",
    ]
    # A tiny smoke-test model's ratios are not held to anything.
    data["settings"]["tiny"] = True
    assert "Against the targets" not in report.render_results(data)


def test_a_missed_speed_target_points_at_the_file_op_profile_writes():
    import op_profile

    # Both ask report.profile_stem; the scaling pointer names the per-length file it writes.
    assert op_profile.profile_stem is report.profile_stem
    pointer = report.profile_pointer("cpu-2cores", "2026-12-06", "trl", "2048", "both")
    assert "--lengths 2048 --grad-checkpointing both" in pointer
    assert pointer.endswith("`bench/results/cpu-2cores-profile-2048-2026-12-06.md`")
    assert report.profile_stem("cpu-2cores", "d", "ours,tutorial", 512, tiny=True) == (
        "cpu-2cores-profile-tiny-ours-tutorial-512-d"
    )
