"""Golden label tests: the supervised positions decode to exactly the answer plus its end token."""

import pytest
from transformers import AutoTokenizer

from conftest import real_tokenizer
from lora.data import Sample, Turn
from lora.prompt import (
    IGNORE_INDEX,
    PromptFormat,
    encode_prompt,
    encode_sample,
    resolve_template,
    truncate,
)

SINGLE = Sample(
    (
        Turn(
            "使用中医知识正确回答适合这个病例的中成药。",
            "地榆槐角丸。疏风凉血，泻热润燥。",
            "肛门疼痛，痔疮，肛裂。",
        ),
    )
)
MULTI = Sample(
    (Turn("头痛怎么办？", "注意休息，多喝水。"), Turn("还需要吃药吗？", "可以服用川芎茶调散。")),
    system="你是一名中医。",
)


def supervised_runs(enc):
    """Decoded text of each maximal run of supervised positions."""
    runs, current = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok  # labels are not shifted here
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.fixture(params=["real", "fixture"])
def tokenizer(request, qwen2_dir):
    return (
        real_tokenizer()
        if request.param == "real"
        else AutoTokenizer.from_pretrained(str(qwen2_dir))
    )


def test_chat_single_turn_supervises_exactly_answer_and_im_end(tokenizer):
    fmt = PromptFormat("chat")
    enc = encode_sample(SINGLE, fmt, tokenizer)
    (run,) = supervised_runs(enc)
    assert tokenizer.decode(run) == "地榆槐角丸。疏风凉血，泻热润燥。<|im_end|>"
    assert enc.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_multi_turn_supervises_every_assistant_turn(tokenizer):
    enc = encode_sample(MULTI, PromptFormat("chat"), tokenizer)
    assert [tokenizer.decode(r) for r in supervised_runs(enc)] == [
        "注意休息，多喝水。<|im_end|>",
        "可以服用川芎茶调散。<|im_end|>",
    ]
    prompt_text = tokenizer.decode(
        [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX]
    )
    assert "你是一名中医。" in prompt_text and "还需要吃药吗？" in prompt_text


def test_plain_template_supervises_answer_and_eos(tokenizer):
    fmt = PromptFormat("plain")
    enc = encode_sample(SINGLE, fmt, tokenizer)
    (run,) = supervised_runs(enc)
    assert tokenizer.decode(run) == "地榆槐角丸。疏风凉血，泻热润燥。" + tokenizer.eos_token
    prompt = tokenizer.decode(enc.input_ids[: len(enc.input_ids) - len(run)])
    assert (
        prompt
        == "Instruction: 使用中医知识正确回答适合这个病例的中成药。\nInput: 肛门疼痛，痔疮，肛裂。\nAnswer:\n"
    )


@pytest.mark.parametrize("template", ["chat", "plain"])
@pytest.mark.parametrize("sample", [SINGLE, MULTI], ids=["single", "multi"])
def test_inference_prompt_equals_training_tokens_up_to_the_answer(tokenizer, template, sample):
    fmt = PromptFormat(template)
    enc = encode_sample(sample, fmt, tokenizer)
    prompt = encode_prompt(
        Sample(
            sample.turns[:-1] + (Turn(sample.turns[-1].user, "", sample.turns[-1].user_input),),
            sample.system,
        ),
        fmt,
        tokenizer,
    )
    last_answer_start = max(
        i
        for i in range(len(enc.labels))
        if enc.labels[i] != IGNORE_INDEX and enc.labels[i - 1] == IGNORE_INDEX
    )
    assert enc.input_ids[:last_answer_start] == prompt


def test_qwen3_template_disables_thinking_in_training_and_inference(tiny_models):
    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen3"]))
    fmt = PromptFormat("chat")
    enc = encode_sample(SINGLE, fmt, tok)
    prompt = encode_prompt(
        Sample((Turn(SINGLE.turns[0].user, "", SINGLE.turns[0].user_input),)), fmt, tok
    )
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert enc.input_ids[: len(prompt)] == prompt
    (run,) = supervised_runs(enc)
    assert tok.decode(run) == "地榆槐角丸。疏风凉血，泻热润燥。<|im_end|>"


def test_system_prompt_from_format_is_used_when_the_row_has_none(tokenizer):
    enc = encode_sample(SINGLE, PromptFormat("chat", system="你是中医药专家。"), tokenizer)
    assert "你是中医药专家。" in tokenizer.decode(enc.input_ids)


def test_truncation_cuts_prompt_from_the_left_first_and_keeps_the_end_token(tokenizer):
    fmt = PromptFormat("chat")
    full = encode_sample(SINGLE, fmt, tokenizer)
    n_answer = sum(1 for x in full.labels if x != IGNORE_INDEX)
    cut = encode_sample(SINGLE, fmt, tokenizer, max_len=n_answer + 3)
    assert cut.truncated == "prompt" and len(cut.input_ids) == n_answer + 3
    assert cut.input_ids[-n_answer:] == full.input_ids[-n_answer:]  # the whole answer survives
    tiny = encode_sample(SINGLE, fmt, tokenizer, max_len=4)
    assert tiny.truncated == "answer" and len(tiny.input_ids) == 4
    assert (
        tiny.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        and tiny.labels[-1] != IGNORE_INDEX
    )


def test_a_row_with_no_supervised_token_left_is_dropped():
    from lora.prompt import Encoded

    enc = Encoded([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4])
    assert truncate(enc, 3).n_supervised == 1  # the end token is kept
    assert Encoded([5], [5]).n_supervised == 0  # position 0 is never predicted


def test_template_auto_resolution(tokenizer):
    assert resolve_template(tokenizer, "auto") == "chat"
    tokenizer_without = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer_without.chat_template = None
    assert resolve_template(tokenizer_without, "auto") == "plain"
