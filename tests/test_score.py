"""--score: reference likelihood equals the training loss, overlap equals the libraries', health counts."""

import json
import os
import subprocess
import sys

import pytest
import sacrebleu

from conftest import ROOT, overfit_rows, write_json
from lora.data.records import read_dataset
from lora.infer.answers import answer_file, read_answered
from lora.infer.generate import GenerationSettings, load_for_inference
from lora.infer.score import health, overlap, reference_nll
from lora.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def trained_with_val(tiny_models, tmp_path_factory):
    """A tiny adapter trained a few steps with --val-data: its final val loss is our yardstick."""
    tmp = tmp_path_factory.mktemp("scored")
    rows = overfit_rows(8)
    data = write_json(tmp / "rows.json", rows)
    val = write_json(tmp / "val.json", rows[:5] + [{"instruction": "没有参考答案的问题"}])
    cfg = TrainConfig(model=str(tiny_models["qwen2"]), data=str(data), val_data=str(val),
                      output=str(tmp / "out"), targets="all-linear", rank=8, alpha=16, dropout=0.0,
                      batch_size=4, grad_accum=1, lr=1e-2, warmup=0, max_steps=6, progress=False,
                      seed=0)  # fmt: skip
    result = train(cfg)
    return tmp / "out", val, result.val_loss, rows


def test_reference_nll_equals_the_training_validation_loss(trained_with_val):
    adapter, val, val_loss, _ = trained_with_val
    samples, _ = read_dataset(val, questions=True)
    nll = reference_nll(load_for_inference(adapter), samples, batch_size=2)
    assert nll["rows"] == 5  # the row without a reference has no likelihood
    assert nll["nll"] == pytest.approx(val_loss, abs=1e-5)


def test_bleu_and_rouge_on_hand_made_pairs():
    same = overlap(["可以使用地榆槐角丸。"], ["可以使用地榆槐角丸。"])
    assert same == pytest.approx(
        {"bleu4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}, abs=1e-4
    )
    disjoint = overlap(["今天天气很好"], ["肛门疼痛痔疮"])
    assert disjoint == pytest.approx(
        {"bleu4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}, abs=1e-6
    )
    answers, refs = (
        ["可以使用六味地黄丸。滋阴补肾。", "可以使用地榆槐角丸。"],
        ["可以使用六味地黄丸。", "可以使用痔疮膏。"],
    )
    partial = overlap(answers, refs)
    assert partial["bleu4"] == pytest.approx(
        sacrebleu.corpus_bleu(answers, [refs], tokenize="zh").score
    )
    assert 0 < partial["rouge-1"] < 100 and partial["rouge-2"] < partial["rouge-1"]


def test_health_counts_cut_and_empty_answers():
    h = health(["好", "", "很长的回答"], ["eos", "eos", "length"], ["参考"])
    assert h["cut_at_max_new_tokens"] == pytest.approx(1 / 3)
    assert h["empty"] == pytest.approx(1 / 3)
    assert h["answer_chars_mean"] == pytest.approx(2.0) and h["reference_chars_mean"] == 2.0


def test_answers_are_resumed_and_a_torn_last_line_is_dropped(trained_with_val, tmp_path):
    adapter, val, _, _ = trained_with_val
    samples, _ = read_dataset(val, questions=True)
    loaded = load_for_inference(adapter)
    out = tmp_path / "answers.jsonl"
    settings = GenerationSettings(max_new_tokens=8)
    first = answer_file(loaded, samples[:2], settings, batch_size=2, output=out)
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"row": 3, "answ')  # a kill in the middle of a write
    calls = []
    import lora.infer.answers

    original = lora.infer.answers.generate_batch
    lora.infer.answers.generate_batch = lambda loaded, asks, s, *rest: (
        calls.append(len(asks)) or original(loaded, asks, s, *rest)
    )
    try:
        records = answer_file(loaded, samples, settings, batch_size=8, output=out)
    finally:
        lora.infer.answers.generate_batch = original
    assert calls == [len(samples) - 2]  # only the rows not answered yet
    assert records[:2] == first and [r["row"] for r in records] == [s.row for s in samples]
    assert sorted(read_answered(out)) == [s.row for s in samples]
    assert all(r["stop_reason"] in ("eos", "length") for r in records)
    assert any(r["stop_reason"] == "length" for r in records)  # 8 tokens cut the untrained question


def test_answering_shows_which_model_answers_and_its_tokens_as_they_come(trained_with_val, capsys):
    adapter, val, _, _ = trained_with_val
    samples, _ = read_dataset(val, questions=True)
    loaded = load_for_inference(adapter)
    capsys.readouterr()
    records = answer_file(loaded, samples[:1], GenerationSettings(max_new_tokens=8), batch_size=1,
                          output=None, compare=True)  # fmt: skip
    bar = capsys.readouterr().err
    assert "fine-tuned model: token 0/8" in bar and "base model: token 0/8" in bar
    # The count grows with each generated token (every step of the batch), up to the last one.
    assert f"fine-tuned model: token {records[0]['new_tokens']}/8" in bar
    assert "1/1" in bar and "row" in bar  # the bar counts rows, not batches


def test_resumed_answers_continue_only_the_same_adapter_settings_and_questions(
    trained_with_val, tmp_path
):
    from dataclasses import replace

    from lora.errors import UserError

    adapter, val, _, _ = trained_with_val
    samples, _ = read_dataset(val, questions=True)
    loaded = load_for_inference(adapter)
    out = tmp_path / "answers.jsonl"
    settings = GenerationSettings(max_new_tokens=4)
    first = answer_file(loaded, samples[:2], settings, batch_size=2, output=out)
    assert first[0]["generated_by"]["adapter_sha256"] == loaded.adapter_sha256
    assert first[0]["generated_by"]["max_new_tokens"] == 4
    assert answer_file(loaded, samples[:2], settings, batch_size=2, output=out) == first

    with pytest.raises(UserError, match=r"max_new_tokens was 4, now 6\).*delete it to start over"):
        answer_file(loaded, samples, GenerationSettings(max_new_tokens=6), 2, out)
    other = replace(loaded, adapter_sha256="f" * 64)  # another adapter's weights
    with pytest.raises(UserError, match="another adapter or other settings .adapter_sha256 was"):
        answer_file(other, samples, settings, 2, out)
    renamed = [replace(s, turns=(replace(s.turns[0], user="另一个问题"),)) for s in samples]
    with pytest.raises(UserError, match="row .* answers another question"):
        answer_file(loaded, renamed, settings, 2, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    old = [json.loads(line) for line in lines]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "generated_by"}) + "\n"
                           for r in old), encoding="utf-8")  # fmt: skip
    with pytest.raises(UserError, match="written by an older infer.py"):
        answer_file(loaded, samples, settings, 2, out)


