"""Preparing the training set: compact storage, the cache, counted skips, cut answers."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

import lora.data.prepare as prepare_module
from conftest import ROOT, write_json
from lora.data.prepare import encode_all, prepare_data
from lora.data.prompt import IGNORE_INDEX, PromptFormat
from lora.data.records import Sample, Turn
from lora.data.tokenized import TokenizedSet
from lora.train.config import TrainConfig

ROWS = [
    {"instruction": f"问题{i}：头痛怎么办？", "output": "注意休息，多喝水。" * (1 + i % 3)}
    for i in range(12)
]


@pytest.fixture
def tok(qwen2_dir):
    return AutoTokenizer.from_pretrained(str(qwen2_dir))


def config(tmp_path, **kw):
    data = kw.pop("data", None) or write_json(tmp_path / "rows.json", ROWS)
    base = dict(data=str(data), cache_dir=str(tmp_path / "cache"), progress=False, max_len=64)
    return TrainConfig(**(base | kw))


def run(cfg, tok, fmt=None):
    lines = []
    train, val, summary = prepare_data(cfg, tok, fmt or PromptFormat("chat"), lines.append)
    return train, val, summary, lines


def same_rows(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
        for x, y in zip(a, b)
    )


def test_rows_are_int32_arrays_in_one_flat_buffer(tmp_path, tok):
    train, _, summary, _ = run(config(tmp_path, cache=False), tok)
    assert train.input_ids.dtype == np.int32 and train.labels.dtype == np.int32
    assert len(train) == 12 and list(train.lengths) == [len(r.input_ids) for r in train]
    assert train.offsets[-1] == len(train.input_ids) == summary["train"]["tokens"]
    assert summary["prepare_rows_per_s"] > 0


def test_second_run_loads_the_cache_memory_mapped_and_any_setting_change_misses(tmp_path, tok):
    first, _, s1, _ = run(config(tmp_path), tok)
    second, _, s2, lines = run(config(tmp_path), tok)
    assert any("loaded from the cache" in line for line in lines)
    assert isinstance(second.input_ids, np.memmap) and same_rows(first, second)
    assert s2["train"] == s1["train"]
    for change in ({"max_len": 32}, {"columns": "prompt=instruction,response=output"}):
        _, _, _, lines = run(config(tmp_path, **change), tok)
        assert not any("loaded from the cache" in line for line in lines), change
    _, _, _, lines = run(config(tmp_path), tok, PromptFormat("chat", system="你是医生。"))
    assert not any("loaded from the cache" in line for line in lines)


def test_editing_the_data_file_invalidates_the_cache(tmp_path, tok):
    run(config(tmp_path), tok)
    edited = write_json(tmp_path / "rows.json", ROWS[:5])
    train, _, _, lines = run(config(tmp_path, data=edited), tok)
    assert len(train) == 5 and not any("loaded from the cache" in line for line in lines)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta"])
def test_a_corrupt_or_partial_cache_is_rebuilt_never_trusted(tmp_path, tok, damage):
    mapped, _, summary, _ = run(config(tmp_path), tok)
    fresh = TokenizedSet(*(np.array(a) for a in (mapped.input_ids, mapped.labels, mapped.offsets)))
    del mapped  # its pages are the files damaged below
    entry = tmp_path / "cache" / summary["cache"].rsplit("/", 1)[-1]
    ids = entry / "train.input_ids.npy"
    raw = ids.read_bytes()
    if damage == "truncate":
        ids.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        ids.write_bytes(raw[:-4] + bytes(b ^ 0xFF for b in raw[-4:]))
    else:
        (entry / "meta.json").unlink()
    again, _, _, lines = run(config(tmp_path), tok)
    assert any("corrupt or partial" in line and "rebuilding" in line for line in lines)
    assert same_rows(fresh, again)
    _, _, _, lines = run(config(tmp_path), tok)  # the rebuilt entry is good
    assert any("loaded from the cache" in line for line in lines)


def test_no_cache_writes_nothing(tmp_path, tok):
    run(config(tmp_path, cache=False), tok)
    assert not (tmp_path / "cache").exists()


def test_a_cut_answer_is_counted_and_can_be_dropped(tmp_path, tok):
    long_row = {"instruction": "头痛怎么办？", "output": "注意休息，多喝水。" * 30}
    data = write_json(tmp_path / "long.json", ROWS[:3] + [long_row])
    train, _, summary, lines = run(config(tmp_path, data=data, cache=False), tok)
    assert summary["train"]["truncated_answer"] == 1 and len(train) == 4
    assert any("(answer cut)" in line for line in lines)
    train, _, summary, _ = run(config(tmp_path, data=data, cache=False, drop_cut_answers=True), tok)
    assert summary["train"]["dropped_answer_cut"] == 1 and len(train) == 3


def test_rows_whose_answer_cannot_be_located_are_skipped_and_counted(tok):
    broken = AutoTokenizer.from_pretrained(tok.name_or_path)
    # A template whose generation prompt is not where answers go: nothing can be supervised.
    broken.chat_template = (
        "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    samples = [Sample((Turn("问", "答"),)), Sample((Turn("问2", "答2"),))]
    data, stats = encode_all(samples, PromptFormat("chat"), broken, 64)
    assert len(data) == 0
    assert stats["skipped"] == {"the chat template does not render the answer after its prompt": 2}


def test_worker_processes_give_the_same_rows_as_one_process(tok, monkeypatch):
    samples = [Sample((Turn(f"问题{i}", "回答。" * (i % 7 + 1)),)) for i in range(50)]
    monkeypatch.setattr(prepare_module, "CHUNK", 8)
    serial, s1 = encode_all(samples, PromptFormat("chat"), tok, 32)
    monkeypatch.setattr(prepare_module, "worker_count", lambda n: 2)
    parallel, s2 = encode_all(samples, PromptFormat("chat"), tok, 32)
    assert same_rows(serial, parallel) and s1 == s2


def test_the_tokenizing_bar_leaves_no_line_behind(tok, monkeypatch, capsys):
    """The bar shows while it works (after 2 s) and leaves nothing: the summary's "prepared N
    rows" line is the one line that says it is done. It used to print its 100% line twice."""
    samples = [Sample((Turn(f"问题{i}", "回答。"),)) for i in range(40)]
    monkeypatch.setattr(prepare_module, "CHUNK", 10)
    monkeypatch.setattr(prepare_module, "worker_count", lambda n: 0)  # one chunk after another
    slow = prepare_module.encode_chunk

    def encode_slowly(*args, **kwargs):
        time.sleep(0.7)  # 4 chunks: past the bar's 2 s delay
        return slow(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "encode_chunk", encode_slowly)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    encode_all(samples, PromptFormat("chat"), tok, 32, progress=True)
    printed = capsys.readouterr().err
    assert "tokenizing" in printed  # it was shown while it worked
    screen = [line.split("\r")[-1].strip() for line in printed.split("\n")]  # what stays visible
    assert [line for line in screen if line] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_signal_during_data_preparation_ends_without_worker_tracebacks(qwen2_dir, tmp_path, sig):
    """Killed while its tokenizer workers run, train.py ends as an interrupt (SIGTERM) or at once
    (SIGKILL): the workers end with it, and none prints a BrokenPipeError traceback."""
    rows = "".join(f"问题{i}：头痛发热怎么办？,注意休息，多喝水。第{i}条。\n" for i in range(24000))
    data = tmp_path / "big.csv"
    data.write_text("question,answer\n" + rows, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--model", str(qwen2_dir), "--data", str(data),
         "--no-cache", "--output", str(tmp_path / "out"), "--max-steps", "1", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    workers = wait_for_children(proc.pid)
    assert workers, "the workers never started"
    time.sleep(0.5)  # inside their first chunks
    os.kill(proc.pid, getattr(signal, sig))
    _, stderr = proc.communicate(timeout=120)  # its end: every worker has closed the pipe
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    if sig == "SIGTERM":
        assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers)


