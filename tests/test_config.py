"""One source of settings: flags generated from TrainConfig, --config files, precedence."""

import json
import re
import subprocess
import sys
from dataclasses import asdict, fields

import pytest

from conftest import ROOT, overfit_rows, write_json
from lora.errors import UserError
from lora.train.config import TrainConfig
from train import build_parser, parse_config


def test_every_config_field_has_a_flag_with_the_same_default():
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    for f in fields(TrainConfig):
        assert defaults[f.name] == f.default, f.name
    assert set(defaults) - {f.name for f in fields(TrainConfig)} == {"config"}


def test_no_arguments_give_the_dataclass_defaults():
    assert parse_config([]) == TrainConfig()


def test_boolean_flags_turn_on_and_off():
    assert parse_config(["--dedup"]).dedup is True
    assert parse_config(["--no-progress"]).progress is False
    assert parse_config(["--no-group-by-length"]).group_by_length is False


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sets_fields_and_the_command_line_overrides_it(tmp_path, suffix):
    settings = {"rank": 16, "lr": 1e-3, "targets": "all-linear", "progress": False, "val_size": 0.1}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    cfg = parse_config(["--config", str(path), "--rank", "4", "--progress"])
    assert (cfg.rank, cfg.lr, cfg.targets, cfg.val_size) == (4, 1e-3, "all-linear", 0.1)
    assert cfg.progress is True  # the flag beats the file's false


def test_yaml_keys_may_be_written_with_dashes_like_the_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max-len: 256\ngrad-accum: 2\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.max_len, cfg.grad_accum) == (256, 2)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("rnak: 8\n", "unknown setting(s) rnak"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("rank: [8\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_one_clear_error(tmp_path, text, needle):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_config(["--config", str(path)])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_a_finished_runs_train_args_json_reruns_the_same_settings(qwen2_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", overfit_rows(4))
    out = tmp_path / "first"
    argv = ["--model", str(qwen2_dir), "--data", str(data), "--output", str(out), "--max-steps", "1",
            "--batch-size", "2", "--rank", "4", "--targets", "all-linear", "--no-progress"]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    recorded = json.loads((out / "train_args.json").read_text())["args"]
    rerun = parse_config(
        ["--config", str(out / "train_args.json"), "--output", str(tmp_path / "second")]
    )
    assert asdict(rerun) == recorded | {"output": str(tmp_path / "second")}


def test_help_does_not_import_torch():
    code = "import sys, train; train.build_parser().format_help(); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.stdout.strip() == "False", p.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_configs(recipe):
    from lora.train.config import check_config

    cfg = parse_config(["--config", str(recipe)])
    check_config(cfg)  # raises UserError on any out-of-range value
    assert (ROOT / cfg.data).is_file()


def test_help_explains_several_data_files_trackers_and_early_stopping():
    import train

    text = " ".join(train.build_parser().format_help().split())
    for needle in [
        "several: a.json,b.jsonl:0.3 (weight = share of that file's rows per epoch, >1 repeats)",
        "for one of several files: b.csv:prompt=Q,response=A",
        "--report-to REPORT_TO also send metrics.jsonl's records and the settings to tensorboard, "
        "wandb and/or swanlab",
        "--early-stop EARLY_STOP stop after N validations without a lower validation loss",
    ]:
        assert needle in text, needle


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"grad_checkpointing": "no"}, "grad_checkpointing must be true or false, got 'no'"),
        ({"dedup": "false"}, "dedup must be true or false, got 'false'"),
        ({"rank": "8"}, "rank must be an integer, got '8'"),
        ({"rank": 8.5}, "rank must be an integer, got 8.5"),
        ({"lr": True}, "lr must be a number, got True"),
        ({"targets": 3}, "targets must be a string, got 3"),
    ],
)
def test_json_config_values_are_checked_against_each_settings_type(tmp_path, settings, needle):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_config(["--config", str(path)])


def test_yaml_booleans_are_yamls_own_words(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("grad_checkpointing: no\ndedup: yes\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.grad_checkpointing, cfg.dedup) == (False, True)


def test_trl_and_llama_factory_names_are_read_as_ours_and_said_once(tmp_path, capsys):
    path = tmp_path / "llamafactory.yaml"
    path.write_text(
        "model_name_or_path: /models/qwen\nlearning_rate: 1.0e-4\nnum_train_epochs: 2.0\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\nlora_rank: 16\n"
        "lora_alpha: 32\nlora_dropout: 0.1\nlora_target: all\ncutoff_len: 512\n"
        "output_dir: saves/qwen\nwarmup_ratio: 0.1\nbf16: true\n"
    )
    cfg = parse_config(["--config", str(path)])
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum) == (
        "/models/qwen",
        1e-4,
        2.0,
        2,
        8,
    )
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.max_len) == (
        16,
        32,
        0.1,
        "all-linear",
        512,
    )
    assert (cfg.output, cfg.warmup, cfg.precision) == ("saves/qwen", 0.1, "bf16")
    err = capsys.readouterr().err
    assert err.count("learning_rate as lr") == 1 and "lora_target as targets" in err


def test_trl_target_modules_list_and_a_clash_with_our_own_name(tmp_path):
    path = tmp_path / "trl.json"
    path.write_text(json.dumps({"target_modules": ["q_proj", "k_proj"], "max_seq_length": 256}))
    assert parse_config(["--config", str(path)]).targets == "q_proj,k_proj"
    path.write_text(json.dumps({"learning_rate": 1e-4, "lr": 2e-4}))
    with pytest.raises(UserError, match="learning_rate and lr both set lr"):
        parse_config(["--config", str(path)])


def test_an_unknown_key_gets_a_suggestion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 1e-4\ngrad_acum: 2\n")
    with pytest.raises(
        UserError,
        match=r"grad_acum \(did you mean grad_accum\?\), learning_rat \(did you mean lr\?\)",
    ):
        parse_config(["--config", str(path)])


def test_help_matches_what_the_readme_says():
    """--columns names every field it takes; a boolean shows one default, not two."""
    text = build_parser().format_help()
    assert "prompt, input, response, reasoning, system" in " ".join(text.split())
    assert "(default: keep" not in text
