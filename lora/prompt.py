"""Prompt templates and label masking: what the model reads, and what it is taught to say.

One builder serves both `train.py` and `infer.py`, so the prompt at inference is token for
token the prompt the model was trained on, up to the answer.

Two templates
    chat   the tokenizer's own chat template (Qwen: ChatML). The supervised part of each
           assistant turn is its text plus the end-of-turn token `<|im_end|>`, which is what
           teaches the model to stop. Qwen3's thinking is disabled unless asked for.
    plain  for base models without a chat template:
               Instruction: {instruction}
               Input: {input}          (only when there is one)
               Answer:
               {answer}<eos>
           The prompt ends with a newline, not "Answer: " with a space: byte-level BPE glues a
           leading space to the next word, so a prompt ending in a space would put its last
           character in the same token as the answer's first, and the inference prompt would
           not tokenize like the training one.

Labels (the classic bugs we must not have)
    The whole conversation is rendered to *one* string and tokenized *once*, with character
    offsets. A token is supervised when it starts inside an answer span (answer + end token);
    every other position (system, user, template markup, padding) gets -100. Tokenizing prompt
    and answer separately and gluing the ids together (as many tutorials do) can split words
    differently from what the model sees at inference; masking by token id instead of by
    position is wrong because Qwen's pad token is also an end token.
    Labels are *not* shifted here: `labels[i]` is the token at position i. The loss shifts once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .data import Sample, Turn
from .errors import UserError

IGNORE_INDEX = -100


@dataclass
class PromptFormat:
    """Everything that shapes the prompt; recorded in the adapter so inference rebuilds it."""

    template: str = "chat"  # "chat" | "plain"
    system: str | None = None
    enable_thinking: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> PromptFormat:
        d = d or {}
        return cls(**{k: d[k] for k in ("template", "system", "enable_thinking") if k in d})


def resolve_template(tokenizer, requested: str | None) -> str:
    """`chat` when the tokenizer has a chat template, else `plain` (unless asked explicitly)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if requested in (None, "", "auto"):
        return "chat" if has_chat else "plain"
    if requested not in ("chat", "plain"):
        raise UserError(f"--template must be chat, plain or auto, got {requested!r}")
    if requested == "chat" and not has_chat:
        raise UserError(
            "--template chat: this tokenizer has no chat template; use --template plain"
        )
    return requested


def end_of_turn_text(tokenizer, fmt: PromptFormat) -> str:
    """The token that closes an answer: `<|im_end|>` for ChatML, else the tokenizer's eos."""
    if fmt.template == "chat" and "<|im_end|>" in tokenizer.get_vocab():
        return "<|im_end|>"
    if not tokenizer.eos_token:
        raise UserError("the tokenizer has no eos token, so the model could never learn to stop")
    return tokenizer.eos_token


def _user_text(turn: Turn) -> str:
    return f"{turn.user}\n{turn.user_input}" if turn.user_input else turn.user


def _chat_messages(sample: Sample, fmt: PromptFormat, upto_answer: bool = False) -> list[dict]:
    system = sample.system if sample.system is not None else fmt.system
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(sample.turns):
        messages.append({"role": "user", "content": _user_text(turn)})
        if upto_answer and i == len(sample.turns) - 1:
            break
        messages.append({"role": "assistant", "content": turn.assistant})
    return messages


def _apply_chat_template(
    tokenizer, messages, fmt: PromptFormat, add_generation_prompt: bool
) -> str:
    kwargs = {}
    if "enable_thinking" in (tokenizer.chat_template or ""):
        kwargs["enable_thinking"] = fmt.enable_thinking
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _plain_prefix(system: str | None) -> str:
    return f"{system}\n\n" if system else ""


def _plain_turn_prompt(turn: Turn) -> str:
    text = f"Instruction: {turn.user}\n"
    if turn.user_input:
        text += f"Input: {turn.user_input}\n"
    return text + "Answer:\n"


