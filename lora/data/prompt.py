"""Prompt templates and label masking: what the model reads, and what it is taught to say.

One builder serves both `train.py` and `infer.py`, so the prompt at inference is token for
token the prompt the model was trained on, up to the answer.

Two templates
    chat   the tokenizer's own chat template (Qwen: ChatML). The supervised part of each
           assistant turn is what the template writes after the generation prompt, up to and
           including the end-of-turn token `<|im_end|>`, which is what teaches the model to
           stop. Qwen3's thinking is disabled unless asked for (or the rows carry reasoning).
    plain  for base models without a chat template:
               Instruction: {instruction}
               Input: {input}          (only when there is one)
               Answer:
               {answer}<eos>
           The prompt ends with a newline, not "Answer: " with a space: byte-level BPE glues a
           leading space to the next word, so a prompt ending in a space would put its last
           character in the same token as the answer's first, and the inference prompt would
           not tokenize like the training one.

Where the answer is: render the prefix, take the difference
    For answer i, the template renders twice: the conversation up to user turn i with the
    generation prompt (exactly what inference will feed the model), and the same conversation
    plus answer i. The answer is the difference. Searching for the answer's text in the
    rendered string instead would find "a" or "is" inside `<|im_start|>assistant`, and fails
    when a template rewrites the text (Qwen3 moves `<think>…</think>` out of the answer).
    Some templates render a past answer differently from the latest one (Qwen3 drops the empty
    think block of earlier turns). Then the conversation so far is no prefix of the next prompt,
    and the next answer starts a new training row whose context is its own inference prompt.
    Every supervised answer thus sees exactly the tokens inference will show the model.

Reasoning (chain of thought)
    A turn's `reasoning` goes where the template expects it: Qwen3's template has a slot
    (`reasoning_content`, rendered inside `<think>…</think>`). Templates without one (Qwen2.5,
    plain) get it written before the answer as `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`,
    so inference can show or hide it the same way for every template (`split_reasoning`).

Labels (the classic bugs we must not have)
    Each training row is rendered to *one* string and tokenized *once*, with character
    offsets. A token is supervised when it starts inside an answer span (answer + end token);
    every other position (system, user, template markup, padding) gets -100. Tokenizing prompt
    and answer separately and gluing the ids together (as many tutorials do) can split words
    differently from what the model sees at inference; masking by token id instead of by
    position is wrong because Qwen's pad token is also an end token.
    Labels are *not* shifted here: `labels[i]` is the token at position i. The loss shifts once.

Speed
    Everything that depends only on the tokenizer and the format (end token, template kwargs,
    whether the template has a reasoning slot) is computed once, in a `Renderer`. Rows are
    tokenized in batches by the fast (Rust) tokenizer, and labels come from the offsets with
    numpy, so preparing a million rows is minutes, not days.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from .fileformat import BadRow
from .records import Sample, Turn

IGNORE_INDEX = -100
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class PromptFormat:
    """Everything that shapes the prompt; recorded in the adapter so inference rebuilds it.

    `data_system` is the system prompt most training rows carried themselves: inference uses it
    when neither `--system` nor `system` is given, so the model is asked as it was taught.
    """

    template: str = "chat"  # "chat" | "plain"
    system: str | None = None
    enable_thinking: bool = False
    data_system: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> PromptFormat:
        d = d or {}
        keys = ("template", "system", "enable_thinking", "data_system")
        return cls(**{k: d[k] for k in keys if k in d})


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


def has_token(tokenizer, token: str) -> bool:
    """Whether `token` is one token of the vocabulary (without building the 150k-entry vocab)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid is not None and (tid != tokenizer.unk_token_id or token == tokenizer.unk_token)


def end_of_turn_text(tokenizer, fmt: PromptFormat) -> str:
    """The token that closes an answer: `<|im_end|>` for ChatML, else the tokenizer's eos."""
    return get_renderer(tokenizer, fmt).end


def with_reasoning(turn: Turn) -> str:
    """The answer with its reasoning written before it, for templates without a reasoning slot."""
    if not turn.reasoning:
        return turn.assistant
    return f"{THINK_OPEN}\n{turn.reasoning}\n{THINK_CLOSE}\n\n{turn.assistant}"


def split_reasoning(answer: str) -> tuple[str, str]:
    """(reasoning, answer) of a generated text: what is inside `<think>…</think>`, and the rest."""
    if THINK_CLOSE not in answer:
        return "", answer.strip()
    thought, rest = answer.split(THINK_CLOSE, 1)
    return thought.split(THINK_OPEN)[-1].strip(), rest.strip()


