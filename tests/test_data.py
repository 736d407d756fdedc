"""Reading files: every container, encoding, row shape, and every bad-row reason, with counts."""

import json

import pytest

from conftest import SHARED
from lora.data.records import Turn, read_dataset
from lora.errors import UserError

ALPACA = [
    {
        "instruction": "使用中医知识正确回答适合这个病例的中成药。",
        "input": "肛门疼痛，痔疮，肛裂。",
        "output": "地榆槐角丸",
    },
    {"instruction": "有没有能够滋养肝肾、清热明目的中药。", "output": "杞菊地黄丸"},
]


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_alpaca_json_array(tmp_path):
    samples, report = read_dataset(
        write(tmp_path, "a.json", json.dumps(ALPACA, ensure_ascii=False))
    )
    assert report.container == "JSON array" and report.kept == 2
    assert samples[0].turns == (
        Turn("使用中医知识正确回答适合这个病例的中成药。", "地榆槐角丸", "肛门疼痛，痔疮，肛裂。"),
    )
    assert samples[1].turns[0].user_input == ""


def test_jsonl_is_detected_from_content_not_extension(tmp_path):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in ALPACA)
    samples, report = read_dataset(write(tmp_path, "data.json", text))
    assert report.container == "JSON Lines" and len(samples) == 2


def test_one_element_list_values_as_in_huatuo(tmp_path):
    rows = [{"instruction": ["头痛怎么办"], "input": "", "output": ["多休息。"]}]
    samples, _ = read_dataset(write(tmp_path, "h.json", json.dumps(rows, ensure_ascii=False)))
    assert samples[0].turns[0] == Turn("头痛怎么办", "多休息。")


@pytest.mark.parametrize(
    "encoding,bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("gb18030", b""), ("gbk", b"")]
)
def test_encodings(tmp_path, encoding, bom):
    text = json.dumps(ALPACA, ensure_ascii=False)
    samples, report = read_dataset(write(tmp_path, "e.json", bom + text.encode(encoding)))
    assert samples[0].turns[0].assistant == "地榆槐角丸"
    assert (
        report.encoding
        == {"utf-8": "utf-8-sig" if bom else "utf-8", "gb18030": "gb18030", "gbk": "gb18030"}[
            encoding
        ]
    )


def test_gb18030_csv_with_header(tmp_path):
    text = "department,title,ask,answer\n内科,高血压,高血压患者能吃党参吗？,可以适量服用。\n内科,头痛,头痛怎么办,注意休息。\n"
    samples, report = read_dataset(write(tmp_path, "c.csv", text, "gb18030"))
    assert report.encoding == "gb18030" and report.container == "CSV"
    assert [s.turns[0] for s in samples] == [
        Turn("高血压患者能吃党参吗？", "可以适量服用。"),
        Turn("头痛怎么办", "注意休息。"),
    ]


def test_damaged_utf8_names_file_and_byte_offset(tmp_path):
    raw = json.dumps(ALPACA, ensure_ascii=False).encode()
    at = len('[{"instruction": "使用中医知识'.encode())
    path = write(tmp_path, "bad.json", raw[:at] + b"\xff" + raw[at:])
    with pytest.raises(UserError) as e:
        read_dataset(path)
    assert "bad.json" in str(e.value) and f"offset {at}" in str(e.value)


def test_messages_and_sharegpt_multiturn_with_system(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "你是医生"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
        {
            "conversation": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "dangling"},
            ]
        },
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
    ]
    samples, report = read_dataset(
        write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in rows))
    )
    assert samples[0].system == "你是医生" and samples[0].turns == (
        Turn("q1", "a1"),
        Turn("q2", "a2"),
    )
    assert samples[1].turns == (Turn("q", "a"),)
    assert report.notes["trailing user turn without an answer dropped"] == 1
    assert samples[2].turns == (Turn("h", "g"),)
    assert report.schemas == {"messages": 2, "sharegpt": 1}


def test_columns_mapping_joins_columns(tmp_path):
    rows = [{"Question": "q", "Complex_CoT": "think", "Response": "answer"}]
    path = write(tmp_path, "r.json", json.dumps(rows))
    samples, _ = read_dataset(path, columns="prompt=Question,response=Complex_CoT+Response")
    assert samples[0].turns[0] == Turn("q", "think\n\nanswer")
    # Without a mapping, the well-known Question/Response pair is used, Complex_CoT as reasoning.
    assert read_dataset(path)[0][0].turns[0] == Turn("q", "answer", reasoning="think")
    mapped = "prompt=Question,reasoning=Complex_CoT,response=Response"
    assert read_dataset(path, columns=mapped)[0][0].turns[0] == Turn("q", "answer", "", "think")
    other = write(tmp_path, "o.json", json.dumps([{"Frage": "q", "Antwort": "a"}]))
    with pytest.raises(UserError, match="Frage, Antwort: map them with --columns"):
        read_dataset(other)


def test_columns_the_file_lacks_are_named_together_with_the_files_columns(tmp_path):
    """As for an unknown schema: a --columns mapping that names columns the file does not have
    lists the ones it has (the CSV's `ask`, not `question`)."""
    text = "department,title,ask,answer\n内科,高血压,能吃党参吗？,可以。\n内科,头痛,怎么办,休息。\n"
    path = write(tmp_path, "c.csv", text, "gb18030")
    with pytest.raises(UserError) as e:
        read_dataset(path, columns="prompt=question,response=answer_text")
    message = str(e.value)
    assert "no usable rows (2 missing column(s) question, answer_text)" in message
    assert message.endswith(
        "Its columns are department, title, ask, answer: name those in --columns"
    )


