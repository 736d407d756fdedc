"""Reading instruction-tuning files into conversations, and saying exactly what was kept.

Real datasets arrive in many shapes. Every file becomes a list of `Sample`s: an optional system
prompt and one or more (user, assistant) turns. Nothing about tokens happens here (that is
`prompt.py`); this file only decides *what text* the model will see.

Accepted, auto-detected from the content (never from the file extension):
- containers: a JSON array, JSON Lines, or CSV/TSV (with a header row);
- encodings: UTF-8 (with or without BOM) and GB18030/GBK, common in Chinese medical data;
- row shapes:
    Alpaca     {"instruction", "input"?, "output", "system"?}; values may be one-element lists
               (a row is Alpaca only when it has "instruction"; input/output alone is a flat pair)
    messages   {"messages" | "conversation": [{"role", "content", "reasoning_content"?}, ...]}
    ShareGPT   {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
    flat       any other columns, through `--columns prompt=Question,response=Complex_CoT+Response`
               (several columns joined by "+" are concatenated with a blank line between them);
               well-known pairs (question/answer, ask/answer, input/output, ...) need no flag.
               A `reasoning=` column (chain of thought, e.g. `Complex_CoT`) and a `system=`
               column (a per-row system prompt) are optional; `prompt.py` decides where the
               reasoning goes in the template.

A bad row (malformed line, missing output, null value, odd turn order, ...) is skipped and
counted under its reason, with the first few row numbers, so a user always learns what was lost.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .fileformat import BadRow, decode_bytes, parse_records


@dataclass(frozen=True)
class Turn:
    """One exchange. `user_input` is Alpaca's optional `input` (the case, the text to work on).

    `reasoning` is an optional chain of thought that precedes the answer (reasoning data sets).
    """

    user: str
    assistant: str
    user_input: str = ""
    reasoning: str = ""


@dataclass(frozen=True)
class Sample:
    turns: tuple[Turn, ...]
    system: str | None = None
    row: int = 0  # 1-based row (JSON array index, JSONL line, CSV record) in the source file


@dataclass
class ReadReport:
    """What reading a file did: counts per skip reason, duplicates, notes. Printed before training."""

    path: str
    encoding: str = ""
    container: str = ""
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: dict = field(default_factory=lambda: defaultdict(list))
    notes: Counter = field(default_factory=Counter)
    duplicates: int = 0
    duplicates_dropped: int = 0
    schemas: Counter = field(default_factory=Counter)

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_rows[reason]) < 5:
            self.skipped_rows[reason].append(row)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "encoding": self.encoding,
            "container": self.container,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "first_skipped_rows": {k: v for k, v in self.skipped_rows.items()},
            "notes": dict(self.notes),
            "duplicates": self.duplicates,
            "duplicates_dropped": self.duplicates_dropped,
            "schemas": dict(self.schemas),
        }

    def lines(self) -> list[str]:
        out = [
            f"data {self.path}: {self.container}, {self.encoding}; rows read {self.rows_read}, "
            f"kept {self.kept}, skipped {sum(self.skipped.values())}"
            + (
                f" (schemas: {', '.join(f'{k} {v}' for k, v in self.schemas.items())})"
                if self.schemas
                else ""
            )
        ]
        for reason, n in self.skipped.most_common():
            rows = ", ".join(map(str, self.skipped_rows[reason]))
            out.append(f"  skipped {n:>6} {reason} (first rows: {rows})")
        for note, n in self.notes.most_common():
            out.append(f"  note    {n:>6} {note}")
        if self.duplicates:
            action = "dropped (--dedup)" if self.duplicates_dropped else "kept; --dedup drops them"
            out.append(f"  exact duplicates: {self.duplicates} ({action})")
        return out


# ---------------------------------------------------------------------------------------------
# Records -> Samples


ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "question": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}

# Flat schemas recognised without --columns: (prompt column, response column), matched case-insensitively.
KNOWN_FLAT_PAIRS = [
    ("prompt", "response"),
    ("question", "answer"),
    ("query", "response"),
    ("ask", "answer"),
    ("question", "response"),
    ("input", "output"),
    ("prompt", "completion"),
    ("query", "answer"),
]
# A chain-of-thought column recognised beside such a pair (e.g. huatuo-o1's Complex_CoT).
KNOWN_REASONING_COLUMNS = ("complex_cot", "reasoning", "reasoning_content", "cot", "thinking")


def parse_columns(spec: str | None) -> dict[str, list[str]] | None:
    """`"prompt=Question,response=Complex_CoT+Response"` -> {"prompt": [...], "response": [...]}."""
    if not spec:
        return None
    aliases = {
        "instruction": "prompt",
        "output": "response",
        "answer": "response",
        "question": "prompt",
    }
    mapping: dict[str, list[str]] = {}
    for part in spec.split(","):
        if "=" not in part:
            raise UserError(f"--columns: expected FIELD=COLUMN[+COLUMN...], got {part!r}")
        key, cols = (s.strip() for s in part.split("=", 1))
        key = aliases.get(key, key)
        if key not in ("prompt", "input", "response", "system", "reasoning"):
            raise UserError(
                f"--columns: unknown field {key!r}; use prompt, input, response, reasoning, system"
            )
        mapping[key] = [c.strip() for c in cols.split("+") if c.strip()]
    if "prompt" not in mapping or "response" not in mapping:
        raise UserError("--columns needs at least prompt=... and response=...")
    return mapping


def _text(value, what: str, required: bool = True) -> str:
    """A field's text: a string, or a list of strings (joined). Null/other types are bad rows."""
    if value is None:
        if required:
            raise BadRow(f"missing or empty {what}")
        return ""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise BadRow("null or non-string value")
        value = "\n".join(v.strip() for v in value)
    if not isinstance(value, str):
        raise BadRow("null or non-string value")
    value = value.strip()
    if required and not value:
        raise BadRow(f"missing or empty {what}")
    return value


