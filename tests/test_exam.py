"""Multiple-choice exams (`infer.py --mcq`): every file shape, the letter probabilities, the
statistics, and an end-to-end check that planted knowledge is found exactly where it was planted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_script, tiny_config, write_json
from lora.data.exam import LETTERS, ExamReport, Question, read_exam, read_exam_file
from lora.errors import UserError
from lora.export.merged import export_merged
from lora.infer.exam import (
    ExamSettings,
    exam_report,
    letter_probabilities,
    mcnemar_exact,
    paired_difference,
    question_text,
    wilson,
)
from lora.infer.generate import load_for_inference
from lora.train.loop import train

QUESTIONS = [  # (question, options, answer index)
    (f"第{i}题：哪一味药{kind}？", (f"甲{i}", f"乙{i}", f"丙{i}", f"丁{i}"), i % 4)
    for i, kind in enumerate(["清热", "解表", "补气", "活血", "安神", "止咳", "利水", "消食"])
]


def as_questions(rows=QUESTIONS, subject="s") -> list[Question]:
    return [Question(subject, str(i), q, opts, a) for i, (q, opts, a) in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Reading: every shape gives the same questions


def write_shapes(tmp_path) -> dict:
    rows = QUESTIONS[:3]
    csv_index = ",Question,A,B,C,D,Answer\n" + "".join(
        f"{i},{q},{','.join(o)},{LETTERS[a]}\n" for i, (q, o, a) in enumerate(rows)
    )
    csv_plain = "question,a,b,c,d,answer\n" + "".join(
        f"{q},{','.join(o)},{LETTERS[a].lower()}\n" for q, o, a in rows
    )
    letters = [{"question": q, **dict(zip("ABCD", o)), "answer": LETTERS[a]} for q, o, a in rows]
    medmcqa = [{"question": q, **dict(zip(("opa", "opb", "opc", "opd"), o)),
                "answer": ("opa", "opb", "opc", "opd")[a]} for q, o, a in rows]  # fmt: skip
    listed = [{"stem": q, "options": list(o), "answer": LETTERS[a]} for q, o, a in rows]
    files = {
        "index.csv": csv_index,
        "plain.csv": csv_plain,
        "letters.json": json.dumps(letters, ensure_ascii=False),
        "medmcqa.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in medmcqa),
        "listed.json": json.dumps(listed, ensure_ascii=False),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return {name: tmp_path / name for name in files}


def test_every_input_shape_parses_to_the_same_questions(tmp_path):
    expected = [(q, o, a) for q, o, a in QUESTIONS[:3]]
    for name, path in write_shapes(tmp_path).items():
        questions, report = read_exam([path])
        assert [(q.question, q.options, q.answer) for q in questions] == expected, name
        assert {q.subject for q in questions} == {path.stem} and report.rows == 3


def test_a_directory_in_cmmlu_layout_reads_its_test_folder(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    for folder in ("test", "dev"):
        for name, path in write_shapes(tmp_path / folder).items():
            path.rename(tmp_path / folder / "anatomy.csv") if name == "index.csv" else path.unlink()
    questions, _ = read_exam([tmp_path])
    assert {q.subject for q in questions} == {"anatomy"} and len(questions) == 3


def test_bad_rows_are_counted_by_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [
        {"question": "ok", "A": "x", "B": "y", "answer": "B"},
        {"question": "no answer", "A": "x", "B": "y"},
        {"question": "answer not offered", "A": "x", "B": "y", "answer": "E"},
        {"question": "one option", "A": "x", "answer": "A"},
        {"A": "x", "B": "y", "answer": "A"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = ExamReport()
    questions = read_exam_file(path, report)
    assert [q.question for q in questions] == ["ok"]
    assert report.skipped == {"answer missing or not an option": 2, "not 2-6 options": 1,
                              "no question": 1}  # fmt: skip
    assert "5 questions read, 1 kept" in report.lines()[0]


def test_a_file_in_no_exam_shape_is_one_line(tmp_path):
    path = write_json(tmp_path / "sft.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match="not a multiple-choice file"):
        read_exam([path])


# ---------------------------------------------------------------------------------------------
# Statistics, against values computed by hand


def test_wilson_interval_matches_the_hand_computed_one():
    lo, hi = wilson(8, 10)  # p = 0.8, z = 1.96: centre 0.71675, half-width 0.22658
    assert math.isclose(lo, 0.49016, abs_tol=1e-4) and math.isclose(hi, 0.94331, abs_tol=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_paired_difference_and_mcnemar_match_the_hand_computed_ones():
    # 50 questions: 10 right only after, 2 right only before, 20 right in both, 18 in neither.
    after = [True] * 10 + [False] * 2 + [True] * 20 + [False] * 18
    before = [False] * 10 + [True] * 2 + [True] * 20 + [False] * 18
    d = paired_difference(after, before)
    assert (d["improved"], d["worsened"]) == (10, 2) and math.isclose(d["difference"], 0.16)
    se = math.sqrt(12 - 64 / 50) / 50  # 0.065483
    assert math.isclose(d["ci95"][0], 0.16 - 1.959964 * se) and math.isclose(
        d["ci95"][1], 0.16 + 1.959964 * se
    )
    assert math.isclose(mcnemar_exact(10, 2), 2 * (1 + 12 + 66) / 4096)  # 0.03857
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_the_report_counts_right_answers_per_subject_and_overall():
    questions = as_questions()[:4]
    sure = lambda k: [1.0 if j == k else 0.0 for j in range(4)]  # noqa: E731
    runs = {"fine_tuned": [sure(q.answer) for q in questions[:3]] + [sure(0)],  # 3 of 4 right
            "base": [sure(0)] * 4}  # fmt: skip
    report = exam_report(questions, runs)
    assert report["overall"]["fine_tuned"]["correct"] == 3
    assert report["overall"]["base"]["correct"] == sum(q.answer == 0 for q in questions)
    assert report["overall"]["difference"]["improved"] == 2  # questions 1 and 2


# ---------------------------------------------------------------------------------------------
# The model's side: probabilities as a plain forward gives them; planted knowledge is found


@pytest.fixture(scope="module")
def planted(tiny_models, tmp_path_factory):
    """An adapter trained to answer the 8 exam questions, asked exactly as the exam asks."""
    tmp = tmp_path_factory.mktemp("exam")
    rows = [{"instruction": question_text(q), "output": LETTERS[q.answer]} for q in as_questions()]
    data = write_json(tmp / "rows.json", rows)
    train(tiny_config(tiny_models["qwen2"], data, tmp / "out", rank=16, alpha=32, batch_size=8,
                      lr=2e-2, max_steps=120))  # fmt: skip
    exam = tmp / "exam.jsonl"
    exam.write_text("".join(json.dumps({"question": q.question, **dict(zip(LETTERS, q.options)),
                    "answer": LETTERS[q.answer]}, ensure_ascii=False) + "\n" for q in as_questions()))  # fmt: skip
    return tmp / "out", exam


def test_letter_probabilities_equal_a_plain_transformers_forward(planted, tmp_path):
    adapter, _ = planted
    questions = as_questions()
    ours = letter_probabilities(load_for_inference(adapter), questions, ExamSettings(batch_size=3))
    merged = export_merged(adapter, tmp_path / "merged", log=lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    for q, p in zip(questions, ours):
        messages = [{"role": "user", "content": question_text(q)}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        letters = [tok.convert_tokens_to_ids(c) for c in LETTERS[:4]]
        torch.testing.assert_close(
            torch.tensor(p), torch.softmax(logits[letters], -1), atol=1e-5, rtol=0
        )


def test_planted_knowledge_is_found_and_a_permuted_key_loses_it(planted, tmp_path):
    adapter, exam = planted
    p = run_script(
        "infer.py", "--adapter", adapter, "--mcq", exam, "--compare", "--output", tmp_path / "r"
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "r" / "mcq.json").read_text())["subjects"]["overall"]
    assert report["fine_tuned"]["accuracy"] == 1.0 and report["base"]["accuracy"] < 0.75
    rows = [
        json.loads(line)
        for line in (tmp_path / "r" / "mcq-predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 8 and set(rows[0]["fine_tuned"]["probabilities"]) == set("ABCD")
    permuted = tmp_path / "permuted.jsonl"  # the same questions, every answer moved one letter on
    permuted.write_text("".join(
        json.dumps({**json.loads(line), "answer": LETTERS[(LETTERS.index(json.loads(line)["answer"]) + 1) % 4]},
                   ensure_ascii=False) + "\n" for line in exam.read_text().splitlines()))  # fmt: skip
    p = run_script("infer.py", "--adapter", adapter, "--mcq", permuted, "--output", tmp_path / "p")
    assert p.returncode == 0, p.stderr
    moved = json.loads((tmp_path / "p" / "mcq.json").read_text())["subjects"]["overall"]
    assert moved["fine_tuned"]["accuracy"] == 0.0


def test_shots_are_the_first_rows_of_the_subjects_dev_file_with_their_answers(tmp_path):
    from pathlib import Path

    from lora.data.exam import few_shot_examples
    from lora.infer.exam import exam_prompt

    for folder, rows in (("test", QUESTIONS[:2]), ("dev", QUESTIONS[4:8])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tcm.csv").write_text("Question,A,B,C,D,Answer\n" + "".join(
            f"{q},{','.join(o)},{LETTERS[a]}\n" for q, o, a in rows), encoding="utf-8")  # fmt: skip
    questions, _ = read_exam([tmp_path])
    shots = few_shot_examples(Path(questions[0].source), 2)
    assert [s.question for s in shots] == [QUESTIONS[4][0], QUESTIONS[5][0]]
    text = exam_prompt(questions[0], shots).turns[0].user
    assert text.startswith(question_text(shots[0], with_answer=True) + "\n\n")
    assert text.endswith(question_text(questions[0])) and text.count("答案：") == 3
    with pytest.raises(UserError, match="--shots 9: .* has only 4"):
        few_shot_examples(Path(questions[0].source), 9)
