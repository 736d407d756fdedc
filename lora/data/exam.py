"""Multiple-choice exams: files of questions, options and answers, read into `Question`s.

An exam asks what the model *knows*, where `--score` asks how it *answers*: each question has
2-6 options and one right letter, and the model's choice is read from its next-token
probabilities (infer/exam.py). The shapes people have, detected from the content:

    CSV, CMMLU / C-Eval layout   Question,A,B,C,D,Answer (any case; an index column is ignored);
                                 the file name is the subject. A directory of such files works,
                                 and so does CMMLU's root (its test/ holds the questions, dev/
                                 the few-shot examples, file for file)
    JSON / JSONL rows            a question ("question", "Question" or "stem"), the options as
                                 keys A-F, as keys opa-opf (MedMCQA), or as a list ("options" or
                                 "choices"), and the answer: a letter, or the key of the right
                                 option ("opb"); a "subject" field, else the file name

A row without a question, with fewer than 2 or more than 6 options, or whose answer is missing
or not one of its options is counted under its reason and skipped, as training rows are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError
from .fileformat import BadRow, decode_bytes, parse_records

LETTERS = "ABCDEF"
QUESTION_KEYS = ("question", "stem")
LIST_KEYS = ("options", "choices")
MEDMCQA_KEYS = ("opa", "opb", "opc", "opd", "ope", "opf")


@dataclass(frozen=True)
class Question:
    """One exam question: `options[answer]` is the right one, lettered A, B, ... in order."""

    subject: str
    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    source: str = ""  # the file it came from (its dev/ twin holds the few-shot examples)


@dataclass
class ExamReport:
    """What reading the exam files kept and skipped, per reason."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    container: str = ""

    def lines(self) -> list[str]:
        kept = self.rows - sum(self.skipped.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return [f"exam: {len(self.files)} file(s), {self.rows} questions read, {kept} kept"
                + (f", skipped {why}" if why else "")]  # fmt: skip


def exam_files(path: Path) -> list[Path]:
    """The question files of `path`: itself, the CSV/JSON files of a directory, or of its test/."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--mcq {path}: no such file or directory")
    folder = path / "test" if (path / "test").is_dir() else path
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".csv", ".json", ".jsonl"))
    if not found:
        raise UserError(f"--mcq {path}: no .csv, .json or .jsonl file in {folder}")
    return found


def read_exam(paths) -> tuple[list[Question], ExamReport]:
    """Every question of every file (or directory) in `paths`, and the report of what was kept."""
    report, questions = ExamReport(), []
    for path in (f for p in paths for f in exam_files(Path(p))):
        report.files.append(str(path))
        questions += read_exam_file(path, report)
    if not questions:
        raise UserError(f"--mcq: no usable question ({'; '.join(report.lines())})")
    return questions, report


def read_exam_file(path: Path, report: ExamReport) -> list[Question]:
    text, _ = decode_bytes(path.read_bytes(), path)
    records = parse_records(text, path, report)
    if records and not any(isinstance(r, dict) and _question_text(r) for _, r in records):
        raise UserError(
            f"--mcq {path}: not a multiple-choice file (no question column: expected "
            f"Question,A,B,C,D,Answer, or JSON rows with question, options and answer)"
        )
    out = []
    for number, record in records:
        report.rows += 1
        try:
            if isinstance(record, BadRow):
                raise record
            out.append(replace(to_question(record, path.stem, str(number)), source=str(path)))
        except BadRow as e:
            report.skipped[str(e)] += 1
    return out


def to_question(record: dict, subject: str, row: str) -> Question:
    """One row of any accepted shape as a `Question`; a `BadRow` saying why not."""
    lower = {str(k).strip().lower(): v for k, v in record.items()}
    question = _question_text(record)
    if not question:
        raise BadRow("no question")
    keys, options = _options(lower)
    if not 2 <= len(options) <= len(LETTERS):
        raise BadRow("not 2-6 options")
    answer = str(lower.get("answer", "") or "").strip().lower()
    if answer in keys:
        index = keys.index(answer)
    elif len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
        index = LETTERS.index(answer.upper())
    else:
        raise BadRow("answer missing or not an option")
    subject = str(lower.get("subject") or subject)
    ident = lower.get("id", lower.get("", row))  # CMMLU's unnamed index column
    return Question(subject, str(ident), question, tuple(options), index)


def _question_text(record: dict) -> str:
    lower = {str(k).strip().lower(): v for k, v in record.items()}
    return next((str(lower[k]).strip() for k in QUESTION_KEYS if lower.get(k)), "")


def _options(lower: dict) -> tuple[list[str], list[str]]:
    """(the keys the answer may name, the option texts), in letter order."""
    for key in LIST_KEYS:
        if isinstance(lower.get(key), list):
            return [], [str(o).strip() for o in lower[key]]
    for keys in (list(LETTERS.lower()), list(MEDMCQA_KEYS)):
        present = [k for k in keys if str(lower.get(k, "") or "").strip()]
        if present and present == keys[: len(present)]:
            return present, [str(lower[k]).strip() for k in present]
    return [], []


def few_shot_examples(question_file: Path, k: int) -> list[Question]:
    """The first `k` rows of the subject's dev file (CMMLU layout: dev/ beside test/)."""
    if k == 0:
        return []
    dev = question_file.parent.parent / "dev" / question_file.name
    if not dev.is_file():
        raise UserError(f"--shots {k}: no {dev} (the CMMLU layout puts dev/ beside test/)")
    rows = read_exam_file(dev, ExamReport())
    if len(rows) < k:
        raise UserError(f"--shots {k}: {dev} has only {len(rows)} usable rows")
    return rows[:k]
