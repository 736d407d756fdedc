"""Bytes to records: decoding a data file and deciding its container, before any schema.

A data file arrives as bytes. Two questions come before "what does a row mean" (`records.py`):

- Which encoding? UTF-8 (with or without BOM) first, then GB18030, a superset of GBK and
  GB2312, common in Chinese medical data. Never the system default.
- Which container? Decided from the content, never from the file extension: a JSON array
  (`[`), JSON Lines or a single JSON object (`{`), else CSV/TSV with a header row, whose
  delimiter is sniffed from the first 8 KB.

The result is a list of `(row number, record)` pairs; a record that cannot even be parsed
(a malformed JSON line, a CSV row with the wrong number of fields, a JSON string holding a lone
surrogate such as "\\ud800", which no encoder can turn into bytes) is a `BadRow` in its place, so
the caller counts it under its reason.
"""

from __future__ import annotations

import csv
import io
import json
import sys

from ..errors import UserError


class BadRow(Exception):
    """A row that cannot be used; carries the skip reason."""


# ---------------------------------------------------------------------------------------------
# Bytes -> text


def decode_bytes(raw: bytes, path, encoding: str | None = None) -> tuple[str, str]:
    """Decode a data file; returns (text, encoding name). Never uses the system default.

    UTF-8 is tried first (a BOM is stripped), then GB18030 (a superset of GBK and GB2312).
    GB18030 accepts almost any byte sequence, so "it decodes" proves nothing: it is taken only
    when the result reads as Chinese (mostly CJK characters). Otherwise the file is UTF-8 with
    damaged bytes (a stray Latin-1 `é`, say), and decoding it as GB18030 would train on
    mojibake: we stop, naming the byte offset and --encoding.

    GBK bytes sometimes happen to form valid UTF-8 for a character or two, but they never spell
    Chinese in UTF-8; so if the text before the first bad byte decodes as mostly CJK characters,
    the file is UTF-8 Chinese with a damaged byte, and we report its offset as well.
    """
    if encoding:
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as e:
            raise UserError(f"{path}: cannot decode as {encoding}: {e}") from None
        warn_if_mojibake(raw, text, path, encoding)
        return text, encoding
    if raw.startswith(b"\xef\xbb\xbf"):
        try:
            return raw[3:].decode("utf-8"), "utf-8-sig"
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path}: invalid UTF-8 at byte offset {e.start + 3} (file starts with a UTF-8 BOM)"
            ) from None
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        utf8_error = e
    if _mostly_cjk(raw[: utf8_error.start].decode("utf-8")):
        raise UserError(
            f"{path}: invalid UTF-8 at byte offset {utf8_error.start} "
            f"(the file is UTF-8 Chinese text before that point; is it damaged? --encoding forces another encoding)"
        )
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: neither UTF-8 (bad byte at offset {utf8_error.start}) nor GB18030 "
            f"(bad byte at offset {e.start}); {_advice(raw)}"
        ) from None
    if not _mostly_cjk(text, of_letters=0.1):
        raise UserError(
            f"{path}: invalid UTF-8 at byte offset {utf8_error.start}, and the file does not read as "
            f"Chinese GB18030 either; {_advice(raw)}"
        )
    return text, "gb18030"


def _utf8_chinese(raw: bytes) -> bool:
    """The bytes are UTF-8 Chinese text, bad bytes aside."""
    return _mostly_cjk(raw.decode("utf-8", errors="replace"))


