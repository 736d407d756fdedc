"""A cache of prepared data: the same file, tokenizer and settings are tokenized only once.

Preparing a million rows takes minutes; a second run on the same data should start training
in seconds. The cache directory holds one entry per *key*, a hash of everything that shapes
the prepared rows:

    the bytes of every --data file, in order, and of --val-data  (any edit gives a new key)
    the tokenizer (its full definition) and chat template
    the prompt format: template, system prompt, thinking
    --columns, --max-len, --strict, --dedup, --encoding, --val-size, --seed, --drop-cut-answers
    FORMAT_VERSION                            (bumped when this code changes what it writes)

So any change invalidates it; nothing has to be cleaned by hand. An entry is a directory of
`.npy` arrays (see `tokenized.py`) and a `meta.json` with the summary and each file's size and
SHA-256. It is written under a temporary name and renamed into place, so a crash never leaves a
half-written entry under the real name; on load every file is checked against `meta.json`,
and an entry that does not match (truncated, edited, partial) is deleted and rebuilt, never
trusted. `--no-cache` opts out. Location: `--cache-dir`, else `$QWEN_LORA_CACHE`, else
`~/.cache/qwen-lora/data`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .mixture import parse_data
from .tokenized import TokenizedSet

FORMAT_VERSION = 2  # 2: several --data files, rows per file in the summary
SPLITS = ("train", "val")


def cache_root(cfg) -> Path:
    explicit = getattr(cfg, "cache_dir", None) or os.environ.get("QWEN_LORA_CACHE")
    return Path(explicit or Path.home() / ".cache" / "qwen-lora" / "data")


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's whole definition (vocabulary, merges, special tokens, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    )
    extra = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token,
    ]
    return hashlib.sha256((definition + json.dumps(extra)).encode()).hexdigest()


def data_paths(cfg) -> list[str]:
    """The --data files (their sampling weights do not change the prepared rows: mixture.py)."""
    return [source.path for source in parse_data(cfg.data)]


def cache_key(cfg, tokenizer, fmt) -> str:
    """The hash of every input that shapes the prepared rows (see the module docstring)."""
    parts = {
        "version": FORMAT_VERSION,
        "data": [file_digest(path) for path in data_paths(cfg)],
        "val_data": file_digest(cfg.val_data) if cfg.val_data else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": [fmt.template, fmt.system, fmt.enable_thinking],
        "settings": [
            cfg.columns,
            cfg.max_len,
            cfg.strict,
            cfg.dedup,
            cfg.encoding,
            cfg.val_size,
            cfg.seed if cfg.val_size else None,
            getattr(cfg, "drop_cut_answers", False),
        ],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_entry(cfg, tokenizer, fmt) -> Path | None:
    """Where the prepared data of these inputs lives (None when a data file is missing)."""
    if not all(Path(p).is_file() for p in [*data_paths(cfg), cfg.val_data] if p):
        return None  # reading the data reports the missing file
    return cache_root(cfg) / cache_key(cfg, tokenizer, fmt)


def load_cached(entry: Path, log):
    """(train, val, summary) from a verified cache entry, else None (a bad entry is removed)."""
    if not entry.exists():
        return None
    try:
        return _read_entry(entry)
    except (OSError, ValueError, KeyError) as e:
        log(f"data: the cache entry {entry} is corrupt or partial ({e}); rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _read_entry(entry: Path):
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    for name, (size, digest) in meta["files"].items():
        path = entry / name
        if path.stat().st_size != size or file_digest(path) != digest:
            raise ValueError(f"{name} does not match its recorded size and checksum")
    train, val = load_sets(entry)
    summary = meta["summary"]
    summary["cache"] = str(entry)
    return train, val, summary


def load_sets(entry: Path) -> tuple[TokenizedSet, TokenizedSet]:
    """The train and validation sets of an entry, memory-mapped."""
    train, val = (TokenizedSet.load(entry, split) for split in SPLITS)
    return train, val


def save_cached(entry: Path, prepared, log) -> Path | None:
    """Write an entry under a temporary name, then rename it into place. Returns its path."""
    train, val, summary = prepared
    root = entry.parent
    tmp = root / f".tmp-{entry.name}-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        paths = train.save(tmp, "train") + val.save(tmp, "val")
        files = {p.name: (p.stat().st_size, file_digest(p)) for p in paths}
        meta = {"version": FORMAT_VERSION, "files": files, "summary": summary}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, entry) if not entry.exists() else shutil.rmtree(tmp)
    except OSError as e:  # a full or read-only disk costs the cache, not the run
        log(f"data: could not write the cache in {root} ({e}); continuing without it")
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return entry