def _user_text(turn: Turn) -> str:
    return f"{turn.user}\n{turn.user_input}" if turn.user_input else turn.user


def _plain_turn_prompt(turn: Turn) -> str:
    text = f"Instruction: {turn.user}\n"
    if turn.user_input:
        text += f"Input: {turn.user_input}\n"
    return text + "Answer:\n"


Span = tuple[int, int]


class Renderer:
    """Turns samples into training text for one (tokenizer, format): constants computed once."""

    def __init__(self, tokenizer, fmt: PromptFormat):
        self.tokenizer, self.fmt = tokenizer, fmt
        template = (tokenizer.chat_template or "") if fmt.template == "chat" else ""
        if template and has_token(tokenizer, "<|im_end|>"):
            self.end = "<|im_end|>"
        elif tokenizer.eos_token:
            self.end = tokenizer.eos_token
        else:
            raise UserError(
                "the tokenizer has no eos token, so the model could never learn to stop"
            )
        # A chat template writes its own special tokens (BOS included, where a model has one).
        self.add_special_tokens = fmt.template == "plain"
        self.template_kwargs = (
            {"enable_thinking": fmt.enable_thinking} if "enable_thinking" in template else {}
        )
        self.reasoning_slot = "reasoning_content" in template

    # -- chat template ---------------------------------------------------------------------

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )

    def _system_messages(self, sample: Sample) -> list[dict]:
        system = sample.system if sample.system is not None else self.fmt.system
        return [{"role": "system", "content": system}] if system else []

    def _assistant_message(self, turn: Turn) -> dict:
        if self.reasoning_slot and turn.reasoning:
            return {
                "role": "assistant",
                "content": turn.assistant,
                "reasoning_content": turn.reasoning,
            }
        return {"role": "assistant", "content": with_reasoning(turn)}

    def _chat_rows(self, sample: Sample) -> list[tuple[str, list[Span]]]:
        messages, rows, text, spans = self._system_messages(sample), [], "", []
        for turn in sample.turns:
            messages.append({"role": "user", "content": _user_text(turn)})
            prompt = self._apply(messages, add_generation_prompt=True)
            messages.append(self._assistant_message(turn))
            full = self._apply(messages, add_generation_prompt=False)
            if not full.startswith(prompt):
                raise BadRow("the chat template does not render the answer after its prompt")
            answer = full[len(prompt) :].rstrip()
            if not answer.endswith(self.end):
                raise BadRow(f"the chat template does not close the answer with {self.end}")
            if not prompt.startswith(text):  # the history renders differently: a new row
                rows.append((text, spans))
                spans = []
            spans.append((len(prompt), len(prompt) + len(answer)))
            text = prompt + answer  # what follows the end token belongs to the next turn
        return rows + [(text, spans)]

    # -- plain template --------------------------------------------------------------------

    def _plain_row(self, sample: Sample) -> tuple[str, list[Span]]:
        system = sample.system if sample.system is not None else self.fmt.system
        text, spans = (f"{system}\n\n" if system else ""), []
        for i, turn in enumerate(sample.turns):
            text += ("\n" if i else "") + _plain_turn_prompt(turn)
            start = len(text)
            text += with_reasoning(turn) + self.end
            spans.append((start, len(text)))
        return text, spans

    # -- public ----------------------------------------------------------------------------

    def rows(self, sample: Sample) -> list[tuple[str, list[Span]]]:
        """Training rows of a sample: (text, supervised character spans). Usually exactly one.

        Raises BadRow when a chat template renders an answer where it cannot be supervised.
        """
        if self.fmt.template == "plain":
            return [self._plain_row(sample)]
        return self._chat_rows(sample)

    def prompt(self, sample: Sample) -> str:
        """The text the model sees before it answers the last user turn of `sample`."""
        if self.fmt.template == "plain":
            text, spans = self._plain_row(sample)
            return text[: spans[-1][0]]
        messages = self._system_messages(sample)
        for i, turn in enumerate(sample.turns):
            messages.append({"role": "user", "content": _user_text(turn)})
            if i < len(sample.turns) - 1:
                messages.append(self._assistant_message(turn))
        return self._apply(messages, add_generation_prompt=True)


_RENDERERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_renderer(tokenizer, fmt: PromptFormat) -> Renderer:
    """The `Renderer` of this tokenizer and format, built once and reused."""
    key = (fmt.template, fmt.system, fmt.enable_thinking, getattr(tokenizer, "chat_template", None))
    cache = _RENDERERS.setdefault(tokenizer, {})
    if key not in cache:
        cache[key] = Renderer(tokenizer, fmt)
    return cache[key]


