"""Reading user text files (prompt data, YAML configs) as UTF-8, with errors that point at the byte.

``read_utf8(path)`` returns the text of ``path`` with a leading byte-order mark removed (Excel and
Windows editors write one; left in place it becomes part of the first CSV column name or breaks the
first JSON line). A file that is not UTF-8 raises :class:`TextEncodingError` naming the file, the line,
the column and the byte offset of the first undecodable byte, and the fix.

Left out on purpose: guessing other encodings (a silent latin-1 fallback would turn bytes into the
wrong characters and train on them).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TextEncodingError", "read_utf8", "utf8_error_message"]

BOM = "\ufeff"


class TextEncodingError(ValueError):
    """A text input file is not valid UTF-8; the message names the file, the line and the byte offset."""


def utf8_error_message(path: str | Path, data: bytes, err: UnicodeDecodeError) -> str:
    """One-line description of ``err`` (raised decoding ``data``, the bytes of ``path``)."""
    offset = err.start
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    bad = data[offset : offset + 1].hex()
    return (
        f"{path}: not UTF-8 text: byte 0x{bad} at line {line}, column {column} (byte offset {offset}) "
        f"cannot be decoded ({err.reason}); re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    )


def read_utf8(path: str | Path) -> str:
    """The text of ``path`` decoded as UTF-8, without a leading byte-order mark."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextEncodingError(utf8_error_message(path, data, err)) from None
    return text[1:] if text.startswith(BOM) else text
