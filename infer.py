"""Ask a trained adapter: `python infer.py --adapter out/ --prompt "..."`.

Modes: one question (--prompt, or --instruction/--input), a file of questions (--file), an
interactive chat (no question and a terminal, or --chat), before/after (--compare),
--export DIR to write a merged standalone checkpoint, and --inspect to see what training
changed (`lora/inspect.py`). A thin CLI over `lora.generate`.
"""

from __future__ import annotations

import argparse
import json
import sys

from lora.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate with a LoRA adapter trained by train.py (or by peft).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--adapter", required=True, help="adapter directory (train.py's --output, or out/best)"
    )
    p.add_argument(
        "--model", default=None, help="base model (default: the one recorded in the adapter)"
    )
    q = p.add_argument_group("what to ask")
    q.add_argument("--prompt", default=None, help="one question")
    q.add_argument("--instruction", default=None, help="Alpaca-style instruction (with --input)")
    q.add_argument("--input", default="", help="Alpaca-style input for --instruction")
    q.add_argument(
        "--file",
        default=None,
        help="questions file (any format train.py reads; answers become references)",
    )
    q.add_argument(
        "--output", default=None, help="with --file: write answers here as JSONL (default: stdout)"
    )
    q.add_argument(
        "--chat",
        action="store_true",
        help="interactive chat reading standard input, even without a terminal",
    )
    q.add_argument("--columns", default=None, help="with --file: column mapping as in train.py")
    m = p.add_argument_group("modes")
    m.add_argument(
        "--compare",
        action="store_true",
        help="show the base model's answer beside the fine-tuned one",
    )
    m.add_argument(
        "--merge",
        action="store_true",
        help="merge LoRA into the weights before generating (faster, same answers)",
    )
    m.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="write a merged standalone HF checkpoint to DIR",
    )
    m.add_argument(
        "--inspect",
        action="store_true",
        help="what did training change? per-module ‖ΔW‖, spectra, ranks; writes inspect.json/.png",
    )
    m.add_argument(
        "--inspect-layers",
        default=None,
        help="with --inspect: layers for the W0-SVD comparisons, 0,12,23 or all (default: first, middle, last)",
    )
    m.add_argument(
        "--no-base",
        action="store_true",
        help="with --inspect: read only the adapter file (fast; no ‖W0‖, no amplification)",
    )
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--batch-size", type=int, default=8, help="questions per generate call with --file"
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="base weights' dtype (auto: bf16 on GPU, fp32 on CPU)",
    )
    g.add_argument("--trust-remote-code", action="store_true")
    return p


def run(args) -> int:
    import torch

    from lora import generate as gen
    from lora.adapter import read_adapter_config
    from lora.data import read_dataset
    from lora.inject import merge_lora

    read_adapter_config(args.adapter)  # a missing or broken adapter is the first thing to report
    if (args.no_base or args.inspect_layers) and not args.inspect:
        raise UserError("--no-base and --inspect-layers go with --inspect")
    if args.export:
        path = gen.export_merged(args.adapter, args.export, args.model, args.trust_remote_code)
        print(
            f"merged model written to {path}: load it with AutoModelForCausalLM.from_pretrained('{path}')"
        )
        if not (args.prompt or args.instruction or args.file or args.chat):
            return 0
    if args.inspect:
        from lora import inspect

        inspect.run(args)
        if not (args.prompt or args.instruction or args.file or args.chat):
            return 0

    question = args.prompt or args.instruction
    interactive = args.chat or (not question and not args.file and sys.stdin.isatty())
    if not question and not args.file and not interactive:
        raise UserError(
            "nothing to ask: give --prompt, --instruction, --file or --chat (standard input is not a terminal)"
        )
    if args.merge and args.compare:
        raise UserError("--merge and --compare do not combine: compare needs the adapter separate")

    # Load and check everything the run needs before the (slow) model load.
    questions = []
    if args.file:
        questions, report = read_dataset(args.file, args.columns, questions=True)
        for line in report.lines():
            print(line, file=sys.stderr)

    torch.manual_seed(args.seed)
    loaded = gen.load_for_inference(
        args.adapter, args.model, args.device, args.dtype, args.trust_remote_code
    )
    if args.merge:  # fold LoRA into the weights: same answers, no adapter cost per token
        merge_lora(loaded.model)
    settings = gen.GenerationSettings(
        args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty
    )

    if question:
        sample = gen.single_turn(question, args.input if args.instruction else "")
        if args.compare:
            (r,) = gen.generate_compare(loaded, [sample], settings)
            print(
                f"=== base model ===\n{r['base']['answer']}\n=== fine-tuned ===\n{r['tuned']['answer']}"
            )
        else:
            (r,) = gen.generate_batch(loaded, [sample], settings)
            print(r["answer"])
            if not r["stopped"]:
                print(
                    f"[stopped at --max-new-tokens {args.max_new_tokens} without an end token]",
                    file=sys.stderr,
                )
    if args.file:
        answer_file(loaded, questions, settings, args)
    if interactive:
        chat(loaded, settings)
    return 0


def answer_file(loaded, questions, settings, args) -> None:
    from tqdm import tqdm

    from lora import generate as gen
    from lora.data import Sample, Turn

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115 (stdout or a file)
    try:
        for start in tqdm(
            range(0, len(questions), args.batch_size),
            desc="answering",
            unit="batch",
            file=sys.stderr,
        ):
            batch = questions[start : start + args.batch_size]
            # The last turn is the question; its recorded answer (if any) is the reference.
            asks = [
                Sample(
                    s.turns[:-1] + (Turn(s.turns[-1].user, "", s.turns[-1].user_input),),
                    s.system,
                    s.row,
                )
                for s in batch
            ]
            if args.compare:
                results = gen.generate_compare(loaded, asks, settings)
            else:
                results = [{"tuned": r} for r in gen.generate_batch(loaded, asks, settings)]
            for s, r in zip(batch, results):
                last = s.turns[-1]
                line = {
                    "row": s.row,
                    "prompt": f"{last.user}\n{last.user_input}".strip(),
                    "reference": last.assistant or None,
                    "answer": r["tuned"]["answer"],
                }
                if "base" in r:
                    line["base_answer"] = r["base"]["answer"]
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
            print(f"answers written to {args.output}", file=sys.stderr)


def chat(loaded, settings) -> None:
    """Multi-turn chat on standard input; tokens are printed as they are generated."""
    from transformers import TextStreamer

    from lora import generate as gen
    from lora.data import Sample, Turn

    history: list[Turn] = []
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("chat with the fine-tuned model: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        print("model> ", end="", flush=True)
        (r,) = gen.generate_batch(
            loaded, [Sample(tuple(history) + (Turn(text, ""),))], settings, streamer=streamer
        )
        history.append(Turn(text, r["answer"]))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
