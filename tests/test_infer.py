"""infer.py: answers after training, merge, export, compare, file, chat, bad inputs."""

import json

import pytest
import torch

from conftest import overfit_rows, run_script, tiny_config, write_json
from lora.train.loop import train


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny model overfit on 8 rows: its greedy answers are the training answers."""
    tmp = tmp_path_factory.mktemp("trained")
    rows = overfit_rows(8)
    data = write_json(tmp / "rows.json", rows)
    cfg = tiny_config(tiny_models["qwen2"], data, tmp / "out", rank=16, alpha=32, batch_size=8,
                      lr=2e-2, max_steps=80)  # fmt: skip
    train(cfg)
    return tmp / "out", rows


def infer(*args, stdin=None):
    return run_script("infer.py", *args, input=stdin, timeout=300)


def test_prompt_gives_the_training_answer_and_stops(trained):
    adapter, rows = trained
    p = infer(
        "--adapter", str(adapter), "--prompt", rows[1]["instruction"], "--max-new-tokens", "100"
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == rows[1]["output"]
    assert "without an end token" not in p.stderr


def test_merge_gives_the_same_greedy_tokens(trained):
    from lora.infer.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
        single_turn,
    )
    from lora.inject import merge_lora

    adapter, rows = trained
    loaded = load_for_inference(adapter)
    questions = [single_turn(r["instruction"]) for r in rows[:4]]
    settings = GenerationSettings(max_new_tokens=40)
    unmerged = generate_batch(loaded, questions, settings)
    merge_lora(loaded.model)
    merged = generate_batch(loaded, questions, settings)
    assert [r["answer"] for r in merged] == [r["answer"] for r in unmerged]
    assert [r["answer"] for r in unmerged] == [
        r["output"] for r in rows[:4]
    ]  # batched, left-padded


def test_export_loads_with_plain_transformers_and_matches(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora.data.prompt import encode_prompt
    from lora.infer.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
        single_turn,
    )

    adapter, rows = trained
    p = infer("--adapter", str(adapter), "--export", str(tmp_path / "merged"))
    assert p.returncode == 0, p.stderr
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in exported.named_parameters())
    loaded = load_for_inference(adapter)
    question = single_turn(rows[2]["instruction"])
    ids = torch.tensor([encode_prompt(question, loaded.fmt, loaded.tokenizer)])
    with torch.no_grad():
        torch.testing.assert_close(
            exported(ids).logits, loaded.model(ids).logits, atol=1e-4, rtol=0
        )
    out = exported.generate(
        ids, max_new_tokens=40, do_sample=False
    )  # stop ids come from its generation_config
    text = loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    (ours,) = generate_batch(loaded, [question], GenerationSettings(max_new_tokens=40))
    assert text.strip() == ours["answer"] == rows[2]["output"]


def test_compare_shows_base_and_fine_tuned(trained):
    adapter, rows = trained
    p = infer(
        "--adapter",
        str(adapter),
        "--prompt",
        rows[0]["instruction"],
        "--compare",
        "--max-new-tokens",
        "30",
    )
    assert p.returncode == 0, p.stderr
    base, tuned = p.stdout.split("=== fine-tuned ===")
    assert "=== base model ===" in base and tuned.strip() == rows[0]["output"]
    assert rows[0]["output"] not in base


def test_file_writes_one_line_per_question(trained, tmp_path):
    adapter, rows = trained
    questions = write_json(tmp_path / "q.json", rows[:3] + [{"instruction": "没有参考答案的问题"}])
    p = infer(
        "--adapter",
        str(adapter),
        "--file",
        str(questions),
        "--output",
        str(tmp_path / "a.jsonl"),
        "--max-new-tokens",
        "30",
        "--batch-size",
        "3",
        "--compare",
    )
    assert p.returncode == 0, p.stderr
    lines = [
        json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(lines) == 4
    assert {"prompt", "reference", "answer", "base_answer"} <= lines[0].keys()
    assert [row["answer"] for row in lines[:3]] == [r["output"] for r in rows[:3]]
    assert lines[3]["reference"] is None


def test_chat_through_standard_input_keeps_history_and_reset(trained):
    adapter, rows = trained
    p = infer(
        "--adapter",
        str(adapter),
        "--chat",
        "--max-new-tokens",
        "30",
        stdin=f"{rows[0]['instruction']}\n/reset\n{rows[1]['instruction']}\n/exit\n",
    )
    assert p.returncode == 0, p.stderr
    assert rows[0]["output"] in p.stdout and rows[1]["output"] in p.stdout
    assert "history cleared" in p.stderr
    assert "stopped at --max-new-tokens" not in p.stderr  # both answers end with an end token


def test_chat_flags_an_answer_cut_at_max_new_tokens(trained):
    adapter, rows = trained
    p = infer("--adapter", str(adapter), "--chat", "--max-new-tokens", "2",
              stdin=f"{rows[0]['instruction']}\n/exit\n")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "[the answer: stopped at --max-new-tokens 2 without an end token]" in p.stderr


@pytest.mark.parametrize(
    "make_args,needle",
    [
        (lambda a, t: ["--adapter", str(t / "missing")], "does not exist"),
        (lambda a, t: ["--adapter", str(t)], "adapter_config.json is missing"),
        (
            lambda a, t: ["--adapter", str(a / "adapter_model.safetensors"), "--prompt", "x"],
            "adapter_model.safetensors is a file, not an adapter directory",
        ),
        (
            lambda a, t: ["--adapter", str(a), "--file", str(write_json(t / "e.json", []))],
            "no usable rows",
        ),
        (
            lambda a, t: ["--adapter", str(a), "--prompt", "很长" * 3000],
            "longer than the model's context",
        ),
    ],
)
def test_bad_inputs_are_clear_messages(trained, tmp_path, make_args, needle):
    adapter, _ = trained
    p = infer(*make_args(adapter, tmp_path), stdin="")
    assert p.returncode != 0 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    from tools.tiny_qwen import build_tiny_model

    adapter, _ = trained
    other = build_tiny_model(tmp_path / "other", "qwen2", ["x y"], hidden_size=96)
    p = infer("--adapter", str(adapter), "--model", str(other), "--prompt", "hi")
    assert p.returncode == 2 and "hidden_size" in p.stderr and "Traceback" not in p.stderr


def test_export_that_fails_mid_write_leaves_no_half_written_directory(
    trained, tmp_path, monkeypatch
):
    import errno

    import lora.export.merged
    from lora.export.merged import export_merged

    adapter, _ = trained
    real_load_tokenizer = lora.export.merged.load_tokenizer

    def tokenizer_on_a_full_disk(*args, **kwargs):
        tokenizer = real_load_tokenizer(*args, **kwargs)

        def full_disk(*a, **k):  # the model's weights are written by then; the tokenizer fails
            raise OSError(errno.ENOSPC, "No space left on device")

        tokenizer.save_pretrained = full_disk
        return tokenizer

    monkeypatch.setattr(lora.export.merged, "load_tokenizer", tokenizer_on_a_full_disk)
    target = tmp_path / "exports" / "merged"
    with pytest.raises(OSError):
        export_merged(adapter, target, log=lambda *a: None)
    assert not target.exists() and list((tmp_path / "exports").iterdir()) == []


def test_every_generation_flag_has_help_and_the_settings_default():
    from dataclasses import asdict

    import infer
    from lora.infer.sampling import GenerationSettings

    parser = infer.build_parser()
    for name, value in asdict(GenerationSettings()).items():
        assert parser.get_default(name) == value, name
    group = next(g for g in parser._action_groups if g.title == "generation")
    for action in group._group_actions:
        assert action.help, action.option_strings
