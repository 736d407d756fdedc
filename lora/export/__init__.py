"""Stage 4, export: the fine-tune as files other servers load (vLLM, llama.cpp, Ollama).

Reading order:
    merged.py      base + adapter merged in fp32 into one plain Hugging Face checkpoint
    serving.py     the trained prompt for servers: chat template, Ollama Modelfile, stop tokens
    gguf.py        one GGUF file for llama.cpp / Ollama
    output.py      where an export writes: whole or absent, readable, no stale temporaries
"""
