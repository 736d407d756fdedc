"""Faults: interrupts, kills, full disks, bad paths, damaged files, bad flags, two runs at once.

Every test here reproduces a failure found by a fault audit of train.py and infer.py, and
names the behaviour that must hold: nothing lost, nothing silently wrong, one clear line.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training import cfg, run_cli

import infer
import train as train_cli
from conftest import ROOT, overfit_rows, run_script, write_json
from lora.adapter import ADAPTER_WEIGHTS, read_adapter_config, read_adapter_tensors
from lora.data.fileformat import decode_bytes
from lora.data.records import read_dataset
from lora.errors import TrainingInterrupted, UserError
from lora.train import loop as trainer
from lora.train.loop import train
from lora.train.metrics import MetricsLog


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "rows.json", overfit_rows(8))


def finished(out) -> bool:
    return json.loads((out / "train_args.json").read_text())["finished"]


def metrics_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Data loss


def ctrl_c_during_final_evaluation(monkeypatch, presses: int):
    """Press Ctrl-C `presses` times while the final evaluation runs."""
    evaluate = trainer.evaluate_and_keep_best

    def evaluate_then_interrupt(run, val_set):
        if run.state.step == run.total_steps:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return evaluate(run, val_set)

    monkeypatch.setattr(trainer, "evaluate_and_keep_best", evaluate_then_interrupt)


def test_ctrl_c_during_the_final_evaluation_completes_the_save(
    qwen2_dir, data, tmp_path, monkeypatch
):
    ctrl_c_during_final_evaluation(monkeypatch, presses=1)
    out = tmp_path / "out"
    try:
        with pytest.raises(TrainingInterrupted):
            train(cfg(qwen2_dir, data, out, max_steps=2, val_size=2))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the final evaluation killed the run before its final save")
    assert finished(out) and (out / ADAPTER_WEIGHTS).is_file()


def test_second_ctrl_c_during_the_final_evaluation_leaves_a_resumable_checkpoint(
    qwen2_dir, data, tmp_path, monkeypatch
):
    ctrl_c_during_final_evaluation(monkeypatch, presses=2)
    out = tmp_path / "out"
    try:
        with pytest.raises(TrainingInterrupted):
            train(cfg(qwen2_dir, data, out, max_steps=2, val_size=2))
    except KeyboardInterrupt:
        pytest.fail("a second Ctrl-C during the final evaluation lost the run")
    assert (out / "checkpoint-2").is_dir() and not finished(out)
    monkeypatch.undo()
    result = train(cfg(qwen2_dir, data, out, max_steps=2, val_size=2, resume="auto"))
    assert result.steps == 2 and finished(out) and metrics_steps(out) == [1, 2, 2]


@pytest.mark.parametrize("typo", [{"data": "/no/such.json"}, {"targets": "qkv"}])
def test_overwrite_with_a_typo_keeps_the_previous_run(qwen2_dir, data, tmp_path, typo):
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=1))
    before = (out / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(UserError):
        train(replace(cfg(qwen2_dir, data, out, max_steps=1, overwrite=True), **typo))
    assert (out / ADAPTER_WEIGHTS).read_bytes() == before
    assert finished(out) and metrics_steps(out) == [1]


def test_metrics_rewrite_on_resume_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    before = path.read_bytes()
    import lora.train.metrics

    calls = {"n": 0}
    dumps = json.dumps

    def killed_on_the_second_record(obj, *a, **kw):  # a kill in the middle of the rewrite
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return dumps(obj, *a, **kw)

    monkeypatch.setattr(lora.train.metrics.json, "dumps", killed_on_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, writer=True).continue_from(2)
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(qwen2_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=3, stop_after_steps=2))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 0.12')  # the disk filled up during this append
    result = train(cfg(qwen2_dir, data, out, max_steps=3, resume="auto"))
    assert result.steps == 3 and metrics_steps(out) == [1, 2, 3]
    assert "torn last line" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Silently wrong

BAD_TRAIN_FLAGS = [
    ("--lr", "0", "--lr must be a finite number > 0"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--lr", "-0.001", "--lr must be a finite number > 0"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--grad-accum", "0", "--grad-accum must be an integer >= 1"),
    ("--epochs", "0", "--epochs must be a finite number > 0"),
    ("--max-steps", "0", "--max-steps must be an integer >= 1"),
    ("--max-steps", "-5", "--max-steps must be an integer >= 1"),
    ("--max-len", "0", "--max-len must be an integer >= 16"),
    ("--max-len", "-1", "--max-len must be an integer >= 16"),
    ("--val-size", "1.5", "--val-size must be 0, a fraction in (0, 1) or a whole count >= 1"),
    ("--val-size", "-0.1", "--val-size must be 0, a fraction in (0, 1) or a whole count >= 1"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0"),
    ("--warmup", "-1", "--warmup must be a fraction in [0, 1) or a count >= 1"),
    ("--dropout", "1", "--dropout must be a number in [0, 1)"),
    ("--alpha", "0", "--alpha must be a finite number > 0"),
    ("--keep-last", "-1", "--keep-last must be an integer >= 0"),
    ("--save-every", "-1", "--save-every must be an integer >= 0"),
    ("--eval-every", "-2", "--eval-every must be an integer >= 0"),
    ("--stop-after-steps", "0", "--stop-after-steps must be an integer >= 1"),
]


@pytest.mark.parametrize("flag,value,message", BAD_TRAIN_FLAGS)
def test_bad_train_flag_values_stop_before_anything_loads(
    qwen2_dir, data, tmp_path, capsys, flag, value, message
):
    out = tmp_path / "out"
    argv = ["--model", str(qwen2_dir), "--data", str(data), "--output", str(out)]
    code = train_cli.main([*argv, "--max-steps", "1", "--no-progress", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and f"got {value}" in err.replace("'", ""), err
    assert not out.exists()  # checked before the output directory or the model is touched


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--report-to", "tensorboard,mlflow"], "--report-to: unknown tracker 'mlflow'"),
        (["--early-stop", "2"], "--early-stop needs validation data: pass --val-data FILE"),
        (["--early-stop", "2", "--val-size", "2"], "--early-stop needs validations during the run"),
        (["--data", "DATA,DATA:0"], "the weight after ':' must be a number > 0"),
    ],
)
def test_reporting_mixing_and_early_stop_mistakes_stop_before_anything_loads(
    qwen2_dir, data, tmp_path, capsys, extra, message
):
    out = tmp_path / "out"
    argv = [
        "--model",
        str(qwen2_dir),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "1",
    ]
    code = train_cli.main([*argv, *(a.replace("DATA", str(data)) for a in extra)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--batch-size", "0"),
        ("--max-new-tokens", "0"),
        ("--max-new-tokens", "-3"),
        ("--device", "gpu"),
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--top-k", "-1"),
        ("--repetition-penalty", "0"),
    ],
)
def test_bad_infer_flag_values_are_one_clear_line(tmp_path, capsys, flag, value):
    code = infer.main(["--adapter", str(tmp_path), "--prompt", "hi", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} must be" in err and value in err, err


def test_resume_with_changed_settings_or_data_is_refused_naming_each(qwen2_dir, data, tmp_path):
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=2, stop_after_steps=1))
    with pytest.raises(UserError, match=r"max_len was 1024, now 64.*lr was 0\.01, now 0\.02"):
        train(cfg(qwen2_dir, data, out, max_steps=2, resume="auto", lr=2e-2, max_len=64))
    other = write_json(tmp_path / "other.json", overfit_rows(9)[1:])  # as many rows, one new
    with pytest.raises(UserError, match="data_sha256 was"):
        train(cfg(qwen2_dir, other, out, max_steps=2, resume="auto"))
    assert train(cfg(qwen2_dir, data, out, max_steps=2, resume="auto")).steps == 2


def test_extending_a_finished_run_without_a_checkpoint_says_what_to_do(qwen2_dir, data, tmp_path):
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=1))
    with pytest.raises(
        UserError, match="no checkpoint to continue from.*--overwrite --max-steps 3"
    ):
        train(cfg(qwen2_dir, data, out, max_steps=3, resume="auto"))
    assert finished(out) and metrics_steps(out) == [1]


HOLD_THE_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from lora.train.rundir import run_dir_lock
with run_dir_lock({out!r}):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(qwen2_dir, data, tmp_path):
    out = tmp_path / "out"
    code = HOLD_THE_LOCK.format(root=str(ROOT), out=str(out))
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(
            UserError, match=f"in use by another training run \\(PID {first.pid}\\)"
        ):
            train(cfg(qwen2_dir, data, out, max_steps=1))
    finally:
        first.kill()  # SIGKILL: the lock it held is stale now, and must not block
        first.wait()
    assert train(cfg(qwen2_dir, data, out, max_steps=1)).steps == 1


def test_utf8_with_a_stray_latin1_byte_is_not_read_as_gb18030(tmp_path):
    raw = b'[{"instruction": "Write two r\xe9sum\xe9s", "output": "Done."}]'
    with pytest.raises(UserError, match="byte offset 29.*--encoding"):
        decode_bytes(raw, tmp_path / "x.json")
    text = "头痛发热，咳嗽。可以使用银翘解毒丸。".encode("gb18030")  # real GB18030 still works
    assert decode_bytes(text, "x")[1] == "gb18030"


@pytest.fixture
def adapter_dir(qwen2_dir, data, tmp_path):
    out = tmp_path / "adapter"
    train(cfg(qwen2_dir, data, out, max_steps=1))
    return out


def damage_tensor(adapter, how):
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    key = sorted(tensors)[3]
    if how == "nan":
        tensors[key][0, 0] = float("nan")
    else:  # random bytes in the tensor's data, the header left intact
        t = tensors[key]
        tensors[key] = torch.frombuffer(bytearray(os.urandom(4 * t.numel())), dtype=torch.float32)
        tensors[key] = tensors[key].reshape(t.shape).clone()
    save_file(tensors, adapter / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("how", ["nan", "random bytes"])
def test_non_finite_adapters_are_refused_naming_the_tensor(adapter_dir, tmp_path, capsys, how):
    key = damage_tensor(adapter_dir, how)
    with pytest.raises(UserError, match=f"tensor {key}"):
        read_adapter_tensors(adapter_dir)
    code = infer.main(["--adapter", str(adapter_dir), "--export", str(tmp_path / "merged")])
    assert code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "merged" / "model.safetensors").exists()


def test_damaged_newest_checkpoint_is_set_aside_and_only_our_temporaries_are_removed(
    qwen2_dir, data, tmp_path, capsys
):
    out = tmp_path / "out"
    common = dict(max_steps=3, save_every=1, keep_last=2)
    train(cfg(qwen2_dir, data, out, stop_after_steps=2, **common))
    (out / "checkpoint-2" / "training_state.pt").write_bytes(b"")  # a power loss
    (out / ".tmp-checkpoint-3").mkdir()  # a kill mid-save
    (out / ".adapter_model.safetensors.x1y2.tmp").write_bytes(b"half")  # a kill mid-write
    (out / ".pruned-checkpoint-0").mkdir()  # a kill while pruning (renamed, then deleted)
    result = train(cfg(qwen2_dir, data, out, resume="auto", **common))
    stdout = capsys.readouterr().out
    assert result.steps == 3 and "skipping damaged checkpoint" in stdout
    assert "set the damaged checkpoint-2 aside as checkpoint-2.damaged" in stdout
    assert "resumed from" in stdout and "checkpoint-1 at step 1" in stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".train.lock"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-2.damaged", "checkpoint-3"
    ]  # fmt: skip
    assert (out / "checkpoint-2.damaged" / ADAPTER_WEIGHTS).is_file()  # kept for the user


def test_a_checkpoint_missing_one_small_file_is_not_deleted(qwen2_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    common = dict(max_steps=6, save_every=2, keep_last=3)
    train(cfg(qwen2_dir, data, out, stop_after_steps=4, **common))
    (out / "checkpoint-4" / "adapter_config.json").unlink()
    weights = (out / "checkpoint-4" / ADAPTER_WEIGHTS).read_bytes()
    result = train(cfg(qwen2_dir, data, out, resume="auto", **common))
    stdout = capsys.readouterr().out
    assert result.steps == 6 and "checkpoint-2 at step 2" in stdout
    assert "removed" not in stdout and "adapter_config.json missing" in stdout
    assert (out / "checkpoint-4.damaged" / ADAPTER_WEIGHTS).read_bytes() == weights
    assert (out / "checkpoint-4.damaged" / "training_state.pt").is_file()


@pytest.mark.parametrize("rng", ["missing", "empty"])
def test_a_checkpoint_without_its_random_state_is_not_resumed_inexactly(
    qwen2_dir, data, tmp_path, capsys, rng
):
    common = dict(max_steps=6, save_every=2, keep_last=3, dropout=0.1)
    straight = train(cfg(qwen2_dir, data, tmp_path / "straight", **common))
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, stop_after_steps=4, **common))
    rng_file = out / "checkpoint-4" / "rng_state_rank0.pt"
    rng_file.unlink() if rng == "missing" else rng_file.write_bytes(b"")
    train(cfg(qwen2_dir, data, out, resume="auto", **common))
    stdout = capsys.readouterr().out
    assert "skipping damaged checkpoint" in stdout and "rng_state_rank0.pt" in stdout
    assert "checkpoint-2 at step 2" in stdout  # the older one: the adapter is the straight run's
    a, b = load_file(straight.output / ADAPTER_WEIGHTS), load_file(out / ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="rng_state_rank0.pt"):  # named explicitly: refused
        train(cfg(qwen2_dir, data, tmp_path / "x", resume=str(out / "checkpoint-4.damaged"),
                  **common))  # fmt: skip


@pytest.mark.parametrize("bookkeeping", ["corrupt", "deleted", "unfinished"])
def test_a_finished_adapter_is_never_trained_over_without_overwrite(
    qwen2_dir, data, tmp_path, bookkeeping
):
    out = tmp_path / "out"
    train(cfg(qwen2_dir, data, out, max_steps=2))
    args_file = out / "train_args.json"
    if bookkeeping == "corrupt":
        args_file.write_text("{")
    elif bookkeeping == "deleted":
        args_file.unlink()
    else:
        args_file.write_text(args_file.read_text().replace('"finished": true', '"finished": false'))
    weights = (out / ADAPTER_WEIGHTS).read_bytes()
    for resume in (None, "auto"):
        with pytest.raises(UserError, match="holds an adapter.*--overwrite"):
            train(cfg(qwen2_dir, data, out, max_steps=2, resume=resume))
    assert (out / ADAPTER_WEIGHTS).read_bytes() == weights
    assert train(cfg(qwen2_dir, data, out, max_steps=2, overwrite=True)).steps == 2


# ---------------------------------------------------------------------------------------------
# Tracebacks -> one clear line


def test_output_under_a_file_is_one_line_before_the_model_loads(qwen2_dir, data, tmp_path):
    (tmp_path / "file").write_text("x")
    p = run_cli("--model", "/no/such/model", "--data", str(data), "--max-steps", "1",
                "--output", str(tmp_path / "file" / "out"))  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "cannot write there (Not a directory)" in p.stderr and str(tmp_path / "file") in p.stderr


def limit_file_size(n_bytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(
    qwen2_dir, data, tmp_path
):
    out = tmp_path / "out"
    args = ("--model", str(qwen2_dir), "--data", str(data), "--output", str(out),
            "--max-steps", "1", "--targets", "all-linear", "--no-progress")  # fmt: skip
    # Files may grow to 32 KB: train_args.json and metrics.jsonl fit, the adapter does not.
    p = run_cli(*args, preexec_fn=limit_file_size(32_000))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert str(out / ADAPTER_WEIGHTS) in line and "File too large" in line
    assert sorted(p.name for p in out.iterdir()) == [
        ".train.lock",
        "metrics.jsonl",
        "train_args.json",
    ]
    assert not finished(out)


def test_a_lone_surrogate_skips_the_row_and_counts_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"instruction": "bad \\ud800", "output": "x"}\n{"instruction": "ok", "output": "y"}\n'
    )
    samples, report = read_dataset(path)
    assert len(samples) == 1 and sum(report.skipped.values()) == 1
    assert "surrogate" in " ".join(report.lines())


@pytest.mark.parametrize(
    "config,message",
    [({"r": "eight", "peft_type": "LORA"}, "'r' must be an integer"), ([1, 2], "a JSON object")],
)
def test_mistyped_adapter_configs_are_a_clear_error(tmp_path, config, message):
    write_json(tmp_path / "adapter_config.json", config)
    with pytest.raises(UserError, match=message):
        read_adapter_config(tmp_path)


def test_files_we_write_are_readable_by_other_users(adapter_dir):
    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    for name in (ADAPTER_WEIGHTS, "adapter_config.json", "train_args.json", "loss_curve.png"):
        assert (adapter_dir / name).stat().st_mode & 0o777 == expected, name


def test_sigkill_mid_run_resumes_from_the_newest_intact_checkpoint_to_the_same_adapter(
    qwen2_dir, data, tmp_path
):
    def args(out):
        return ["--model", str(qwen2_dir), "--data", str(data), "--output", str(out),
                "--max-steps", "12", "--save-every", "2", "--keep-last", "2", "--dropout", "0.1",
                "--rank", "4", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2",
                "--targets", "all-linear", "--no-progress"]  # fmt: skip

    assert run_cli(*args(tmp_path / "straight")).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None and not list(out.glob("checkpoint-*")):
        time.sleep(0.02)  # polling, not timing: the kill lands wherever the run happens to be
    proc.kill()  # SIGKILL: no handler runs; even a kill mid-save must be survivable
    proc.wait()
    p = run_cli(*args(out), "--resume", "auto")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert metrics_steps(out) == list(range(1, 13))
    a = load_file(tmp_path / "straight" / ADAPTER_WEIGHTS)
    b = load_file(out / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_with_only_damaged_checkpoints_refuses_to_start_over_silently(tmp_path):
    from lora.train.checkpoint import REQUIRED_FILES
    from lora.train.config import TrainConfig
    from lora.train.rundir import plan_run_dir

    damaged = tmp_path / "checkpoint-4"
    damaged.mkdir()
    for name in REQUIRED_FILES:
        (damaged / name).write_bytes(b"")
    with pytest.raises(UserError, match="no checkpoint is intact.*checkpoint-4.*--overwrite"):
        plan_run_dir(tmp_path, TrainConfig(resume="auto"))


def test_scoring_two_adapters_into_one_directory_keeps_both_reports(
    qwen2_dir, data, tmp_path, capsys
):
    reports = tmp_path / "reports"
    for name in ("a", "b"):
        out = tmp_path / name
        train(cfg(qwen2_dir, data, out, max_steps=1, lr=1e-2 if name == "a" else 5e-2))
        code = infer.main(["--adapter", str(out), "--file", str(data), "--score",
                           "--max-new-tokens", "2", "--output", str(reports / f"{name}.jsonl")])  # fmt: skip
        assert code == 0
        assert f"scores written to {reports / f'{name}.score.json'}" in capsys.readouterr().err
    a, b = (json.loads((reports / f"{n}.score.json").read_text()) for n in ("a", "b"))
    assert a != b and not (reports / "score.json").exists()


def test_a_diverged_adapter_is_not_reported_as_a_success(qwen2_dir, data, tmp_path):
    """Training judges the adapter it saves by the rule infer.py reads adapters by."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"training diverged.*far beyond.*--lr \(now 1e\+09\)"):
        train(cfg(qwen2_dir, data, out, max_steps=2, lr=1e9))
    assert not (out / ADAPTER_WEIGHTS).exists() and not finished(out)