def render(sample: Sample, fmt: PromptFormat, tokenizer) -> tuple[str, list[Span]]:
    """The training text of a one-row sample and its supervised spans (answer + end token)."""
    rows = get_renderer(tokenizer, fmt).rows(sample)
    if len(rows) != 1:
        raise ValueError(f"this sample renders to {len(rows)} training rows; use Renderer.rows")
    return rows[0]


def prompt_text(sample: Sample, fmt: PromptFormat, tokenizer) -> str:
    """The text the model sees before it answers the last user turn of `sample` (inference)."""
    return get_renderer(tokenizer, fmt).prompt(sample)


def encode_prompt(sample: Sample, fmt: PromptFormat, tokenizer) -> list[int]:
    """Token ids of `prompt_text`, tokenized exactly as in training."""
    renderer = get_renderer(tokenizer, fmt)
    return tokenizer(renderer.prompt(sample), add_special_tokens=renderer.add_special_tokens)[
        "input_ids"
    ]


# ---------------------------------------------------------------------------------------------
# Tokens and labels


@dataclass
class Encoded:
    """One training row: token ids and labels (numpy int32 arrays, or lists), and how it was cut.

    `truncated` is None, "prompt" (context lost on the left) or "answer" (an answer was cut).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    truncated: str | None = None

    @property
    def n_supervised(self) -> int:
        # Position 0 can never be predicted (nothing precedes it), so it never counts.
        return int(np.count_nonzero(np.asarray(self.labels)[1:] != IGNORE_INDEX))


def label_encoding(encoding, spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of one tokenized row: a token is supervised when it starts inside a span.

    `encoding` is the fast tokenizer's `Encoding`; asking it which token holds each span's
    first and last character costs two lookups per answer, instead of a pass over every
    token's offsets in Python.
    """
    ids = np.array(encoding.ids, dtype=np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for start, stop in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(stop - 1)
        if first is None or last is None:
            raise BadRow("the tokenizer maps no token to an answer's first or last character")
        if encoding.token_to_chars(first)[0] < start:
            first += 1  # a token that merely ends inside the answer began in the prompt
        labels[first : last + 1] = ids[first : last + 1]
    return ids, labels


def truncate(enc: Encoded, max_len: int) -> Encoded:
    """Cut a row to `max_len` tokens, teaching nothing false.

    First the prompt loses tokens from the left (for multi-turn rows, the oldest history goes
    first), keeping at least one token before the first answer. If that is not enough, the row
    is cut on the right: the cut answer keeps what fits, and *no* end token is added after it
    (that would teach the model to stop mid-sentence); nothing after the cut is supervised.
    """
    ids, labels = np.asarray(enc.input_ids), np.asarray(enc.labels)
    excess = len(ids) - max_len
    if excess <= 0:
        return enc
    first_supervised = int(np.argmax(labels != IGNORE_INDEX))
    cut_left = min(excess, max(first_supervised - 1, 0))
    ids, labels, kind = ids[cut_left:], labels[cut_left:], "prompt"
    if len(ids) > max_len:
        ids, labels, kind = ids[:max_len], labels[:max_len], "answer"
    return Encoded(ids, labels, kind)


def encode_rows(rows: list[tuple[str, list[Span]]], renderer: Renderer) -> list[Encoded]:
    """Tokenize many rendered rows in one batch call of the fast (Rust) tokenizer."""
    if not rows:
        return []
    encodings = renderer.tokenizer.backend_tokenizer.encode_batch(
        [text for text, _ in rows], add_special_tokens=renderer.add_special_tokens
    )
    return [Encoded(*label_encoding(e, spans)) for e, (_, spans) in zip(encodings, rows)]


def encode_sample(
    sample: Sample, fmt: PromptFormat, tokenizer, max_len: int | None = None
) -> Encoded | None:
    """One single-row sample -> ids and labels (lists), truncated. None if nothing is supervised."""
    renderer = get_renderer(tokenizer, fmt)
    (out,) = encode_rows([render(sample, fmt, tokenizer)], renderer)
    if max_len:
        out = truncate(out, max_len)
    if out.n_supervised == 0:
        return None
    return Encoded(out.input_ids.tolist(), out.labels.tolist(), out.truncated)


def stop_token_ids(tokenizer, fmt: PromptFormat, generation_config=None) -> list[int]:
    """Every id that ends an answer: the template's end token, eos, and the model's own eos list."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer, fmt))]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if has_token(tokenizer, "<|endoftext|>"):
        ids.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return sorted({i for i in ids if i is not None and i >= 0})
