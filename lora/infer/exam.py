"""Multiple-choice exams before and after: did the fine-tune teach medicine, what did it forget?

`infer.py --mcq PATH` asks every question the way the reference harnesses do (CMMLU, C-Eval in
lm-evaluation-harness and OpenCompass): the question and its lettered options, then an answer
cue, in the adapter's own training prompt (template and system prompt), so the fine-tuned
model is asked the way it was taught. The model's choice is the letter with the highest
next-token probability among the letters offered; forward passes only, nothing is generated.

    p(letter | prompt) = softmax over the offered letters of the logits at the last position

Accuracy alone is a number without a size: on 100 questions, 55% and 50% are the same result.
So every accuracy comes with its 95% Wilson interval, and with `--compare` the paired difference
(the same questions, two models) with its interval and an exact McNemar test on the questions
where the two disagree:

    b = right after, wrong before      c = wrong after, right before      n = questions
    Δ = (b − c) / n      se = √(b + c − (b − c)² / n) / n      95%: Δ ± 1.96 se
    McNemar p = P(|X − (b+c)/2| ≥ |b − (b+c)/2|), X ~ Binomial(b + c, 1/2)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.exam import LETTERS, Question, few_shot_examples
from ..data.prompt import encode_prompt
from ..data.records import Sample, Turn
from ..errors import UserError
from ..inject import lora_disabled
from .generate import LoadedAdapter, left_padded

ANSWER_CUE = "答案："  # CMMLU's own cue ("answer:"), after the options
Z95 = 1.959964


def question_text(q: Question, with_answer: bool = False) -> str:
    """The question, its lettered options and the cue (a few-shot example also its answer)."""
    options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(q.options))
    answer = LETTERS[q.answer] if with_answer else ""
    return f"{q.question}\n{options}\n{ANSWER_CUE}{answer}"


def exam_prompt(q: Question, shots: list[Question]) -> Sample:
    """One user turn: K answered examples of the subject, then the question (see module doc)."""
    examples = "".join(question_text(s, with_answer=True) + "\n\n" for s in shots)
    return Sample(turns=(Turn(examples + question_text(q), ""),))


def letter_ids(tokenizer, n: int) -> list[int]:
    """The token of each of the first `n` letters; each must be one token."""
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS[:n]]
    if any(len(i) != 1 for i in ids):
        raise UserError("this tokenizer splits an option letter into several tokens")
    return [i[0] for i in ids]


@dataclass
class ExamSettings:
    shots: int = 0
    batch_size: int = 8


@torch.no_grad()
def letter_probabilities(loaded: LoadedAdapter, questions, settings: ExamSettings, label=""):
    """p(letter | prompt) over each question's offered letters: a list of lists of floats."""
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    shots = _shots_by_source(questions, settings.shots)
    prompts = [encode_prompt(exam_prompt(q, shots[q.source]), loaded.fmt, tok) for q in questions]
    letters = letter_ids(tok, max(len(q.options) for q in questions))
    out = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc=f"exam{label}",
                      unit="batch", leave=False):  # fmt: skip
        batch = prompts[start : start + settings.batch_size]
        # Left padding: every prompt ends at the last position, the only one whose logits we
        # need (the vocabulary projection of all the others is a quarter of a 0.5B's work).
        ids, mask = left_padded(batch, tok.pad_token_id, device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each prompt's own positions from 0
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        last = logits.logits[:, -1].float()  # (batch, vocab)
        for row, q in zip(last, questions[start : start + len(batch)]):
            offered = row[letters[: len(q.options)]]  # only the letters this question offers
            out.append(torch.softmax(offered, dim=-1).tolist())
    return out


def _shots_by_source(questions, k: int) -> dict[str, list[Question]]:
    return {src: few_shot_examples(Path(src), k) for src in {q.source for q in questions}}


def take_exam(loaded: LoadedAdapter, questions, settings: ExamSettings, compare: bool) -> dict:
    """{"fine_tuned": probabilities, "base": ... with compare} for every question."""
    runs = {"fine_tuned": letter_probabilities(loaded, questions, settings, " (fine-tuned)")}
    if compare:
        with lora_disabled(loaded.model):
            runs["base"] = letter_probabilities(loaded, questions, settings, " (base)")
    return runs


# ---------------------------------------------------------------------------------------------
# Statistics


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (good at small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half, 1.0 if k == n else centre + half)


def paired_difference(after: list[bool], before: list[bool]) -> dict:
    """Δ accuracy with its 95% interval, and McNemar's exact p, on the same questions."""
    n = len(after)
    b = sum(a and not o for a, o in zip(after, before))
    c = sum(o and not a for a, o in zip(after, before))
    diff = (b - c) / n if n else 0.0
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n if n else 0.0
    return {"difference": diff, "ci95": [diff - Z95 * se, diff + Z95 * se],
            "improved": b, "worsened": c, "mcnemar_p": mcnemar_exact(b, c)}  # fmt: skip


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: the discordant pairs as a fair coin's b + c tosses."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def accuracy(correct: list[bool]) -> dict:
    k, n = sum(correct), len(correct)
    return {
        "questions": n,
        "correct": k,
        "accuracy": k / n if n else 0.0,
        "ci95": list(wilson(k, n)),
    }


def exam_report(questions, runs: dict) -> dict:
    """Per subject and overall: accuracy and interval per model; with both, their difference."""
    choices = {
        m: [max(range(len(p)), key=p.__getitem__) for p in probs] for m, probs in runs.items()
    }
    right = {m: [c == q.answer for c, q in zip(cs, questions)] for m, cs in choices.items()}
    groups = defaultdict(list)
    for i, q in enumerate(questions):
        groups[q.subject].append(i)
    groups = {**dict(sorted(groups.items())), "overall": list(range(len(questions)))}
    report = {}
    for name, rows in groups.items():
        entry = {m: accuracy([right[m][i] for i in rows]) for m in runs}
        if "base" in runs:
            entry["difference"] = paired_difference(
                [right["fine_tuned"][i] for i in rows], [right["base"][i] for i in rows]
            )
        report[name] = entry
    return report


def prediction_rows(questions, runs: dict) -> list[dict]:
    """One record per question: its answer, and each model's choice and letter probabilities."""
    rows = []
    for i, q in enumerate(questions):
        row = {"subject": q.subject, "id": q.id, "answer": LETTERS[q.answer]}
        for model, probs in runs.items():
            p = probs[i]
            row[model] = {"choice": LETTERS[max(range(len(p)), key=p.__getitem__)],
                          "probabilities": {LETTERS[j]: round(x, 6) for j, x in enumerate(p)}}  # fmt: skip
        rows.append(row)
    return rows


def format_exam(report: dict) -> str:
    """A table: subject, questions, each model's accuracy [95% interval], the difference."""
    models = [m for m in ("base", "fine_tuned") if m in report["overall"]]
    head = f"{'subject':32}{'n':>6}" + "".join(f"{m:>24}" for m in models)
    head += f"{'difference [95%]':>26}{'McNemar p':>11}" if "base" in models else ""
    lines = [head]
    for name, entry in report.items():
        line = f"{name[:31]:32}{entry[models[0]]['questions']:>6}"
        for m in models:
            a = entry[m]
            line += f"{a['accuracy']:>9.1%} [{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}]".rjust(24)
        if "difference" in entry:
            d = entry["difference"]
            line += f"{d['difference']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]".rjust(26)
            line += f"{d['mcnemar_p']:>11.3g}"
        lines.append(line)
    return "\n".join(lines)