def fitting_encodings(raw: bytes) -> list[str]:
    """Encodings that decode every byte into plausible text: a CJK one only when the result reads
    as CJK, a Latin one only when the bytes are not UTF-8 Chinese (which Latin-1 turns into
    accented letters, 3.7 times as many characters: mojibake that trains without an error)."""
    fits = []
    for enc in ("gb18030", "big5", "shift_jis", "euc-kr"):
        try:
            if _mostly_cjk(raw.decode(enc), of_letters=0.1):
                fits.append(enc)
        except UnicodeDecodeError:
            pass
    if not _utf8_chinese(raw):
        fits += ["cp1252"] if _decodes(raw, "cp1252") else ["latin-1"]
    return fits


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _advice(raw: bytes) -> str:
    """What to do about bytes that are neither clean UTF-8 nor GB18030 Chinese."""
    fits = fitting_encodings(raw)
    if fits:
        return f"fix that byte, or pass --encoding {fits[0]} (it reads the whole file: {', '.join(fits)})"
    bad = raw.decode("utf-8", errors="replace").count("\ufffd")
    return (
        f"the file is UTF-8 Chinese with {bad} damaged byte sequence(s), and no other encoding "
        f"reads it: fix them (iconv -f utf-8 -t utf-8 -c drops them)"
    )


def warn_if_mojibake(raw: bytes, text: str, path, encoding: str) -> None:
    """--encoding given: say so when it turns UTF-8 Chinese into accented Latin letters."""
    if _mostly_cjk(text) or not _utf8_chinese(raw):
        return
    print(
        f"warning: {path} read as {encoding} gives accented Latin letters, but its bytes are "
        f"UTF-8 Chinese: the model would train on mojibake. Fix the file's bad bytes and drop "
        f"--encoding",
        file=sys.stderr,
    )


def _mostly_cjk(text: str, of_letters: float = 0.0) -> bool:
    """At least 2 CJK characters, half of the non-ASCII ones, and `of_letters` of all letters."""
    wide = [c for c in text if ord(c) > 127]
    cjk = [c for c in wide if "\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef"]
    letters = sum(c.isalpha() for c in text)
    return len(cjk) >= 2 and len(cjk) >= 0.5 * len(wide) and len(cjk) >= of_letters * letters


# ---------------------------------------------------------------------------------------------
# Text -> raw records (dicts), with their row numbers


def parse_records(text: str, path, report) -> list[tuple[int, object]]:
    """Split decoded text into (row number, record) pairs, deciding the container from content."""
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path} is empty")
    if stripped[0] == "[":
        report.container = "JSON array"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        return [(i, _refuse_surrogates(r)) for i, r in enumerate(data, start=1)]
    if stripped[0] == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            lists = [
                v for v in whole.values() if isinstance(v, list) and v and isinstance(v[0], dict)
            ]
            if len(lists) == 1 and not _looks_like_row(whole):
                report.container = "JSON object with a list of rows"
                return [(i, _refuse_surrogates(r)) for i, r in enumerate(lists[0], start=1)]
            report.container = "JSON (one row)"
            return [(1, _refuse_surrogates(whole))]
        report.container = "JSON Lines"
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, _refuse_surrogates(json.loads(line))))
            except json.JSONDecodeError:
                records.append((lineno, BadRow("malformed JSON line")))
        return records
    return _parse_csv(text, path, report)


def _refuse_surrogates(record):
    """The record, or a BadRow if a string in it holds a lone surrogate ("\\ud800" in JSON).

    JSON allows such escapes, Python keeps them in `str`, but they cannot be encoded as UTF-8:
    the tokenizer would fail on them later, far from the row that caused it.
    """
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return BadRow("invalid Unicode (a lone surrogate such as \\ud800)")
    return record


def _looks_like_row(obj: dict) -> bool:
    return any(
        k in obj for k in ("instruction", "output", "messages", "conversations", "conversation")
    )


def _parse_csv(text: str, path, report) -> list[tuple[int, object]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    sample = text[:8192]
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t;|")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    report.container = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"{path} is empty") from None
    if len(header) < 2 or len(set(header)) != len(header):
        raise UserError(
            f"{path}: not JSON, and its first line is not a CSV header with distinct column names"
        )
    records = []
    for rowno, values in enumerate(reader, start=1):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            records.append((rowno, BadRow("malformed CSV row (wrong number of fields)")))
        else:
            records.append((rowno, dict(zip(header, values))))
    return records
