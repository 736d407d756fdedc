"""torchrun (DDP, gloo on CPU): 2 processes give the adapter of 1 process with the same global batch."""

import json

import pytest

from conftest import (
    assert_same_adapters,
    ctrl_c_under_torchrun,
    overfit_rows,
    train_cli,
    write_json,
)

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


def run(args, nproc=None):
    return train_cli(args, nproc)


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


def test_validation_under_torchrun_scores_every_held_out_row_once(setup):
    """5 held-out rows split 3 / 2: process 1 runs one batch fewer (no stand-in under DDP), and
    the summed loss is the single process's."""
    tmp, args = setup
    val = ["--val-size", "5", "--eval-every", "2"]
    single = tmp / "val-single"
    run([*args, *val, "--output", single, "--batch-size", "4"])
    run([*args, *val, "--output", tmp / "val-ddp", "--batch-size", "2"], nproc=2)
    assert len(val_losses(single)) == 2
    assert val_losses(tmp / "val-ddp") == pytest.approx(val_losses(single), rel=1e-5)


@pytest.mark.parametrize("sharded, batches", [(False, 1), (True, 2)])
def test_a_process_with_fewer_held_out_rows_runs_a_stand_in_batch_only_under_fsdp(sharded, batches):
    """Process 1 of 2 holds 2 of the 5 held-out rows (batch 2). Under FSDP every forward is a
    collective, so it also scores a stand-in batch to match process 0's 2 batches, and discards
    it; under DDP it runs its own batch only. Either way only its own rows are counted."""
    from types import SimpleNamespace

    import torch

    from lora.train.distributed import DistInfo
    from lora.train.validation import validation_loss

    rows = [SimpleNamespace(input_ids=[1] * n, labels=[1] * n) for n in (3, 4, 5, 6, 7)]
    calls = []

    def loss(input_ids, attention_mask, labels):  # every token of a row of n tokens loses n
        calls.append(input_ids.shape[0])
        lengths = attention_mask.sum(dim=1)
        return (lengths**2).sum().float(), int(lengths.sum())

    run = SimpleNamespace(model=torch.nn.Identity(), dist=DistInfo(rank=1, world_size=2),
                          cfg=SimpleNamespace(batch_size=2), pad_id=0, device="cpu",
                          autocast=torch.autocast("cpu", enabled=False), loss=loss,
                          sharded=sharded)  # fmt: skip
    assert validation_loss(run, rows) == (4 * 4 + 6 * 6) / (4 + 6)  # its rows; no stand-in
    assert len(calls) == batches


def val_losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]


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
    tmp, args = setup
    out = tmp / "ddp-interrupted"
    long_args = args + ["--max-steps", "100000", "--batch-size", "2"]  # the last flag wins
    _, _, checkpoint = ctrl_c_under_torchrun(long_args, out)
    assert (checkpoint / "rng_state_rank0.pt").is_file()
    assert (checkpoint / "rng_state_rank1.pt").is_file()
    step = int(checkpoint.name.split("-")[1])
    more = ["--batch-size", "2", "--resume", "auto", "--max-steps", str(step + 1)]
    run([*args, *more, "--output", str(out)], nproc=2)
    assert (out / "adapter_model.safetensors").is_file()
