"""UTF-8 text reading with messages that name the file, line and column of a bad byte (used
for ground-truth lists and configuration files)."""

from __future__ import annotations

import io
from pathlib import Path


class TextDecodeError(ValueError):
    """A text file that is not UTF-8; ``str()`` is ``<source>:<line>: <reason>``."""

    def __init__(self, source: Path | str, line: int, reason: str) -> None:
        self.source, self.line, self.reason = str(source), line, reason
        super().__init__(f"{source}:{line}: {reason}")


def decode_text(data: bytes, source: Path | str) -> str:
    """``data`` decoded as UTF-8, or :class:`TextDecodeError`
    ``<source>:<line>: not UTF-8 text: byte 0xe9 at column 7 (invalid continuation byte)…``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise TextDecodeError(
            source,
            line,
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at column {column} ({exc.reason}); "
            "save the file as UTF-8",
        ) from None


def read_text_lines(path: Path | str) -> list[str]:
    """The lines of a UTF-8 text file (universal newlines, ends stripped), or
    :class:`TextDecodeError` naming the file and line."""
    text = decode_text(Path(path).read_bytes(), path)
    return [line.rstrip("\n") for line in io.StringIO(text, newline=None)]