def test_every_bad_row_reason_is_counted_with_row_numbers(tmp_path):
    lines = [
        json.dumps(ALPACA[0], ensure_ascii=False),  # 1 ok
        "{not json",  # 2 malformed
        json.dumps({"instruction": "q", "output": ""}),  # 3 empty output
        json.dumps({"instruction": "q"}),  # 4 missing output
        json.dumps({"instruction": "q", "output": None}),  # 5 null
        json.dumps({"instruction": "q", "output": 42}),  # 6 non-string
        json.dumps({"foo": "bar"}),  # 7 unknown schema
        json.dumps(
            {
                "conversations": [
                    {"from": "gpt", "value": "a"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "b"},
                ]
            }
        ),  # 8 order
        json.dumps(
            {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "b"}]}
        ),  # 9 empty turn
        json.dumps(ALPACA[0], ensure_ascii=False),  # 10 duplicate of 1
    ]
    samples, report = read_dataset(write(tmp_path, "bad.jsonl", "\n".join(lines)))
    assert report.rows_read == 10 and report.kept == 2 and len(samples) == 2
    assert report.skipped == {
        "malformed JSON line": 1,
        "missing or empty output": 3,
        "null or non-string value": 1,
        "unknown schema": 1,
        "bad turn order (expected user/assistant alternating)": 1,
        "empty turn": 1,
    }
    assert report.skipped_rows["missing or empty output"] == [3, 4, 5]
    assert report.duplicates == 1
    text = "\n".join(report.lines())
    assert "malformed JSON line (first rows: 2)" in text and "duplicates: 1" in text

    deduped, r2 = read_dataset(tmp_path / "bad.jsonl", dedup=True)
    assert len(deduped) == 1 and r2.duplicates_dropped == 1
    with pytest.raises(UserError, match="row 2: malformed JSON line"):
        read_dataset(tmp_path / "bad.jsonl", strict=True)


def test_nothing_usable_is_an_error_with_reasons(tmp_path):
    path = write(tmp_path, "x.jsonl", json.dumps({"instruction": "q", "output": ""}))
    with pytest.raises(UserError, match="no usable rows.*missing or empty output"):
        read_dataset(path)


def test_invalid_json_array_reports_line_and_column(tmp_path):
    with pytest.raises(UserError, match="line 2, column"):
        read_dataset(write(tmp_path, "x.json", '[\n{"instruction": }]'))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_dataset(tmp_path / "nope.json")


def test_questions_mode_keeps_rows_without_answers(tmp_path):
    rows = [{"instruction": "q"}, {"messages": [{"role": "user", "content": "a"}]}]
    samples, _ = read_dataset(
        write(tmp_path, "q.jsonl", "\n".join(json.dumps(r) for r in rows)), questions=True
    )
    assert [s.turns[-1] for s in samples] == [Turn("q", ""), Turn("a", "")]


SHARED_FILES = {
    "medicalgpt_medical_sft_1k/medical_sft_1K_format.jsonl": 1000,
    "medicalgpt_sharegpt_zh_1k/sharegpt_zh_1K_format.jsonl": 1000,
    "zhongjing_huatuo26m_test/huatuo26M_test.json": 6000,
    "disc_medllm_sft_examples/test_examples.jsonl": 163,
    "toyhom_cmd_im/样例_内科5000-6000.csv": 7644,
}


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_real_shared_datasets_read_with_every_row_accounted_for(name):
    path = SHARED / "data" / name
    if not path.is_file():
        pytest.skip("../shared is not available")
    samples, report = read_dataset(path)
    assert report.rows_read == SHARED_FILES[name]
    assert report.kept + sum(report.skipped.values()) == report.rows_read
    assert report.kept > 0.5 * report.rows_read
    if name.endswith(".csv"):
        assert report.encoding == "gb18030" and report.duplicates >= 378


def test_malformed_csv_row_and_tsv(tmp_path):
    text = "question,answer\nq1,a1\nq2,a2,extra\nq3,a3\n"
    samples, report = read_dataset(write(tmp_path, "m.csv", text))
    assert len(samples) == 2 and report.skipped == {"malformed CSV row (wrong number of fields)": 1}
    assert report.skipped_rows["malformed CSV row (wrong number of fields)"] == [2]
    samples, report = read_dataset(write(tmp_path, "t.tsv", "prompt\tresponse\n问\t答\n"))
    assert report.container == "TSV" and samples[0].turns[0] == Turn("问", "答")


def test_unknown_role_and_conversation_without_answer_are_counted(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    samples, report = read_dataset(
        write(tmp_path, "r.jsonl", "\n".join(json.dumps(r) for r in rows))
    )
    assert len(samples) == 1
    assert report.skipped == {"unknown role 'tool'": 1, "no assistant turn": 1}


def test_input_output_pair_without_instruction_is_a_flat_pair(tmp_path):
    rows = [{"input": "头痛怎么办", "output": "注意休息。"}, {"instruction": "i", "output": "o"}]
    samples, report = read_dataset(write(tmp_path, "io.json", json.dumps(rows, ensure_ascii=False)))
    assert [s.turns[0] for s in samples] == [Turn("头痛怎么办", "注意休息。"), Turn("i", "o")]
    assert report.skipped == {} and report.schemas == {"input/output": 1, "alpaca": 1}


def test_messages_keep_reasoning_content_and_per_row_system(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "你是医生。"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning_content": "想一想"},
            ]
        },
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    samples, _ = read_dataset(write(tmp_path, "m.json", json.dumps(rows, ensure_ascii=False)))
    assert samples[0].turns == (Turn("q", "a", reasoning="想一想"),)
    assert [s.system for s in samples] == ["你是医生。", None]
