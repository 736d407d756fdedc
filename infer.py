"""Ask a trained adapter: `python infer.py --adapter out/ --prompt "..."`.

Modes: one question (--prompt, or --instruction/--input), a file of questions (--file), a chat
(no question: turns from a terminal or piped in, one per line), before/after (--compare),
--export DIR to write a merged standalone checkpoint, --export-gguf FILE for llama.cpp and
Ollama (a GGUF file and a Modelfile), and --inspect to see what training changed. A thin CLI over `lora/infer/`
(its flags are declared in `lora/infer/options.py`), `lora/export/` and `lora/inspect.py`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from lora.errors import Terminated, UserError, exit_status, raise_terminated, with_path
from lora.infer.options import add_infer_flags, check_values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate with a LoRA adapter trained by train.py (or by peft).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_infer_flags(p)  # every flag, its default and help: lora/infer/options.py
    return p


def run(args) -> int:
    """Check everything, write what was asked for (exports, inspect), then answer questions."""
    from lora.adapter import read_adapter_config

    check_values(args)
    check_combinations(args)
    read_adapter_config(args.adapter)  # a missing or broken adapter is the first thing to report
    wrote = export_and_inspect(args)
    question = args.prompt or args.instruction
    if wrote and not (question or args.file or args.chat or args.mcq):
        return 0
    interactive = args.chat or not (question or args.file or args.mcq)  # typed or piped turns
    questions = read_questions(args)  # a bad file is reported before the (slow) model load
    exam = read_exam_questions(args)
    loaded, settings = load(args, questions)
    if question:
        ask_one(loaded, settings, args)
    if args.file:
        answer_and_score(loaded, questions, settings, args)
    if args.mcq:
        sit_exam(loaded, exam, args)
    if interactive:
        from lora.infer.chat import chat

        chat(loaded, settings)
    return 0


def check_combinations(args) -> None:
    """Flags that do not go together, and optional libraries a flag needs, before anything loads."""
    if args.merge and args.quantize != "none":
        raise UserError(
            f"--merge and --quantize {args.quantize} do not combine: the adapter cannot be added "
            "into quantized weights; drop --merge, or drop --quantize to merge into the full base"
        )
    if args.merge and args.compare:
        raise UserError("--merge and --compare do not combine: compare needs the adapter separate")
    if (args.no_base or args.inspect_layers) and not args.inspect:
        raise UserError("--no-base and --inspect-layers go with --inspect")
    if args.mcq and args.file and args.output:
        raise UserError("--mcq and --file each write into --output: run them separately")
    if args.shots and not args.mcq:
        raise UserError("--shots goes with --mcq")
    if args.score:
        from lora.infer.score import metric_libraries

        if not args.file:
            raise UserError(
                "--score needs --file: a file of questions whose answers are the references"
            )
        metric_libraries()  # a missing metric library is reported before the model loads
    if args.export_gguf:  # refuse a bad output path before writing anything
        from lora.export.output import check_output_path

        check_output_path(args.export_gguf)


def export_and_inspect(args) -> bool:
    """--export, --export-gguf, --inspect; True when any of them ran."""
    if args.export:
        from lora.export.merged import export_merged

        if args.quantize != "none":
            print(
                f"note: --export merges into the unquantized base checkpoint; --quantize "
                f"{args.quantize} applies only to generation",
                file=sys.stderr,
            )
        path = export_merged(args.adapter, args.export, args.model, args.trust_remote_code)
        print(
            f"merged model written to {path}: load it with AutoModelForCausalLM.from_pretrained('{path}')"
        )
    if args.export_gguf:
        from lora.export.gguf import export_gguf

        gguf_path, modelfile_path = export_gguf(
            args.adapter, args.export_gguf, args.gguf_type, args.model, args.trust_remote_code
        )
        print(
            f"try it: llama-cli -m {gguf_path} --jinja   or   ollama create mymodel -f {modelfile_path}"
        )
    if args.inspect:
        from lora import inspect

        inspect.run(args)
    return bool(args.export or args.export_gguf or args.inspect)


def read_questions(args) -> list:
    if not args.file:
        return []
    from lora.data.records import read_dataset

    questions, report = read_dataset(args.file, args.columns, questions=True)
    for line in report.lines():
        print(line, file=sys.stderr)
    return questions


def load(args, questions):
    """Base + adapter as the flags say (merged with --merge); returns (loaded, settings)."""
    import torch

    from lora.infer import generate as gen

    torch.manual_seed(args.seed)
    options = gen.LoadOptions(
        args.model, args.device, args.dtype, args.quantize, args.trust_remote_code, args.system
    )
    loaded = gen.load_for_inference(args.adapter, options)
    if loaded.system_source == "data":
        print(
            f"note: using the system prompt most training rows carried: {loaded.fmt.system!r} "
            "(--system overrides it)",
            file=sys.stderr,
        )
    if args.merge:  # fold LoRA into the weights: no adapter cost per token
        report = gen.merge_and_measure(loaded, first_question(args, questions))
        print(report.message(), file=sys.stderr)
    settings = gen.GenerationSettings(
        args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty
    )
    return loaded, settings


def ask_one(loaded, settings, args) -> None:
    """--prompt or --instruction/--input: one answer (with --compare, the base model's too)."""
    from lora.infer import generate as gen

    sample = gen.single_turn(
        args.prompt or args.instruction, args.input if args.instruction else ""
    )
    if args.compare:
        (r,) = gen.generate_compare(loaded, [sample], settings)
        print(
            f"=== base model ===\n{r['base']['answer']}\n=== fine-tuned ===\n{r['tuned']['answer']}"
        )
        cut = [
            name
            for name, key in (("base", "base"), ("fine-tuned", "tuned"))
            if not r[key]["stopped"]
        ]
    else:
        (r,) = gen.generate_batch(loaded, [sample], settings)
        if args.show_reasoning and r["reasoning"]:
            print(f"<think>\n{r['reasoning']}\n</think>\n")
        print(r["answer"])
        cut = [] if r["stopped"] else ["the answer"]
    for name in cut:
        print(f"[{name}: stopped at --max-new-tokens {args.max_new_tokens} without an end token]",
              file=sys.stderr)  # fmt: skip


def first_question(args, questions):
    """The prompt on which --merge measures what merging changed: the first one asked."""
    from lora.infer import generate as gen

    if args.prompt or args.instruction:
        return gen.single_turn(
            args.prompt or args.instruction, args.input if args.instruction else ""
        )
    return gen.single_turn(questions[0].turns[-1].user if questions else "你好")


def answer_and_score(loaded, questions, settings, args) -> None:
    """--file: answers as JSONL (resumable with --output); --score: the before/after report."""
    from lora.adapter import atomic_write_bytes
    from lora.infer.answers import answer_file
    from lora.infer.score import format_report, score

    output = Path(args.output) if args.output else None
    try:
        records = answer_file(loaded, questions, settings, args.batch_size, output, args.compare)
    except OSError as e:  # a full disk's write() names no file: name --output
        raise with_path(e, output or "standard output") from None
    if output:
        print(f"answers written to {output}", file=sys.stderr)
    if args.score:
        report = score(loaded, questions, records, args.compare, args.batch_size)
        path = score_path(output, args.adapter)
        text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(path, text.encode())
        print(format_report(report), file=sys.stderr)
        print(f"scores written to {path}", file=sys.stderr)


def read_exam_questions(args) -> list:
    if not args.mcq:
        return []
    from lora.data.exam import read_exam

    exam, report = read_exam(args.mcq)
    for line in report.lines():
        print(line, file=sys.stderr)
    return exam


def sit_exam(loaded, exam, args) -> None:
    """--mcq: letter probabilities per question, the accuracy table, mcq.json and predictions."""
    from lora.adapter import atomic_write_bytes
    from lora.infer.exam import ExamSettings, exam_report, format_exam, prediction_rows, take_exam

    runs = take_exam(loaded, exam, ExamSettings(args.shots, args.batch_size), args.compare)
    report = {
        "adapter": str(args.adapter),
        "shots": args.shots,
        "subjects": exam_report(exam, runs),
    }
    folder = Path(args.output) if args.output else Path(args.adapter)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(folder / "mcq.json", text.encode())
    rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prediction_rows(exam, runs))
    atomic_write_bytes(folder / "mcq-predictions.jsonl", rows.encode())
    print(format_exam(report["subjects"]), file=sys.stderr)
    print(f"exam results written to {folder / 'mcq.json'} (per question: "
          f"{folder / 'mcq-predictions.jsonl'})", file=sys.stderr)  # fmt: skip


def score_path(output: Path | None, adapter) -> Path:
    """Where --score writes its report: named after --output (answers.jsonl ->
    answers.score.json), so scoring two adapters into one directory keeps both; without
    --output, score.json in the adapter's directory."""
    if output is None:
        return Path(adapter) / "score.json"
    return output.with_name(f"{output.stem}.score.json")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # exports clean up on the way out
    try:
        return run(args)
    except (UserError, ModuleNotFoundError, OSError) as e:  # one line each (lora/errors.py)
        status = exit_status(e)
        if status is None:
            raise
        return status
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM): nothing half-written was left", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
