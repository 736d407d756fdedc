"""Several --data files: each read on its own, mixed per epoch by the files' sampling weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import lora.train.run
from conftest import overfit_rows, tiny_config, write_json
from lora.data.cache import cache_key
from lora.data.mixture import DataSource, Mixture, columns_by_file, parse_data
from lora.errors import UserError
from lora.train.loop import train


def test_data_spec_names_files_and_optional_weights():
    assert parse_data("a.json,b.jsonl:0.3,c.csv:2") == [
        DataSource("a.json", 1.0), DataSource("b.jsonl", 0.3), DataSource("c.csv", 2.0)
    ]  # fmt: skip
    for bad in ("a.json,b.jsonl:0", "a.json,b.jsonl:-1", "a.json:x", "a.json,,b.json"):
        with pytest.raises(UserError, match="--data"):
            parse_data(bad)


def test_columns_can_name_the_file_they_apply_to():
    sources = parse_data("data/a.json,data/b.csv")
    assert columns_by_file("b.csv:prompt=Q,response=A", sources) == [None, "prompt=Q,response=A"]
    spec = "prompt=X,response=Y;data/b.csv:prompt=Q,response=A"
    assert columns_by_file(spec, sources) == ["prompt=X,response=Y", "prompt=Q,response=A"]
    with pytest.raises(UserError, match="'c.csv' is not one of the --data files"):
        columns_by_file("c.csv:prompt=Q,response=A", sources)


def appearances(mixture: Mixture, epochs: int) -> np.ndarray:
    """How often each row of the training set is drawn over `epochs` epochs."""
    counts = np.zeros(sum(mixture.counts), dtype=np.int64)
    for epoch in range(epochs):
        np.add.at(counts, mixture.epoch_rows(epoch), 1)
    return counts


def test_each_epoch_takes_round_weight_times_rows_from_each_file():
    mixture = Mixture([100, 40, 10], [1.0, 0.3, 2.5], seed=0)
    for epoch in range(5):
        rows = mixture.epoch_rows(epoch)
        per_file = np.histogram(rows, bins=mixture.starts)[0]
        assert per_file.tolist() == [100, 12, 25]
    assert mixture.epoch_rows(0).tolist() != mixture.epoch_rows(1).tolist()  # a fresh draw
    assert (
        mixture.epoch_rows(3).tolist()
        == Mixture([100, 40, 10], [1, 0.3, 2.5], 0).epoch_rows(3).tolist()
    )


def test_every_row_is_drawn_at_its_files_rate_within_sampling_error():
    epochs, mixture = 400, Mixture([50, 40, 10], [1.0, 0.3, 2.5], seed=1)
    seen = appearances(mixture, epochs) / epochs
    a, b, c = np.split(seen, mixture.starts[1:-1])
    assert np.all(a == 1.0)
    # Each row of b is drawn in an epoch with probability 0.3: the mean of 400 such draws has a
    # standard deviation sqrt(0.3 * 0.7 / 400) = 0.023; 5 of them bound every row.
    assert np.all(np.abs(b - 0.3) < 5 * 0.023)
    assert np.all(np.abs(c - 2.5) < 5 * np.sqrt(0.25 / epochs))  # 2 times, plus a coin flip
    assert b.mean() == pytest.approx(0.3) and c.mean() == pytest.approx(2.5)


def test_weights_of_one_keep_the_single_file_epoch():
    assert Mixture([7, 3], [1.0, 1.0], seed=0).plain
    assert sorted(Mixture([7, 3], [1.0, 1.0], 0).epoch_rows(0).tolist()) == list(range(10))


@pytest.fixture
def two_files(tmp_path):
    """An Alpaca JSON array and a question/answer CSV: two formats and schemas in one run."""
    a = write_json(tmp_path / "a.json", overfit_rows(8))
    b = tmp_path / "b.csv"
    rows = [(r["instruction"] + "?", r["output"]) for r in overfit_rows(16)[8:]]
    b.write_text("Q,A\n" + "".join(f"{q},{ans}\n" for q, ans in rows), encoding="gbk")
    return a, b


def test_a_run_mixes_two_files_detected_on_their_own(
    qwen2_dir, two_files, tmp_path, monkeypatch, capsys
):
    a, b = two_files
    drawn = []
    micro_batches = lora.train.run.Run.micro_batches

    def record_rows(run, window):
        drawn.extend(i for batch in window for i in batch)
        return micro_batches(run, window)

    monkeypatch.setattr(lora.train.run.Run, "micro_batches", record_rows)
    out = tmp_path / "out"
    cfg = tiny_config(qwen2_dir, f"{a},{b}:0.5", out, max_steps=None, epochs=3, batch_size=2,
                      columns="b.csv:prompt=Q,response=A")  # fmt: skip
    train(cfg)
    text = capsys.readouterr().out
    assert f"data {a}: JSON array, utf-8" in text and f"data {b}: CSV" in text and "gb18030" in text
    assert f"mix {b}: 8 rows × weight 0.5 = 4 rows per epoch" in text
    assert len(drawn) == 3 * (8 + 4)
    from_b = [i for i in drawn if i >= 8]
    assert len(from_b) == 3 * 4 and len(set(from_b)) > 4  # each epoch draws other rows of b
    args = json.loads((out / "train_args.json").read_text())
    assert [f["kept"] for f in args["data"]["train_files"]] == [8, 8]
    assert args["data"]["rows_per_epoch_per_file"] == [8, 4]


def test_the_combination_of_files_keys_the_data_cache(two_files):
    a, b = two_files
    tok = SimpleNamespace(backend_tokenizer=SimpleNamespace(to_str=lambda: "t"), eos_token="e")
    fmt = SimpleNamespace(template="plain", system=None, enable_thinking=False)

    def key(data):
        return cache_key(tiny_config("m", data, "o"), tok, fmt)

    assert key(f"{a},{b}") != key(str(a)) != key(str(b))
    assert key(f"{a},{b}") != key(f"{b},{a}")  # the order of the rows changes
    assert key(f"{a},{b}") == key(f"{a},{b}:0.5")  # weights only change which rows an epoch draws


def test_rows_held_out_of_several_files_are_kept_as_each_file_holds_them(
    qwen2_dir, two_files, tmp_path
):
    import random

    a, b = two_files
    out = tmp_path / "out"
    cfg = tiny_config(qwen2_dir, f"{a},{b}", out, max_steps=1, val_size=4,
                      columns="b.csv:prompt=Q,response=A")  # fmt: skip
    train(cfg)
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    b_lines = b.read_text(encoding="gbk").splitlines()[1:]
    rows = json.loads(a.read_text()) + [dict(zip(("Q", "A"), line.split(","))) for line in b_lines]
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)  # the split's own draw over both files together
    assert held == [rows[i] for i in sorted(order[:4])]
