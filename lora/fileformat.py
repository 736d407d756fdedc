"""Bytes to records: decoding a data file and deciding its container, before any schema.

A data file arrives as bytes. Two questions come before "what does a row mean" (`data.py`):

- Which encoding? UTF-8 (with or without BOM) first, then GB18030, a superset of GBK and
  GB2312, common in Chinese medical data. Never the system default.
- Which container? Decided from the content, never from the file extension: a JSON array
  (`[`), JSON Lines or a single JSON object (`{`), else CSV/TSV with a header row, whose
  delimiter is sniffed from the first 8 KB.

The result is a list of `(row number, record)` pairs; a record that cannot even be parsed
(a malformed JSON line, a CSV row with the wrong number of fields) is a `BadRow` in its place,
so the caller counts it under its reason.
"""

from __future__ import annotations

import csv
import io
import json
import sys

from .errors import UserError


class BadRow(Exception):
    """A row that cannot be used; carries the skip reason."""


# ---------------------------------------------------------------------------------------------
# Bytes -> text


def decode_bytes(raw: bytes, path, encoding: str | None = None) -> tuple[str, str]:
    """Decode a data file; returns (text, encoding name). Never uses the system default.

    UTF-8 is tried first (a BOM is stripped), then GB18030 (a superset of GBK and GB2312).
    GBK bytes sometimes happen to form valid UTF-8 for a character or two, but they never spell
    Chinese in UTF-8; so if the text before the first bad byte decodes as mostly CJK characters,
    the file is UTF-8 Chinese with a damaged byte, and we report its offset rather than decode
    the whole file into nonsense.
    """
    if encoding:
        try:
            return raw.decode(encoding), encoding
        except (UnicodeDecodeError, LookupError) as e:
            raise UserError(f"{path}: cannot decode as {encoding}: {e}") from None
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
        return raw.decode("gb18030"), "gb18030"
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: neither UTF-8 (bad byte at offset {utf8_error.start}) nor GB18030 "
            f"(bad byte at offset {e.start}); pass --encoding NAME"
        ) from None


def _mostly_cjk(text: str) -> bool:
    wide = [c for c in text if ord(c) > 127]
    cjk = [c for c in wide if "\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef"]
    return len(cjk) >= 2 and len(cjk) >= 0.5 * len(wide)


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
        return list(enumerate(data, start=1))
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
                return list(enumerate(lists[0], start=1))
            report.container = "JSON (one row)"
            return [(1, whole)]
        report.container = "JSON Lines"
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError:
                records.append((lineno, BadRow("malformed JSON line")))
        return records
    return _parse_csv(text, path, report)


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
