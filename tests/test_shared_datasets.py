"""`train.py --max-steps 1` on every real dataset in ../shared/data, with a truthful summary."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

DATASETS = (
    sorted(
        str(p.relative_to(SHARED / "data"))
        for p in (SHARED / "data").glob("*/*")
        if p.suffix in (".json", ".jsonl", ".csv")
    )
    if SHARED.is_dir()
    else []
)


@pytest.mark.skipif(not DATASETS, reason="../shared is not available")
@pytest.mark.parametrize("name", DATASETS)
def test_train_one_step_on_each_shared_dataset(qwen2_dir, tmp_path, name):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--model",
            str(qwen2_dir),
            "--data",
            str(SHARED / "data" / name),
            "--output",
            str(out),
            "--max-steps",
            "1",
            "--max-len",
            "512",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((out / "train_args.json").read_text(encoding="utf-8"))["data"]
    read = summary["train_files"][0]
    assert read["kept"] + sum(read["skipped"].values()) == read["rows_read"]
    assert f"rows read {read['rows_read']}, kept {read['kept']}" in p.stdout
    train = summary["train"]
    assert train["rows"] + train["dropped_no_supervised_token"] == read["kept"]
    assert "padding:" in p.stdout and "supervised of" in p.stdout
    if "huatuo" in name:
        # Length-grouped batches waste a small fraction of what padding to --max-len wastes.
        assert (
            summary["padding_ratio"] < 0.05
            and 10 * summary["padding_ratio"] < summary["padding_ratio_if_padded_to_max_len"]
        )
