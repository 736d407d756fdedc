"""--early-stop N: N validations without a lower loss end the run; best/ becomes its result."""

from __future__ import annotations

import json

import pytest

import lora.train.validation
from conftest import assert_same_adapters, overfit_rows, tiny_config, write_json
from lora.errors import UserError
from lora.train.config import check_config
from lora.train.loop import train


def planted_curve(monkeypatch, losses):
    """Validation returns `losses` in turn, whatever the model: the curve the test is about."""
    calls = iter(losses)
    monkeypatch.setattr(lora.train.validation, "validation_loss", lambda run, val_set: next(calls))


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "rows.json", overfit_rows(8))


def test_early_stop_after_n_validations_without_improvement_keeps_the_best(
    qwen2_dir, data, tmp_path, monkeypatch, capsys
):
    planted_curve(monkeypatch, [3.0, 2.0, 2.5, 2.1, 1.0, 0.5])  # best at step 2, then 2 worse
    out = tmp_path / "out"
    result = train(tiny_config(qwen2_dir, data, out, max_steps=8, val_size=2, eval_every=1,
                               early_stop=2))  # fmt: skip
    assert result.steps == 4 and result.val_loss == 2.0
    assert_same_adapters(out, out / "best", atol=0)
    args = json.loads((out / "train_args.json").read_text())
    assert args["finished"] and args["state"]["best_step"] == 2
    assert args["final"]["val_loss"] == 2.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if r["kind"] == "eval"] == [3.0, 2.0, 2.5, 2.1]
    assert "early stop at step 4: 2 validations without a lower loss" in capsys.readouterr().out


def test_without_early_stop_the_same_curve_trains_to_the_end(
    qwen2_dir, data, tmp_path, monkeypatch
):
    planted_curve(monkeypatch, [3.0, 2.0, 2.5, 2.1, 2.6, 2.7])
    out = tmp_path / "out"
    result = train(tiny_config(qwen2_dir, data, out, max_steps=6, val_size=2, eval_every=1))
    assert result.steps == 6 and result.val_loss == 2.7
    with pytest.raises(AssertionError):  # the last adapter is not the best one
        assert_same_adapters(out, out / "best", atol=0)


def test_a_curve_that_keeps_improving_never_stops_early(qwen2_dir, data, tmp_path, monkeypatch):
    planted_curve(monkeypatch, [3.0, 2.9, 2.8, 2.7])
    result = train(tiny_config(qwen2_dir, data, tmp_path / "out", max_steps=4, val_size=2,
                               eval_every=1, early_stop=1))  # fmt: skip
    assert result.steps == 4 and result.val_loss == 2.7


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(early_stop=2, eval_every=1), "--early-stop needs validation data"),
        (dict(early_stop=2, val_size=2), "--early-stop needs validations during the run"),
        (dict(early_stop=-1, val_size=2, eval_every=1), "--early-stop must be an integer >= 0"),
    ],
)
def test_early_stop_without_validation_is_a_clear_error(settings, needle, tmp_path):
    with pytest.raises(UserError, match=needle):
        check_config(tiny_config("m", "d.json", tmp_path, **settings))
