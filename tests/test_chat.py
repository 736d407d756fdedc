"""Chat: turns from standard input, one per line, whether a terminal or a pipe holds them."""

import io

import pytest

from conftest import overfit_rows, run_script, tiny_config, write_json
from lora.infer.chat import chat
from lora.infer.generate import load_for_inference
from lora.infer.sampling import GenerationSettings
from lora.train.loop import train


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny model overfit on 8 rows: its greedy answers are the training answers."""
    tmp = tmp_path_factory.mktemp("chat")
    rows = overfit_rows(8)
    data = write_json(tmp / "rows.json", rows)
    train(tiny_config(tiny_models["qwen2"], data, tmp / "out", rank=16, alpha=32, batch_size=8,
                      lr=2e-2, max_steps=80))  # fmt: skip
    return tmp / "out", rows


def test_piped_questions_are_chat_turns_without_any_flag(trained):
    """`printf 'question\\n/exit\\n' | infer.py --adapter out/`: what the README shows."""
    adapter, rows = trained
    piped = f"{rows[0]['instruction']}\n{rows[1]['instruction']}\n/exit\n"
    p = run_script("infer.py", "--adapter", adapter, "--max-new-tokens", "40", input=piped)
    assert p.returncode == 0, p.stderr
    assert rows[0]["output"] in p.stdout and rows[1]["output"] in p.stdout
    assert "you>" not in p.stdout  # no terminal: no prompts between the answers


def test_the_end_of_the_input_ends_the_chat_and_reset_clears_the_history(trained, capsys):
    adapter, rows = trained
    loaded = load_for_inference(adapter)
    lines = io.StringIO(f"{rows[2]['instruction']}\n\n/reset\n{rows[3]['instruction']}\n")
    chat(loaded, GenerationSettings(max_new_tokens=40), lines)
    out, err = capsys.readouterr()
    assert rows[2]["output"] in out and rows[3]["output"] in out
    assert "history cleared" in err