def _from_alpaca(rec: dict, questions: bool = False) -> Sample:
    return Sample(
        turns=(
            Turn(
                _text(rec.get("instruction"), "instruction"),
                _text(rec.get("output"), "output", required=not questions),
                _text(rec.get("input"), "input", required=False),
            ),
        ),
        system=_text(rec.get("system"), "system", required=False) or None,
    )


def _from_messages(
    messages, report: ReadReport, role_key: str, content_key: str, questions: bool = False
) -> Sample:
    if not isinstance(messages, list) or not messages:
        raise BadRow("empty conversation")
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            raise BadRow("unknown schema")
        role = ROLE_ALIASES.get(str(m.get(role_key, "")).lower())
        if role is None:
            raise BadRow(f"unknown role {m.get(role_key)!r}")
        value = m.get(content_key)
        if value is None or not isinstance(value, str):
            raise BadRow("null or non-string value")
        if not value.strip():
            raise BadRow("empty turn")
        turns.append((role, value.strip(), _text(m.get("reasoning_content"), "", required=False)))
    system = None
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
    if turns and turns[-1][0] == "user":
        if questions:
            turns.append(("assistant", "", ""))  # the question to answer
        else:
            turns.pop()
            report.notes["trailing user turn without an answer dropped"] += 1
    if not turns:
        raise BadRow("no assistant turn")
    roles = [t[0] for t in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
        raise BadRow("bad turn order (expected user/assistant alternating)")
    return Sample(
        turns=tuple(
            Turn(turns[i][1], turns[i + 1][1], reasoning=turns[i + 1][2])
            for i in range(0, len(turns), 2)
        ),
        system=system,
    )


def _flat_mapping(rec: dict) -> dict[str, list[str]] | None:
    lower = {k.lower(): k for k in rec}
    for p, r in KNOWN_FLAT_PAIRS:
        if p in lower and r in lower:
            mapping = {"prompt": [lower[p]], "response": [lower[r]]}
            if "system" in lower:
                mapping["system"] = [lower["system"]]
            reasoning = next((lower[k] for k in KNOWN_REASONING_COLUMNS if k in lower), None)
            if reasoning:
                mapping["reasoning"] = [reasoning]
            return mapping
    return None


def _from_columns(rec: dict, mapping: dict[str, list[str]], questions: bool = False) -> Sample:
    # Every mapped column the record lacks, named together (an answer may be absent in questions).
    missing = [c for f, cols in mapping.items() if not (questions and f == "response")
               for c in cols if c not in rec]  # fmt: skip
    if missing:
        raise BadRow(f"missing column(s) {', '.join(dict.fromkeys(missing))}")

    def get(field_name, required):
        cols = mapping.get(field_name, [])
        parts = [_text(rec.get(c), field_name, required=False) for c in cols]
        text = "\n\n".join(p for p in parts if p)
        if required and not text:
            raise BadRow(
                "missing or empty output"
                if field_name == "response"
                else f"missing or empty {field_name}"
            )
        return text

    turn = Turn(
        get("prompt", True),
        get("response", not questions),
        get("input", False),
        get("reasoning", False),
    )
    return Sample(turns=(turn,), system=get("system", False) or None)


def record_to_sample(rec, report: ReadReport, columns=None, questions: bool = False) -> Sample:
    """One raw record -> Sample, or BadRow with the reason.

    `questions=True` reads a file of questions (for inference): answers may be missing, and a
    conversation ending on a user turn keeps that turn as the question.
    """
    if isinstance(rec, BadRow):
        raise rec
    if not isinstance(rec, dict):
        raise BadRow("unknown schema")
    if columns:
        report.schemas["--columns"] += 1
        return _from_columns(rec, columns, questions)
    if "conversations" in rec:
        report.schemas["sharegpt"] += 1
        conv = rec["conversations"]
        keys = (
            ("from", "value")
            if conv and isinstance(conv[0], dict) and "from" in conv[0]
            else ("role", "content")
        )
        return _from_messages(conv, report, *keys, questions=questions)
    for key in ("messages", "conversation"):
        if key in rec:
            report.schemas["messages"] += 1
            return _from_messages(rec[key], report, "role", "content", questions=questions)
    if "instruction" in rec:  # an input/output pair without one is a flat pair, below
        report.schemas["alpaca"] += 1
        return _from_alpaca(rec, questions)
    mapping = _flat_mapping(rec)
    if mapping:
        report.schemas["+".join(mapping["prompt"]) + "/" + mapping["response"][0]] += 1
        return _from_columns(rec, mapping, questions)
    raise BadRow("unknown schema")


def read_dataset(
    path,
    columns: str | dict | None = None,
    strict: bool = False,
    dedup: bool = False,
    encoding: str | None = None,
    questions: bool = False,
) -> tuple[list[Sample], ReadReport]:
    """Read a data file into Samples. Bad rows are skipped and counted (or fatal with `strict`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    report = ReadReport(path=str(path))
    text, report.encoding = decode_bytes(path.read_bytes(), path, encoding)
    records = parse_records(text, path, report)
    mapping = parse_columns(columns) if isinstance(columns, str) else columns
    samples: list[Sample] = []
    seen = set()
    for rowno, rec in records:
        report.rows_read += 1
        try:
            sample = record_to_sample(rec, report, mapping, questions)
        except BadRow as e:
            if strict:
                raise UserError(
                    f"{path}: row {rowno}: {e} (--strict stops at the first bad row)"
                ) from None
            report.skip(str(e), rowno)
            continue
        key = (sample.system, sample.turns)
        if key in seen:
            report.duplicates += 1
            if dedup:
                report.duplicates_dropped += 1
                continue
        seen.add(key)
        samples.append(Sample(sample.turns, sample.system, rowno))
    report.kept = len(samples)
    if not samples:
        reasons = "; ".join(f"{n} {r}" for r, n in report.skipped.most_common()) or "no rows"
        raise UserError(f"{path}: no usable rows ({reasons}){_columns_hint(records, report)}")
    return samples, report


def _columns_hint(records: list, report: ReadReport) -> str:
    """When no row had the columns we looked for, the file's own columns, to map with --columns.

    The same for a schema we do not know and for a --columns mapping that names columns the
    file does not have: either way the user needs the names the file really uses.
    """
    columns_missing = any(r.startswith("missing column(s)") for r in report.skipped)
    first = next((rec for _, rec in records if isinstance(rec, dict)), None)
    if first is None or not (report.skipped.get("unknown schema") or columns_missing):
        return ""
    names = ", ".join(map(str, first.keys()))
    if columns_missing:
        return f". Its columns are {names}: name those in --columns"
    return f". Its columns are {names}: map them with --columns prompt=COL,response=COL"


def write_rows(picks: list[tuple[str, list[int]]], dest, encoding: str | None = None) -> None:
    """Copy the records numbered `rows` (1-based, as `Sample.row`) of each (file, rows) pick to
    `dest`, one JSON object per line.

    The records are written as the files hold them (same columns, same schema), so the rows a
    run held out with `--val-size` can be answered and scored later with `infer.py --file`.
    """
    import json

    from ..adapter import atomic_write_bytes

    lines = []
    for source, rows in picks:
        source, wanted = Path(source), set(rows)
        text, _ = decode_bytes(source.read_bytes(), source, encoding)
        records = parse_records(text, source, ReadReport(path=str(source)))
        lines += [json.dumps(r, ensure_ascii=False) + "\n" for n, r in records if n in wanted]
    atomic_write_bytes(Path(dest), "".join(lines).encode())
