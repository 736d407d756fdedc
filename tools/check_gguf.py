"""Let llama.cpp itself judge a GGUF written by `infer.py --export-gguf`: tokens, logits, stop tokens.

llama.cpp is not a test dependency (its Python wheel is ~750 MB), so this runs by hand, in two
steps and two environments:

    # 1. in the project's venv: the reference, from the merged HF checkpoint (`infer.py --export`)
    python tools/check_gguf.py reference merged/ ref.npz ["a question the adapter was trained on"]
    # 2. in a venv with llama.cpp's C API:
    #    python3 -m venv /tmp/llamavenv
    #    /tmp/llamavenv/bin/pip install --no-deps llama_cpp_cffi==0.4.17 cffi attrs numpy
    /tmp/llamavenv/bin/python tools/check_gguf.py llama model.gguf ref.npz

Step 2 tokenizes every reference text with llama.cpp (a wrong `tokenizer.ggml.pre` shows up
here, on digits and code), runs the model on the reference ids, and compares the logits at
every position with transformers'. It also checks that llama.cpp stops on each stop token and,
given a question, that greedy generation from the exported chat template's prompt gives the
same tokens as transformers and stops at the same place.
"""

from __future__ import annotations

import sys

TEXTS = [
    "你好，世界。头痛发热咳嗽，可以使用地榆槐角丸。",
    "Hello world, what is LoRA? It's a low-rank adapter.",
    "digits 0 1 12 123 1234 12345 3.14159 2026-11-25",
    "def f(x):\n    return x ** 2  # code\n\tindent",
    "<|im_start|>user\n问题<|im_end|>\n<|im_start|>assistant\n",
    "  spaces   and\n\nnewlines \r\n end",
]


def reference(merged_dir: str, out: str, question: str = "") -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    arrays = {}
    for i, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        arrays[f"ids{i}"], arrays[f"logits{i}"] = np.array(ids), logits
    eos = model.generation_config.eos_token_id
    arrays["stops"] = np.array(eos if isinstance(eos, list) else [eos])
    if question:  # the prompt the exported chat template renders, and the greedy answer
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        out_ids = model.generate(torch.tensor([ids]), max_new_tokens=60, do_sample=False)
        arrays["prompt"], arrays["answer"] = np.array(ids), out_ids[0, len(ids) :].numpy()
        print("transformers answers:", tok.decode(arrays["answer"]))
    np.savez(out, **arrays)
    print(f"reference for {len(TEXTS)} texts written to {out}")


def _llama_lib():
    """llama.cpp's C API through cffi, without the package's own imports (they need more)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("llama")
    package = types.ModuleType("llama")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["llama"] = package
    from llama._llama_cpp_cpu import ffi, lib

    return lib, ffi


def _clear_cache(lib, ctx) -> None:
    """Forget the previous text (the function's name changed across llama.cpp versions)."""
    for name in ("llama_kv_self_clear", "llama_kv_cache_clear"):
        if hasattr(lib, name):
            return getattr(lib, name)(ctx)
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)


def llama(gguf_path: str, ref: str) -> int:
    import numpy as np

    lib, ffi = _llama_lib()
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(gguf_path.encode(), lib.llama_model_default_params())
    if model == ffi.NULL:
        print("llama.cpp could not load the file")
        return 1
    vocab = lib.llama_model_get_vocab(model)
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 512, 512, 512
    params.type_k = params.type_v = 0  # GGML_TYPE_F32: an f16 cache would add its own rounding
    ctx = lib.llama_init_from_model(model, params)
    data = np.load(ref)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    failures = 0
    for i, text in enumerate(TEXTS):
        want = data[f"ids{i}"].tolist()
        raw = text.encode()
        buf = ffi.new("llama_token[]", 4 * len(raw) + 16)
        n = lib.llama_tokenize(vocab, raw, len(raw), buf, 4 * len(raw) + 16, False, True)
        got = [buf[j] for j in range(n)]
        same = got == want
        failures += not same
        print(f"text {i}: tokens {'identical' if same else 'DIFFER'} ({len(want)} tokens)")
        if not same:
            print(f"  transformers {want}\n  llama.cpp    {got}")
        _clear_cache(lib, ctx)
        batch = lib.llama_batch_init(len(want), 0, 1)
        for pos, token in enumerate(want):
            batch.token[pos], batch.pos[pos], batch.n_seq_id[pos] = token, pos, 1
            batch.seq_id[pos][0], batch.logits[pos] = 0, True
        batch.n_tokens = len(want)
        if lib.llama_decode(ctx, batch) != 0:
            print("  llama_decode failed")
            return 1
        ours = np.array(
            [
                np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, p), 4 * n_vocab), np.float32)
                for p in range(len(want))
            ]
        )
        theirs = data[f"logits{i}"][:, :n_vocab]
        diff = float(np.abs(ours - theirs).max())
        agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
        print(
            f"  logits: max |diff| {diff:.2e} (max |logit| {np.abs(theirs).max():.2f}), argmax agree {agree:.0%}"
        )
        lib.llama_batch_free(batch)
    for stop in data["stops"].tolist():
        eog = bool(lib.llama_vocab_is_eog(vocab, stop))
        failures += not eog
        print(
            f"stop token {stop}: {'end of generation' if eog else 'NOT an end-of-generation token'}"
        )
    if "prompt" in data:
        failures += not _same_greedy_answer(lib, ffi, ctx, vocab, data, n_vocab)
    template = lib.llama_model_chat_template(model, ffi.NULL)
    print("chat template in the file:", "yes" if template != ffi.NULL else "NO")
    return 1 if failures else 0


def _same_greedy_answer(lib, ffi, ctx, vocab, data, n_vocab) -> bool:
    """Greedy decoding in llama.cpp from the reference prompt, until an end-of-generation token."""
    import numpy as np

    _clear_cache(lib, ctx)
    prompt, want = data["prompt"].tolist(), data["answer"].tolist()
    batch = lib.llama_batch_init(len(prompt) + 1, 0, 1)
    tokens, pos, answer = prompt, 0, []
    while len(answer) < 60:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if lib.llama_decode(ctx, batch) != 0:
            break
        pos += len(tokens)
        logits = np.frombuffer(
            ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * n_vocab), np.float32
        )
        token = int(logits.argmax())
        answer.append(token)
        if lib.llama_vocab_is_eog(vocab, token):
            break
        tokens = [token]
    lib.llama_batch_free(batch)
    same = answer == want
    print(
        f"greedy answer from the chat template's prompt: {'identical' if same else 'DIFFERS'} ({len(answer)} tokens, ends on {answer[-1]})"
    )
    if not same:
        print(f"  transformers {want}\n  llama.cpp    {answer}")
    return same


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit(reference(*rest) if mode == "reference" else llama(*rest))
