"""--report-to: trackers receive exactly metrics.jsonl's records; missing packages are one line."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import overfit_rows, tiny_config, write_json
from lora.errors import UserError
from lora.train.loop import train
from lora.train.tracking import check_backends, parse_report_to


def test_report_to_parses_a_comma_list_and_refuses_unknown_names():
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to("none") == [] and parse_report_to(None) == []
    with pytest.raises(UserError, match="unknown tracker 'mlflow'"):
        parse_report_to("tensorboard,mlflow")


@pytest.mark.parametrize("name", ["wandb", "swanlab", "tensorboard"])
def test_a_missing_tracker_package_is_one_line_naming_it(name, monkeypatch):
    module = {"tensorboard": "torch.utils.tensorboard"}.get(name, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(UserError) as e:
        check_backends(name)
    assert str(e.value) == f"--report-to {name} needs the {name} package: pip install {name}"


def test_a_missing_tracker_stops_the_run_before_anything_is_written(
    qwen2_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)
    data = write_json(tmp_path / "rows.json", overfit_rows(4))
    with pytest.raises(UserError, match="pip install wandb"):
        train(tiny_config(qwen2_dir, data, tmp_path / "out", report_to="wandb"))
    assert not (tmp_path / "out" / "train_args.json").exists()


def test_tensorboard_events_hold_the_same_values_as_metrics_jsonl(qwen2_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_json(tmp_path / "rows.json", overfit_rows(8))
    out = tmp_path / "out"
    train(tiny_config(qwen2_dir, data, out, max_steps=4, val_size=2, eval_every=2,
                      report_to="tensorboard"))  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for kind, field in [("train", "loss"), ("train", "lr"), ("train", "grad_norm"),
                        ("eval", "val_loss")]:  # fmt: skip
        logged = [(e.step, e.value) for e in events.Scalars(f"{kind}/{field}")]
        expected = [(r["step"], r[field]) for r in records if r["kind"] == kind]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    settings = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard"' in settings and '"max_steps": 4' in settings
