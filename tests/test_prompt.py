"""Golden label tests: the supervised positions decode to exactly the answer plus its end token."""

import pytest
from transformers import AutoTokenizer

from conftest import QWEN_TOKENIZER, ROOT, real_tokenizer
from lora.data.prompt import (
    IGNORE_INDEX,
    PromptFormat,
    encode_prompt,
    encode_rows,
    encode_sample,
    get_renderer,
    resolve_template,
    split_reasoning,
    truncate,
)
from lora.data.records import Sample, Turn

# Qwen3's own chat template (from Qwen3's tokenizer_config.json): it drops the think block of
# past answers and adds an empty one to the generation prompt when thinking is off.
QWEN3_TEMPLATE = (ROOT / "tests" / "fixtures" / "qwen3_chat_template.jinja").read_text()

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


def test_truncation_cuts_prompt_from_the_left_first_then_the_answer_without_an_end_token(
    tokenizer,
):
    fmt = PromptFormat("chat")
    full = encode_sample(SINGLE, fmt, tokenizer)
    n_answer = sum(1 for x in full.labels if x != IGNORE_INDEX)
    cut = encode_sample(SINGLE, fmt, tokenizer, max_len=n_answer + 3)
    assert cut.truncated == "prompt" and len(cut.input_ids) == n_answer + 3
    assert cut.input_ids[-n_answer:] == full.input_ids[-n_answer:]  # the whole answer survives
    # Cut inside the answer: the answer's first tokens, then nothing; no end token glued on.
    tiny = encode_sample(SINGLE, fmt, tokenizer, max_len=4)
    assert tiny.truncated == "answer" and len(tiny.input_ids) == 4
    first = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    assert tiny.input_ids == full.input_ids[first - 1 : first + 3]  # one token of context kept
    assert tiny.labels == [IGNORE_INDEX] + full.input_ids[first : first + 3]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in tiny.input_ids


def test_truncated_multi_turn_row_ends_at_the_cut_with_nothing_after_it_supervised(tokenizer):
    fmt = PromptFormat("chat")
    full = encode_sample(MULTI, fmt, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Cut just after the first answer's end token plus a few tokens of the second user turn.
    first_end = next(
        i
        for i, (t, lab) in enumerate(zip(full.input_ids, full.labels))
        if t == im_end and lab != IGNORE_INDEX
    )
    first_supervised = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    max_len = first_end + 4 - (first_supervised - 1)
    cut = encode_sample(MULTI, fmt, tokenizer, max_len=max_len)
    assert cut.truncated == "answer" and len(cut.input_ids) == max_len
    assert cut.input_ids == full.input_ids[first_supervised - 1 : first_supervised - 1 + max_len]
    assert [tokenizer.decode(r) for r in supervised_runs(cut)] == ["注意休息，多喝水。<|im_end|>"]
    assert cut.labels[-1] == IGNORE_INDEX  # the user turn after the cut is not an answer


@pytest.mark.parametrize("answer", ["a", "is", "star", "think", "assistant", "user", "im"])
def test_any_answer_text_is_located_even_inside_template_markup(tokenizer, answer):
    sample = Sample((Turn("问", answer),), system="sys")
    enc = encode_sample(sample, PromptFormat("chat"), tokenizer)
    (run,) = supervised_runs(enc)
    assert tokenizer.decode(run) == answer + "<|im_end|>"


def test_a_row_with_no_supervised_token_left_is_dropped():
    from lora.data.prompt import Encoded

    enc = Encoded([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4])
    assert truncate(enc, 3).n_supervised == 1  # the end token is kept
    assert Encoded([5], [5]).n_supervised == 0  # position 0 is never predicted


def test_template_auto_resolution(tokenizer):
    assert resolve_template(tokenizer, "auto") == "chat"
    tokenizer_without = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer_without.chat_template = None
    assert resolve_template(tokenizer_without, "auto") == "plain"


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """The real Qwen2.5 vocabulary with Qwen3's chat template (their tokenizers share the BPE)."""
    real_tokenizer()  # skips when ../shared is absent
    tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def prefix(sample, i):
    """The sample up to user turn i, as inference sees it when asked to answer turn i."""
    last = sample.turns[i]
    return Sample(sample.turns[:i] + (Turn(last.user, "", last.user_input),), sample.system)


def supervised_starts(labels):
    return [
        i
        for i in range(len(labels))
        if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)
    ]


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking-off", "thinking-on"])
@pytest.mark.parametrize("sample", [SINGLE, MULTI], ids=["single", "multi"])
def test_qwen3_every_answer_trains_on_exactly_its_inference_prompt(
    qwen3_tokenizer, sample, thinking
):
    fmt = PromptFormat("chat", enable_thinking=thinking)
    renderer = get_renderer(qwen3_tokenizer, fmt)
    rows = encode_rows(renderer.rows(sample), renderer)
    answers = []
    for row in rows:
        ids, labels = row.input_ids.tolist(), row.labels.tolist()
        for start in supervised_starts(labels):
            answers.append((ids[:start], ids[start:]))
    assert len(answers) == len(sample.turns)
    think = "<think>\n\n</think>\n\n" if thinking else ""
    for i, (context, rest) in enumerate(answers):
        assert context == encode_prompt(prefix(sample, i), fmt, qwen3_tokenizer)
        decoded = qwen3_tokenizer.decode(rest)
        assert decoded.startswith(think + sample.turns[i].assistant + "<|im_end|>")


def test_qwen3_multi_turn_with_thinking_off_splits_into_one_row_per_answer(qwen3_tokenizer):
    renderer = get_renderer(qwen3_tokenizer, PromptFormat("chat"))
    (first, _), (second, _) = renderer.rows(MULTI)
    assert first.endswith("<think>\n\n</think>\n\n注意休息，多喝水。<|im_end|>")
    assert (
        "<|im_start|>assistant\n注意休息，多喝水。<|im_end|>" in second
    )  # history as Qwen3 renders it


def test_reasoning_goes_in_the_think_block_on_qwen3_and_before_the_answer_elsewhere(
    qwen3_tokenizer, tokenizer
):
    sample = Sample((Turn("头痛怎么办？", "多休息。", reasoning="头痛常见于疲劳。"),))
    for tok in (qwen3_tokenizer, tokenizer):
        fmt = PromptFormat("chat", enable_thinking=True)
        enc = encode_sample(sample, fmt, tok)
        (run,) = supervised_runs(enc)
        assert tok.decode(run) == "<think>\n头痛常见于疲劳。\n</think>\n\n多休息。<|im_end|>"
        assert enc.input_ids[: len(enc.input_ids) - len(run)] == encode_prompt(
            prefix(sample, 0), fmt, tok
        )
        assert split_reasoning(tok.decode(run, skip_special_tokens=True)) == (
            "头痛常见于疲劳。",
            "多休息。",
        )


def test_answers_with_think_tags_train_on_qwen3(qwen3_tokenizer):
    sample = Sample((Turn("问", "<think>\n想一想\n</think>\n\n答。"),))
    enc = encode_sample(sample, PromptFormat("chat", enable_thinking=True), qwen3_tokenizer)
    (run,) = supervised_runs(enc)
    assert qwen3_tokenizer.decode(run) == "<think>\n想一想\n</think>\n\n答。<|im_end|>"