def render(sample: Sample, fmt: PromptFormat, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The full training text and the character spans to supervise (answer + end token each)."""
    end = end_of_turn_text(tokenizer, fmt)
    if fmt.template == "plain":
        system = sample.system if sample.system is not None else fmt.system
        text, spans = _plain_prefix(system), []
        for i, turn in enumerate(sample.turns):
            text += ("\n" if i else "") + _plain_turn_prompt(turn)
            start = len(text)
            text += turn.assistant + end
            spans.append((start, len(text)))
        return text, spans

    messages = _chat_messages(sample, fmt)
    full = _apply_chat_template(tokenizer, messages, fmt, add_generation_prompt=False)
    # Find each message's text in order; the cursor keeps an answer that repeats the question
    # from matching inside the question.
    cursor, spans = 0, []
    for m in messages:
        at = full.find(m["content"], cursor)
        if at < 0:
            raise UserError(
                "the tokenizer's chat template rewrites message text, so answers cannot be located; "
                "use --template plain"
            )
        cursor = at + len(m["content"])
        if m["role"] == "assistant":
            if not full.startswith(end, cursor):
                raise UserError(
                    f"the chat template does not close an answer with {end!r}; use --template plain"
                )
            cursor += len(end)
            spans.append((at, cursor))
    # The text ends at the last end token: what follows (a newline) belongs to a next turn.
    return full[:cursor], spans


def prompt_text(sample: Sample, fmt: PromptFormat, tokenizer) -> str:
    """The text the model sees before it answers the last user turn of `sample` (inference)."""
    if fmt.template == "plain":
        text, spans = render(sample, fmt, tokenizer)
        return text[: spans[-1][0]]
    return _apply_chat_template(
        tokenizer, _chat_messages(sample, fmt, upto_answer=True), fmt, add_generation_prompt=True
    )


def _add_special_tokens(fmt: PromptFormat) -> bool:
    # A chat template writes its own special tokens (BOS included, where a model has one).
    return fmt.template == "plain"


def encode_prompt(sample: Sample, fmt: PromptFormat, tokenizer) -> list[int]:
    """Token ids of `prompt_text`, tokenized exactly as in training."""
    return tokenizer(
        prompt_text(sample, fmt, tokenizer), add_special_tokens=_add_special_tokens(fmt)
    )["input_ids"]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: str | None = None  # None, "prompt", "answer"

    @property
    def n_supervised(self) -> int:
        # Position 0 can never be predicted (nothing precedes it), so it never counts.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def encode_sample(
    sample: Sample, fmt: PromptFormat, tokenizer, max_len: int | None = None
) -> Encoded | None:
    """Tokenize once, label by character offsets, truncate to `max_len`. None if nothing is left."""
    text, spans = render(sample, fmt, tokenizer)
    enc = tokenizer(text, add_special_tokens=_add_special_tokens(fmt), return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, stop) in zip(ids, offsets):
        supervised = stop > start and any(a <= start < b for a, b in spans)
        labels.append(tok if supervised else IGNORE_INDEX)
    out = Encoded(list(ids), labels)
    if max_len and len(ids) > max_len:
        out = truncate(out, max_len)
    return out if out.n_supervised > 0 else None


def truncate(enc: Encoded, max_len: int) -> Encoded:
    """Cut to `max_len` tokens, keeping the final end token (so the model still learns to stop).

    First the prompt loses tokens from the left (for multi-turn rows, the oldest history goes
    first), keeping at least one token before the first answer. If that is not enough, the
    answer loses its tail but keeps its last token, the end-of-turn token.
    """
    ids, labels = list(enc.input_ids), list(enc.labels)
    excess = len(ids) - max_len
    first_supervised = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    cut_left = min(excess, max(first_supervised - 1, 0))
    ids, labels, kind = ids[cut_left:], labels[cut_left:], "prompt"
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + ids[-1:]
        labels = labels[: max_len - 1] + labels[-1:]
        kind = "answer"
    return Encoded(ids, labels, kind)


def stop_token_ids(tokenizer, fmt: PromptFormat, generation_config=None) -> list[int]:
    """Every id that ends an answer: the template's end token, eos, and the model's own eos list."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer, fmt))]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if "<|endoftext|>" in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return sorted({i for i in ids if i is not None and i >= 0})
