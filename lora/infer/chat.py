"""Chatting with the fine-tuned model: one turn per line of standard input, answers streamed.

In a terminal the turns are prompted (`you> `, `model> `); piped in, every line is a turn and
the answers follow one another (`printf 'q1\\nq2\\n' | python infer.py --adapter out/`). The
history grows with every answer, so the model sees the conversation as training formatted
multi-turn rows; `/reset` clears it, `/exit` or the end of the input quits.
"""

from __future__ import annotations

import sys

from ..data.records import Sample, Turn
from .generate import LoadedAdapter, generate_batch


def chat(loaded: LoadedAdapter, settings, lines=None) -> None:
    """Answer each line of `lines` (standard input by default), keeping the history."""
    from transformers import TextStreamer

    lines = sys.stdin if lines is None else lines
    terminal = getattr(lines, "isatty", lambda: False)()
    history: list[Turn] = []
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("chat with the fine-tuned model: /reset clears the history, /exit quits", file=sys.stderr)
    while (text := _next_turn(lines, terminal)) is not None:
        if text == "/exit":
            return
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if terminal:
            print("model> ", end="", flush=True)
        sample = Sample((*history, Turn(text, "")))
        (r,) = generate_batch(loaded, [sample], settings, streamer=streamer)
        history.append(Turn(text, r["answer"], reasoning=r["reasoning"]))
        if not r["stopped"]:
            print(f"[the answer: stopped at --max-new-tokens {settings.max_new_tokens} without "
                  f"an end token]", file=sys.stderr)  # fmt: skip


def _next_turn(lines, terminal: bool) -> str | None:
    """The next non-empty line, stripped; None at the end of the input."""
    while True:
        if terminal:
            print("you> ", end="", flush=True)
        line = lines.readline()
        if not line:
            if terminal:
                print(file=sys.stderr)
            return None
        if line.strip():
            return line.strip()
