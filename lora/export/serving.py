"""Carrying the trained prompt to other servers: a chat template, an Ollama Modelfile, stop tokens.

A fine-tune only answers well when it is asked exactly the way it was trained. Inside `infer.py`
that is guaranteed (`prompt.encode_prompt`), but a merged model served by vLLM, transformers
pipelines, llama.cpp or Ollama builds its own prompt from a *template* shipped with the model.
If that template differs from the training prompt (no system prompt, Qwen3's thinking switched
back on, ChatML instead of our plain Instruction/Answer), the model "answers garbage", "never
stops" or "thinks again". This module writes templates that render what training rendered.

The pieces of a prompt
    Every template we support renders a conversation as a fixed sequence of text pieces around
    the messages' contents:

        head                       (with a system prompt: head_before + system + head_after)
        user_before    USER    user_after            for each user message
        answer_before  ANSWER  answer_after          for each earlier assistant message
        generation                                   (what precedes the model's answer)

    For ChatML: head_before = "<|im_start|>system\\n", user_after = "<|im_end|>\\n<|im_start|>
    assistant\\n", answer_after = "<|im_end|>\\n", ... Rather than writing these by hand per model,
    `prompt_pieces` *measures* them: it renders probe conversations with our own `prompt_text`
    (marker words as contents) and cuts the text at the markers. Then it re-renders other
    conversations from the pieces and checks they equal `prompt_text`, so a template that cannot
    be written this way is refused instead of exported wrong.

Two renderings of the pieces
    - `chat_template`: the Jinja template Hugging Face tokenizers (and vLLM, and llama.cpp with
      `--jinja`) apply. For `--template chat` it is the tokenizer's own template with the trained
      defaults set first (system prompt, `enable_thinking`), so tool calls etc. keep working; for
      `--template plain` it is written from the pieces.
    - `modelfile`: Ollama's `Modelfile`, whose TEMPLATE is a Go template (`{{ .System }}`,
      `{{ range .Messages }}`, `{{ .Content }}`). Literal pieces are written as Go string
      literals (`{{ "<|im_end|>\\n" }}`), so no newline can be lost to Go's whitespace trimming.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data.prompt import PromptFormat, end_of_turn_text, prompt_text
from ..data.records import Sample, Turn
from ..errors import UserError

# Marker words for probing: plain ASCII words a template passes through unchanged.
_SYSTEM, _USERS, _ANSWERS = (
    "SYSTEMMARK",
    ("USERMARKA", "USERMARKB", "USERMARKC"),
    ("ANSWERMARKA", "ANSWERMARKB"),
)


@dataclass(frozen=True)
class PromptPieces:
    """The fixed text around each message of a rendered conversation (see the module docstring)."""

    head_before: str  # before the system prompt
    head_after: str  # after the system prompt, before the first user message
    head_no_system: str  # the whole head when there is no system prompt
    user_before: str
    user_after: str
    answer_before: str
    answer_after: str
    generation: str  # after the last user message: where the model starts answering

    def render(self, system: str | None, messages: list[tuple[str, str]]) -> str:
        """The prompt for `messages` ([(role, content)], ending on a user message)."""
        out = f"{self.head_before}{system}{self.head_after}" if system else self.head_no_system
        for role, content in messages:
            if role == "user":
                out += self.user_before + content + self.user_after
            else:
                out += self.answer_before + content + self.answer_after
        return out + self.generation


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _common_suffix(*texts: str) -> str:
    n = 0
    while all(n < len(t) for t in texts) and len({t[len(t) - 1 - n] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n :]


def _cut(text: str, markers: list[str]) -> list[str]:
    """The text between consecutive markers: [before m0, m0..m1, ..., after the last]."""
    parts, cursor = [], 0
    for m in markers:
        at = text.find(m, cursor)
        if at < 0:
            raise UserError("the chat template rewrites message text, so it cannot be exported")
        parts.append(text[cursor:at])
        cursor = at + len(m)
    return parts + [text[cursor:]]


def _sample(turns: list[tuple[str, str]], system: str | None) -> Sample:
    return Sample(tuple(Turn(u, a) for u, a in turns), system)


def prompt_pieces(tokenizer, fmt: PromptFormat) -> PromptPieces:
    """Measure the pieces of the training prompt, and check them on other conversations."""
    probe = PromptFormat(fmt.template, None, fmt.enable_thinking)
    u1, u2, u3 = _USERS
    a1, a2 = _ANSWERS
    three = [(u1, a1), (u2, a2), (u3, "")]
    with_system = prompt_text(_sample(three, _SYSTEM), probe, tokenizer)
    # [head, user->answer, answer->user, user->answer, answer->user, after the last user]
    head_sys, user_to_answer, answer_to_user, _, _, after_last = _cut(
        with_system, [u1, a1, u2, a2, u3]
    )
    head_no_system = prompt_text(_sample([(u1, "")], ""), probe, tokenizer).split(u1)[0]
    head_before, _, head_tail = head_sys.partition(_SYSTEM)
    # Between an answer and the next user message lies answer_after + user_before. The answer
    # keeps the end-of-turn token it was trained to write; user_before is the longest text that
    # also ends both heads (with and without a system prompt).
    end = end_of_turn_text(tokenizer, fmt)
    closing = len(end) if answer_to_user.startswith(end) else 0
    user_before = _common_suffix(answer_to_user[closing:], head_tail, head_no_system)
    user_after = _common_prefix(user_to_answer, after_last)
    pieces = PromptPieces(
        head_before=head_before,
        head_after=head_tail[: len(head_tail) - len(user_before)],
        head_no_system=head_no_system[: len(head_no_system) - len(user_before)],
        user_before=user_before,
        user_after=user_after,
        answer_before=user_to_answer[len(user_after) :],
        answer_after=answer_to_user[: len(answer_to_user) - len(user_before)],
        generation=after_last[len(user_after) :],
    )
    _check_pieces(pieces, tokenizer, probe)
    return pieces


def _check_pieces(pieces: PromptPieces, tokenizer, fmt: PromptFormat) -> None:
    """Re-render a few conversations from the pieces; they must equal `prompt_text` exactly."""
    conversations = [
        ([("你好", "")], None),
        ([("你好", "")], "你是中医。\n请简短回答。"),
        ([("Q1 12345", "A1"), ("问题二", "回答二"), ("Q3", "")], "system text"),
        ([("x", "y"), ("z", "")], None),
    ]
    for turns, system in conversations:
        expected = prompt_text(_sample(turns, system or ""), fmt, tokenizer)
        messages = [m for u, a in turns for m in (("user", u), ("assistant", a))][:-1]
        if pieces.render(system, messages) != expected:
            raise UserError(
                "this model's chat template renders conversations in a way that cannot be "
                "exported as a template (it is not a fixed text around each message)"
            )


def usable_format(tokenizer, fmt: PromptFormat) -> PromptFormat:
    """`fmt`, but `plain` when it asks for a chat template the tokenizer does not have (an
    adapter trained elsewhere records no format; inference makes the same choice)."""
    if fmt.template == "chat" and not getattr(tokenizer, "chat_template", None):
        return PromptFormat("plain", fmt.system, fmt.enable_thinking)
    return fmt


def _jinja_string(text: str) -> str:
    # A JSON string is a valid Jinja string literal (same escapes for quotes, \n, \\).
    return json.dumps(text, ensure_ascii=False)


def chat_template(tokenizer, fmt: PromptFormat) -> str:
    """A Jinja chat template that renders the training prompt for a list of messages.

    With `apply_chat_template(messages, add_generation_prompt=True)` it gives exactly
    `prompt_text` for the same conversation: the trained system prompt unless the messages
    bring their own, Qwen3's thinking as trained unless `enable_thinking` is passed.
    """
    fmt = usable_format(tokenizer, fmt)
    system = _jinja_string(fmt.system or "")
    if fmt.template == "chat":
        original = tokenizer.chat_template
        prelude = (
            "{%- if " + system + " and not (messages and messages[0]['role'] == 'system') %}"
            "{%- set messages = [{'role': 'system', 'content': " + system + "}] + messages %}"
            "{%- endif %}"
        )
        if "enable_thinking" in original:
            value = "true" if fmt.enable_thinking else "false"
            prelude += (
                "{%- if enable_thinking is not defined %}"
                "{%- set enable_thinking = " + value + " %}{%- endif %}"
            )
        return prelude + original
    p = prompt_pieces(tokenizer, fmt)
    s = _jinja_string
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}"
        "{%- else %}{%- set system = " + system + " %}{%- endif %}"
        "{%- if system %}{{- " + s(p.head_before) + " + system + " + s(p.head_after) + " }}"
        "{%- else %}{{- " + s(p.head_no_system) + " }}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- " + s(p.user_before) + " + message['content'] + " + s(p.user_after) + " }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- " + s(p.answer_before) + " + message['content'] + " + s(p.answer_after) + " }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- " + s(p.generation) + " }}{%- endif %}"
    )


def _go_string(text: str) -> str:
    # Go's interpreted string literals share JSON's escapes for ", \\, \n, \t and \uXXXX.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def ollama_template(pieces: PromptPieces) -> str:
    """The Modelfile TEMPLATE: a Go template over Ollama's `.System` and `.Messages`.

    Ollama puts the request's system message (or the Modelfile's SYSTEM) in `.System` and every
    message in `.Messages`; system messages are skipped in the loop since the head has them.
    Each line break is followed by `{{-`, which trims it: the template's own layout adds no text.
    """
    g = _go_string
    lines = [
        "{{ if .System }}"
        + g(pieces.head_before)
        + "{{ .System }}"
        + g(pieces.head_after)
        + "{{ else }}"
        + g(pieces.head_no_system)
        + "{{ end }}",
        "{{- range .Messages }}",
        '{{- if eq .Role "user" }}'
        + g(pieces.user_before)
        + "{{ .Content }}"
        + g(pieces.user_after),
        '{{- else if eq .Role "assistant" }}'
        + g(pieces.answer_before)
        + "{{ .Content }}"
        + g(pieces.answer_after),
        "{{- end }}",
        "{{- end }}" + g(pieces.generation),
    ]
    return "\n".join(lines)


def modelfile(gguf_name: str, tokenizer, fmt: PromptFormat, stop_ids: list[int]) -> str:
    """Ollama's Modelfile for `gguf_name` (a file in the same directory).

    FROM the GGUF, TEMPLATE as trained, the trained SYSTEM prompt, and one `PARAMETER stop` per
    stop token (Ollama stops on the text of these tokens).
    """
    fmt = usable_format(tokenizer, fmt)
    pieces = prompt_pieces(tokenizer, fmt)
    template = ollama_template(pieces)
    if '"""' in template:
        raise UserError('the prompt template contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if fmt.system:
        if '"""' in fmt.system:
            raise UserError('the system prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{fmt.system}"""')
    for token in stop_texts(tokenizer, stop_ids):
        lines.append(f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def stop_texts(tokenizer, stop_ids: list[int]) -> list[str]:
    """The text of each stop token, e.g. `<|im_end|>`, in id order."""
    return [tokenizer.convert_ids_to_tokens(i) for i in sorted(set(stop_ids))]


def carry_prompt(model, tokenizer, fmt: PromptFormat, stop_ids: list[int]) -> None:
    """Make a merged HF checkpoint serve the trained prompt: its tokenizer's chat template and
    its generation config's stop tokens (read by vLLM, pipelines, llama.cpp's HF converter)."""
    tokenizer.chat_template = chat_template(tokenizer, fmt)
    model.generation_config.eos_token_id = sorted(set(stop_ids))
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def end_token_id(tokenizer, fmt: PromptFormat) -> int:
    """The id of the token that closes a trained answer (`<|im_end|>` for ChatML)."""
    return tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer, fmt))