def test_cli_resuming_answers_with_other_settings_is_one_line(trained_with_val, tmp_path):
    adapter, val, _, _ = trained_with_val
    out = tmp_path / "a.jsonl"

    def answer(tokens):
        return subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", str(adapter),
                               "--file", str(val), "--output", str(out), "--max-new-tokens", tokens],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip

    assert answer("4").returncode == 0
    before = out.read_bytes()
    p = answer("5")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "max_new_tokens was 4, now 5" in p.stderr and "delete it to start over" in p.stderr
    assert out.read_bytes() == before  # nothing mixed in


def test_cli_score_writes_score_json_for_both_models(trained_with_val, tmp_path):
    adapter, val, _, _ = trained_with_val
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "a.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", str(adapter), "--file", str(val),
                        "--score", "--compare", "--output", str(out), "--max-new-tokens", "12"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = json.loads(
        (tmp_path / "a.score.json").read_text(encoding="utf-8")
    )  # named after --output
    assert report["rows"] == 6 and report["rows_without_reference"] == 1
    tuned, base = report["fine_tuned"], report["base"]
    # Training lowered the loss on these rows: the adapter explains the references better.
    assert tuned["reference_likelihood"]["nll"] < base["reference_likelihood"]["nll"]
    assert {"bleu4", "rouge-1", "rouge-2", "rouge-l"} <= tuned["overlap"].keys()
    assert "reference NLL / token" in p.stderr and "fine_tuned" in p.stderr


def test_score_without_file_is_a_clear_error(trained_with_val):
    adapter = trained_with_val[0]
    p = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", str(adapter), "--prompt", "x", "--score"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "--score needs --file" in p.stderr and "Traceback" not in p.stderr


def test_output_in_a_new_directory_is_created_before_any_answer(trained_with_val, tmp_path):
    adapter, val, _, _ = trained_with_val
    samples, _ = read_dataset(val, questions=True)
    out = tmp_path / "new" / "dir" / "answers.jsonl"
    answer_file(load_for_inference(adapter), samples[:1], GenerationSettings(max_new_tokens=4),
                batch_size=1, output=out)  # fmt: skip
    assert sorted(read_answered(out)) == [samples[0].row]
