"""A newcomer's first hour (issue 35): the numbers a run prints are right, mistakes end before
anything slow, and `--dry-run` previews a run without loading the weights."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import fields, replace

import pytest

from conftest import bf16_checkpoint, overfit_rows, run_script, tiny_config, write_json
from lora.errors import UserError
from lora.train.config import TrainConfig
from lora.train.loop import train
from lora.train.schedule import lr_factor, warmup_steps


def printed_by(fn, *args):
    """What `fn(*args)` prints on standard output (a run's reports), and its result."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args)
    return out.getvalue(), result


@pytest.fixture
def rows_file(tmp_path):
    return write_json(tmp_path / "rows.json", overfit_rows(8))


# Warmup


def test_a_warmup_fraction_above_zero_gives_at_least_one_warmup_step():
    assert warmup_steps(0.03, 12) == 1  # 0.36 steps: it used to round to none
    assert warmup_steps(0.03, 1000) == 30
    assert warmup_steps(0.5, 12) == 6
    assert warmup_steps(3, 12) == 3
    assert warmup_steps(0, 12) == 0


def test_a_short_run_warms_up_and_its_start_says_how_many_steps(qwen2_dir, rows_file, tmp_path):
    cfg = tiny_config(qwen2_dir, rows_file, tmp_path / "out", warmup=0.03, max_steps=4)
    printed, _ = printed_by(train, cfg)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    first_lr = records[0]["lr"]
    assert first_lr == pytest.approx(cfg.lr * lr_factor(0, 1, 4)) and first_lr < cfg.lr
    assert "4 optimizer steps, the first 1 warming up (--warmup 0.03)" in printed


def test_the_start_says_when_there_is_no_warmup(qwen2_dir, rows_file, tmp_path):
    printed, _ = printed_by(train, tiny_config(qwen2_dir, rows_file, tmp_path / "out", warmup=0))
    assert "4 optimizer steps, no warmup (--warmup 0)" in printed


# The end summary after --resume


def test_after_resume_the_summary_states_each_span_and_the_resumed_rate(
    qwen2_dir, rows_file, tmp_path
):
    out = tmp_path / "out"
    train(tiny_config(qwen2_dir, rows_file, out, max_steps=5, stop_after_steps=2))
    printed, _ = printed_by(
        train, tiny_config(qwen2_dir, rows_file, out, max_steps=5, resume="auto")
    )
    final = json.loads((out / "train_args.json").read_text())["final"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in records if r["kind"] == "train"]
    resumed = [r for r in steps if r["step"] > 2]
    whole_tokens = sum(r["real_tokens"] for r in steps)
    tokens = sum(r["real_tokens"] for r in resumed)
    seconds = sum(r["step_time_s"] for r in resumed)
    assert final["steps"] == 5 and final["tokens_seen"] == whole_tokens
    mine = final["this_process"]
    assert (mine["first_step"], mine["steps"], mine["tokens_seen"]) == (3, 3, tokens)
    assert mine["mean_tokens_per_s"] == pytest.approx(tokens / seconds, abs=0.1)
    assert mine["wall_time_s"] >= mine["train_time_s"]
    assert f"whole run      {whole_tokens:,} tokens seen" in printed
    assert f"this process   steps 3-5 (resumed): {tokens:,} tokens in" in printed


# Mistakes end before the data is prepared and the weights load


@pytest.fixture
def nothing_slow(monkeypatch):
    """Preparing the data or loading the weights fails the test: checks must come first."""
    import lora.train.run

    def refuse(*args, **kwargs):
        raise AssertionError("the data was prepared or the weights loaded before the check")

    monkeypatch.setattr(lora.train.run, "prepare_data", refuse)
    monkeypatch.setattr(lora.train.run, "load_model", refuse)


def test_an_unknown_target_is_reported_from_the_config_listing_the_layers(
    qwen2_dir, rows_file, tmp_path, nothing_slow
):
    with pytest.raises(UserError) as e:
        train(tiny_config(qwen2_dir, rows_file, tmp_path / "out", targets="qproj"))
    assert "'qproj' match no linear layer" in str(e.value)
    assert "q_proj" in str(e.value) and "v_proj" in str(e.value)
    assert not (tmp_path / "out" / "train_args.json").exists()


def test_a_rank_above_a_target_layers_dimension_is_refused_before_loading(
    qwen2_dir, rows_file, tmp_path, nothing_slow
):
    # The tiny model: hidden size 64, 2 key/value heads of 16: v_proj is 64 -> 32.
    with pytest.raises(UserError, match=r"--rank 33 .* v_proj.*use --rank 32 or less"):
        train(tiny_config(qwen2_dir, rows_file, tmp_path / "out", targets="q_proj,v_proj", rank=33))


def test_a_missing_quantization_package_is_reported_before_the_data(
    qwen2_dir, rows_file, tmp_path, nothing_slow, monkeypatch
):
    import lora.quantize

    def missing():
        raise UserError("--quantize needs bitsandbytes, which is not installed")

    monkeypatch.setattr(lora.quantize, "require_bitsandbytes", missing)
    with pytest.raises(UserError, match="needs bitsandbytes"):
        train(tiny_config(qwen2_dir, rows_file, tmp_path / "out", quantize="nf4"))


# --dry-run


def dry(cfg):
    """`cfg` with --dry-run on."""
    return replace(cfg, dry_run=True)


def test_dry_run_prepares_the_data_and_reports_without_loading_weights_or_writing(
    qwen2_dir, rows_file, tmp_path, monkeypatch
):
    import lora.train.run

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded the weights")

    monkeypatch.setattr(lora.train.run, "load_model", refuse)
    out = tmp_path / "out"
    printed, result = printed_by(train, dry(tiny_config(qwen2_dir, rows_file, out, max_steps=6)))
    assert result.steps == 6 and not result.finished
    assert "data " in printed and "tokens: 8 train rows" in printed  # the data summary
    assert "6 optimizer steps" in printed and "memory estimate (resident): now" in printed
    assert "trainable params:" in printed
    assert "dry run: every setting checked; the run would write to" in printed
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dry_run_counts_and_estimates_what_the_real_run_does(tiny_models, tmp_path, dora):
    """An fp32 run of a bf16 checkpoint (its embedding and head stay bf16): the dry run's
    parameter counts and computed memory are the real run's, to the byte (the resident part is
    each process's own measurement)."""
    model = bf16_checkpoint(tiny_models["qwen2"], tmp_path / "bf16", tied=False)
    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    real_out, dry_out = tmp_path / "real", tmp_path / "dry"
    settings = dict(max_steps=1, dora=dora, targets="all-linear")
    train(tiny_config(model, data, real_out, **settings))
    real = json.loads((real_out / "train_args.json").read_text())
    printed, _ = printed_by(train, dry(tiny_config(model, data, dry_out, **settings)))
    assert (
        "dry run: every setting checked" in printed and not (dry_out / "train_args.json").exists()
    )
    assert f"trainable params: {real['trainable_params']:,}" in printed
    assert f"all params: {real['total_params']:,}" in printed
    assert real["estimate"]["weights_bytes"] < 4 * (real["total_params"] - real["trainable_params"])
    from lora.train.cost import size

    est = real["estimate"]
    for key in ("weights_bytes", "adapters_and_optimizer_bytes", "activations_bytes",
                "activations_bytes_with_grad_checkpointing", "transient_bytes"):  # fmt: skip
        assert size(est[key]) in printed, key


def test_dry_run_says_what_the_run_would_do_with_its_output(qwen2_dir, rows_file, tmp_path):
    out = tmp_path / "out"
    train(tiny_config(qwen2_dir, rows_file, out, max_steps=3, stop_after_steps=1))
    before = sorted(p.name for p in out.iterdir())
    resume = tiny_config(qwen2_dir, rows_file, out, max_steps=3, resume="auto")
    printed, _ = printed_by(train, dry(resume))
    assert f"the run would resume from {out / 'checkpoint-1'}" in printed
    assert sorted(p.name for p in out.iterdir()) == before  # nothing trained, nothing written
    train(tiny_config(qwen2_dir, rows_file, out, max_steps=3, resume="auto"))
    with pytest.raises(UserError, match="already holds a finished run"):
        train(dry(tiny_config(qwen2_dir, rows_file, out, max_steps=3)))


def test_dry_run_from_the_command_line(qwen2_dir, rows_file, tmp_path):
    if "dry_run" not in {f.name for f in fields(TrainConfig)}:
        pytest.skip("TrainConfig has no dry_run field yet (train.py --dry-run)")
    p = run_script("train.py", "--model", qwen2_dir, "--data", rows_file, "--output",
                   tmp_path / "out", "--max-steps", 3, "--dry-run", "--no-progress")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "memory estimate" in p.stdout and "dry run: every setting checked" in p.stdout
    assert not (tmp_path / "out" / "train_args.json").exists()


# Outside the environment


def test_without_torch_train_py_names_the_missing_package_and_the_fix(tmp_path):
    """`python -S` leaves site-packages out: torch, transformers and numpy are all missing,
    as they are for the system python3 outside .venv."""
    import subprocess
    import sys

    from conftest import ROOT

    def bare(*args):
        return subprocess.run([sys.executable, "-S", str(ROOT / "train.py"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip

    helped = bare("--help")
    assert helped.returncode == 0 and "--max-steps" in helped.stdout
    p = bare("--data", "data/chinese_med.json", "--output", str(tmp_path / "out"))
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "torch is not installed" in p.stderr
    assert "source .venv/bin/activate" in p.stderr and "make train" in p.stderr
    assert "pip install -r requirements.txt" in p.stderr