def wait_for_children(pid: int, timeout: float = 120) -> list[int]:
    """The child processes of `pid` once it has some (its worker pool), from /proc."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return []
        children = []
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        if children:
            return children
        time.sleep(0.05)
    return []


def test_shared_system_prompt_of_the_rows_is_recorded_for_inference(tmp_path, tok):
    rows = [dict(r, system="你是一名中医。") for r in ROWS[:3]] + [ROWS[3]]
    fmt = PromptFormat("chat")
    train, _, summary, lines = run(
        config(tmp_path, data=write_json(tmp_path / "s.json", rows)), tok, fmt
    )
    assert fmt.data_system == "你是一名中医。" and fmt.system is None
    assert any("share a system prompt" in line for line in lines)
    assert "你是一名中医。" not in tok.decode(train[3].input_ids)  # the row without one keeps none
    fmt2 = PromptFormat("chat")  # the cache restores it too
    run(config(tmp_path, data=tmp_path / "s.json"), tok, fmt2)
    assert fmt2.data_system == "你是一名中医。"


def test_tokenized_set_round_trips_and_rejects_arrays_that_do_not_fit(tmp_path):
    ids = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]
    labels = [np.array([IGNORE_INDEX, 2, 3], np.int32), np.array([IGNORE_INDEX, 5], np.int32)]
    ds = TokenizedSet.build(ids, labels, [[3, 2]])
    ds.save(tmp_path, "x")
    back = TokenizedSet.load(tmp_path, "x")
    assert [r.input_ids.tolist() for r in back] == [[1, 2, 3], [4, 5]]
    assert back[-1].labels.tolist() == [IGNORE_INDEX, 5]
    with pytest.raises(IndexError):
        back[2]
    np.save(tmp_path / "x.offsets.npy", np.array([0, 3, 9], np.int64))
    with pytest.raises(ValueError, match="do not fit"):
        TokenizedSet.load(tmp_path, "x")


def test_reasoning_rows_turn_thinking_on_for_a_qwen3_template_and_hit_the_cache(
    tmp_path, tiny_models
):
    tok3 = AutoTokenizer.from_pretrained(str(tiny_models["qwen3"]))
    rows = [{"Question": "头痛？", "Complex_CoT": "想一想。", "Response": "休息。"}]
    data = tmp_path / "cot.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    fmt = PromptFormat("chat")
    run(config(tmp_path, data=data), tok3, fmt)
    assert fmt.enable_thinking is True
    again = PromptFormat("chat")  # the cache key is of the inputs, taken before the switch
    _, _, _, lines = run(config(tmp_path, data=data), tok3, again)
    assert again.enable_thinking is True and any("loaded from the cache" in x for x in lines)
