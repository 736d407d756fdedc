"""torchrun (DDP, gloo on CPU): 2 processes give the adapter of 1 process with the same global batch."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_same_adapters, overfit_rows, write_json

COMMON = [
    "--targets",
    "all-linear",
    "--rank",
    "4",
    "--alpha",
    "8",
    "--dropout",
    "0",
    "--lr",
    "1e-2",
    "--warmup",
    "0",
    "--grad-accum",
    "2",
    "--max-steps",
    "4",
    "--seed",
    "3",
    "--no-progress",
]


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]


def run(args, nproc=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = torchrun(nproc) if nproc else [sys.executable]
    p = subprocess.run(
        launcher + [str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # 19 rows of varied length: the last global batch is partial, and lengths differ within batches.
    rows = overfit_rows(19)
    data = write_json(tmp / "rows.json", rows)
    return tmp, ["--model", str(tiny_models["qwen2"]), "--data", str(data)] + COMMON


def test_two_processes_equal_one_process_with_the_same_global_batch(setup):
    tmp, args = setup
    single = run(args + ["--output", str(tmp / "single"), "--batch-size", "4"])
    ddp = run(args + ["--output", str(tmp / "ddp"), "--batch-size", "2"], nproc=2)
    assert "2 processes (torchrun)" in ddp.stdout and "effective batch: 8 rows" in ddp.stdout
    assert ddp.stdout.count("adapter saved to") == 1  # only rank 0 saves and logs
    assert "effective batch: 8 rows" in single.stdout
    assert_same_adapters(tmp / "single", tmp / "ddp", atol=1e-5)


def test_resume_under_torchrun_equals_an_uninterrupted_torchrun_run(setup):
    tmp, args = setup
    if not (tmp / "ddp").is_dir():
        run(args + ["--output", str(tmp / "ddp"), "--batch-size", "2"], nproc=2)
    out = str(tmp / "ddp-resumed")
    run(args + ["--output", out, "--batch-size", "2", "--stop-after-steps", "2"], nproc=2)
    assert (tmp / "ddp-resumed" / "checkpoint-2" / "rng_state_rank1.pt").is_file()
    run(args + ["--output", out, "--batch-size", "2", "--resume", "auto"], nproc=2)
    assert_same_adapters(tmp / "ddp", tmp / "ddp-resumed", atol=1e-6)


def test_ctrl_c_under_torchrun_saves_once_and_resumes(setup):
    """Ctrl-C in a terminal signals the whole process group: torchrun and both workers."""
    import signal
    import time

    tmp, args = setup
    out = tmp / "ddp-interrupted"
    long_args = args + ["--max-steps", "100000"]  # the last --max-steps wins
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            *torchrun(2),
            str(ROOT / "train.py"),
            *long_args,
            "--output",
            str(out),
            "--batch-size",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, stdout + stderr[-3000:]
    assert stdout.count("interrupted: saved") == 1
    assert (checkpoints[0] / "rng_state_rank0.pt").is_file() and (
        checkpoints[0] / "rng_state_rank1.pt"
    ).is_file()
    assert "KeyboardInterrupt" not in stderr
    step = int(checkpoints[0].name.split("-")[1])
    run(
        args
        + [
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--resume",
            "auto",
            "--max-steps",
            str(step + 1),
        ],
        nproc=2,
    )
