"""Did the fine-tune help? Before/after scores of answers against reference answers.

A loss curve says training converged, not that answers got better. `infer.py --file test.json
--score [--compare]` answers every question (see answers.py), then reports three kinds of
numbers for the fine-tuned model, and with `--compare` for the base model beside it:

Reference likelihood
    The negative log-likelihood per token of each *reference* answer given its prompt, summed
    over every supervised token of the file and divided by their count: exactly the training
    loss (same template, same masking, same shifted cross-entropy, `train/loss.py`), and its
    perplexity exp(NLL). No generation is involved, so it is cheap and free of decoding
    choices: the cleanest before/after number.

Overlap with the reference (needs `pip install -r requirements-eval.txt`)
    BLEU-4: sacrebleu's corpus BLEU with its `zh` tokenizer (Chinese characters one by one,
        other text by words), 0-100.
    ROUGE-1/2/L: F1 from `rouge-chinese` over words segmented by `jieba`, averaged over rows,
        ×100 — the computation LLaMA-Factory's `do_predict` reports.
    Overlap rewards wording close to the reference; a correct answer phrased differently
    scores low. Read it beside the likelihood and the answers themselves.

Answer health
    Mean answer length (characters) beside the references', the share of answers cut at
    --max-new-tokens without an end token ("never stops"), and the share of empty answers.
"""

from __future__ import annotations

import logging
import math

import torch

from ..data.batching import collate
from ..data.prompt import encode_sample
from ..errors import UserError
from ..inject import lora_disabled
from ..train.loss import CausalLMLoss

METRIC_NAMES = {
    "bleu4": "sacrebleu corpus BLEU-4, tokenize=zh",
    "rouge-1": "rouge-chinese ROUGE-1 F1 over jieba words, mean of rows, x100",
    "rouge-2": "rouge-chinese ROUGE-2 F1 over jieba words, mean of rows, x100",
    "rouge-l": "rouge-chinese ROUGE-L F1 over jieba words, mean of rows, x100",
}


def metric_libraries():
    """(sacrebleu, jieba, Rouge), or one clear line saying what to install."""
    try:
        import jieba
        import sacrebleu
        from rouge_chinese import Rouge
    except ImportError as e:
        raise UserError(
            f"--score needs the metric libraries ({e.name} is missing): "
            "pip install -r requirements-eval.txt"
        ) from None
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on every run
    return sacrebleu, jieba, Rouge


@torch.no_grad()
def reference_nll(loaded, samples, batch_size: int = 8) -> dict:
    """Σ NLL of the reference answers' tokens / their count, as in training; rows without one skip."""
    max_len = getattr(loaded.model.config, "max_position_embeddings", None)
    referenced = [s for s in samples if s.turns[-1].assistant]
    rows = [encode_sample(s, loaded.fmt, loaded.tokenizer, max_len) for s in referenced]
    rows = [r for r in rows if r is not None]
    if not rows:
        return {"nll": None, "ppl": None, "tokens": 0, "rows": 0}
    loss = CausalLMLoss(loaded.model)
    device = next(loaded.model.parameters()).device
    total = count = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], loaded.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, n = loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        total, count = total + float(loss_sum), count + n
    nll = total / count
    return {"nll": nll, "ppl": math.exp(min(nll, 50)), "tokens": int(count), "rows": len(rows)}


def overlap(answers: list[str], references: list[str]) -> dict:
    """BLEU-4 and ROUGE-1/2/L of answers against references (both lists aligned), 0-100."""
    sacrebleu, jieba, Rouge = metric_libraries()
    bleu = sacrebleu.corpus_bleu(answers, [references], tokenize="zh").score
    rouge, sums = Rouge(), {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for answer, reference in zip(answers, references):
        hyp, ref = " ".join(jieba.cut(answer)).strip(), " ".join(jieba.cut(reference)).strip()
        if not hyp or not ref:
            continue  # an empty answer scores 0 (rouge-chinese refuses empty strings)
        for key, value in rouge.get_scores(hyp, ref)[0].items():
            sums[key] += value["f"]
    return {"bleu4": bleu, **{k: 100 * v / len(answers) for k, v in sums.items()}}


def health(answers: list[str], stop_reasons: list[str], references: list[str]) -> dict:
    """Length vs references, share cut at the token limit, share empty."""
    n = max(len(answers), 1)
    return {
        "answer_chars_mean": sum(len(a) for a in answers) / n,
        "reference_chars_mean": sum(len(r) for r in references) / len(references)
        if references
        else None,
        "cut_at_max_new_tokens": sum(r == "length" for r in stop_reasons) / n,
        "empty": sum(not a.strip() for a in answers) / n,
    }


def model_scores(records: list[dict], prefix: str, nll: dict) -> dict:
    """Every number for one model (`prefix` "" for the fine-tuned one, "base_" for the base)."""
    answers = [r[prefix + "answer"] for r in records]
    stops = [r[prefix + "stop_reason"] for r in records]
    referenced = [r for r in records if r["reference"]]
    references = [r["reference"] for r in referenced]
    scores = {"reference_likelihood": nll, **health(answers, stops, references)}
    if referenced:
        scores["overlap"] = overlap([r[prefix + "answer"] for r in referenced], references)
    return scores


def score(loaded, samples, records: list[dict], compare: bool, batch_size: int = 8) -> dict:
    """The report `--score` prints and writes to score.json."""
    referenced = sum(1 for r in records if r["reference"])
    report = {
        "rows": len(records),
        "rows_with_reference": referenced,
        "rows_without_reference": len(records) - referenced,  # scored for health only
        "metrics": METRIC_NAMES,
        "fine_tuned": model_scores(records, "", reference_nll(loaded, samples, batch_size)),
    }
    if compare:
        with lora_disabled(loaded.model):
            base_nll = reference_nll(loaded, samples, batch_size)
        report["base"] = model_scores(records, "base_", base_nll)
    return report


def format_report(report: dict) -> str:
    """A small table: one row per number, one column per model."""
    models = [m for m in ("base", "fine_tuned") if m in report]
    rows = [("reference NLL / token", lambda s: (s["reference_likelihood"]["nll"], ".4f")),
            ("reference perplexity", lambda s: (s["reference_likelihood"]["ppl"], ".2f"))]  # fmt: skip
    for key in ("bleu4", "rouge-1", "rouge-2", "rouge-l"):
        rows.append((key, lambda s, k=key: (s.get("overlap", {}).get(k), ".2f")))
    rows += [
        ("answer length (chars)", lambda s: (s["answer_chars_mean"], ".1f")),
        ("cut at --max-new-tokens (%)", lambda s: (100 * s["cut_at_max_new_tokens"], ".1f")),
        ("empty answers (%)", lambda s: (100 * s["empty"], ".1f")),
    ]
    lines = [f"{'':30}" + "".join(f"{m:>14}" for m in models)]
    for name, get in rows:
        cells = []
        for m in models:
            value, fmt = get(report[m])
            cells.append(f"{value:>14{fmt}}" if value is not None else f"{'-':>14}")
        lines.append(f"{name:30}" + "".join(cells))
    ref = report["fine_tuned"]["reference_chars_mean"]
    lines.append(f"rows {report['rows']} ({report['rows_with_reference']} with a reference"
                 + (f", reference length {ref:.1f} chars" if ref is not None else "") + ")")  # fmt: skip
    return "\n".join(lines)