def test_the_encoding_advice_names_only_encodings_that_fit(tmp_path, capsys):
    """A UTF-8 Chinese file with a stray byte early on: latin-1 would 'work' and train on mojibake."""
    rows = [
        {"instruction": f"问题{i}：头痛发热怎么办？", "output": "可以使用银翘解毒丸。"}
        for i in range(20)
    ]
    raw = json.dumps(rows, ensure_ascii=False).encode("utf-8")
    raw = raw[:5] + b"\xff" + raw[5:]  # damaged before any Chinese text
    with pytest.raises(UserError) as e:
        decode_bytes(raw, "x.json")
    assert "latin-1" not in str(e.value) and "cp1252" not in str(e.value)
    assert "iconv" in str(e.value)
    text, _ = decode_bytes(raw, "x.json", encoding="latin-1")  # told to: reads, and warns
    assert "mojibake" in capsys.readouterr().err and len(text) > 1.5 * len(
        raw.decode("utf-8", "replace")
    )
    with pytest.raises(UserError, match="--encoding cp1252"):  # Latin text: a Latin encoding fits
        decode_bytes(
            b'[{"instruction": "\xff Write two r\xe9sum\xe9s", "output": "Done."}]', "y.json"
        )


def test_an_absurd_data_weight_is_one_line_before_anything_allocates(tmp_path, capsys):
    from lora.data.mixture import Mixture

    code = train_cli.main(["--data", "data/chinese_med.json:1e9", "--output", str(tmp_path / "o")])
    assert code == 2 and "<= 100" in capsys.readouterr().err
    with pytest.raises(UserError, match="an epoch of 200,000,000 rows"):  # 2M rows × 100
        Mixture([2_000_000], [100.0], seed=0)


def test_an_edited_rank_is_named_as_such_not_as_another_base_model(adapter_dir, tmp_path, capsys):
    config = read_adapter_config(adapter_dir)
    config["r"] = config["r"] * 2
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    code = infer.main(["--adapter", str(adapter_dir), "--export", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and f"says r={config['r']}" in err and "another size" not in err


@pytest.mark.parametrize("what", ["export", "answers"])
def test_a_full_disk_names_the_path_for_exports_and_answers_too(adapter_dir, data, tmp_path, what):
    target = tmp_path / ("merged" if what == "export" else "answers.jsonl")
    flags = ["--export", target] if what == "export" else ["--file", data, "--output", target]
    p = run_script("infer.py", "--adapter", adapter_dir, *flags, "--max-new-tokens", "8",
                   preexec_fn=limit_file_size(2_000 if what == "answers" else 32_000))  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert str(tmp_path) in line and ("File too large" in line or "too large" in line), line
    assert not (tmp_path / "merged").exists()
