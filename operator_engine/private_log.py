"""Keeps a private algorithm's code out of its job's log.

A private algorithm is usable only inside jobs: its consumer must not read its code, and yet an
interpreter prints source lines when the code fails (Python's tracebacks and SyntaxErrors print
each line stripped of its indentation; warnings print them too). So, for a private algorithm
only, every line of its output that, stripped of surrounding whitespace, equals a non-blank
stripped line of the code is replaced by `NOTICE` before it reaches the log, and with it the
live stream and the published log alike. The exception's type and message, on lines of their
own, stay.

The filter sits between the sandbox's pipe and the log file, in the engine's process: the
engine reads the pipe as before, so a chatty algorithm never blocks on it, and the log's cap
applies to what the filter lets through. Lines end at "\\n" or "\\r" (a terminal shows either
as a line break). A line is held back only while it may still become a line of the code: as
soon as its text so far cannot begin one, it passes at once, so progress output without a
newline still streams live; a line that could be code waits for its end, or for the end of the
job (`finish`). What is held is bounded: whitespace beyond the bound is let through, and a line
whose held text still grows past it is decided there and then.

Known limits: a line of the code printed with something else on the same line (a prefix, a
line number) is not a line of the code and passes; so do fragments of a line (a long line an
interpreter cuts short). The algorithm's own output is its publisher's choice."""

from __future__ import annotations

import bisect
import codecs
import io
import re
import tokenize

NOTICE = b"[line of the private algorithm's code withheld]"
_LINE_END = re.compile(rb"[\r\n]")
# A line held back grows to at most this (or four times the longest line of the code).
_HOLD_BYTES = 64 * 1024


def _texts(code: bytes) -> list[str]:
    """The code as text, as an interpreter would read it: UTF-8 (undecodable bytes kept as
    they are, so they compare with the log's), and the encoding a Python coding cookie names."""
    texts = [code.decode("utf-8", errors="surrogateescape")]
    try:
        declared, _ = tokenize.detect_encoding(io.BytesIO(code).readline)
        if codecs.lookup(declared).name != "utf-8":
            texts.append(code.decode(declared, errors="replace"))
    except (SyntaxError, LookupError):
        pass
    return texts


def code_lines(code: bytes) -> frozenset[str]:
    """The code's non-blank lines, stripped: split at newlines, and at every line boundary
    Python's `str.splitlines` knows (form feeds and the like), so both readings are covered."""
    lines: set[str] = set()
    for text in _texts(code):
        for line in (*text.split("\n"), *text.splitlines()):
            stripped = line.strip()
            if stripped:
                lines.add(stripped)
    return frozenset(lines)


def split_utf8(data: bytes, *, final: bool) -> tuple[bytes, bytes]:
    """Splits `data` into a part that ends on a character boundary and the incomplete tail,
    so that a log chunk never cuts a multi-byte character in two."""
    if final or not data:
        return data, b""
    # A UTF-8 sequence is at most 4 bytes: only the last 3 can be an unfinished one.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            if need > back:
                return data[:-back], data[-back:]
            return data, b""
    return data, b""


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


class CodeRedactor:
    """Filters one job's output, chunk by chunk (`feed`), then what is left (`finish`)."""

    def __init__(self, lines: frozenset[str]) -> None:
        self._lines = lines
        self._sorted = sorted(lines)
        longest = max((len(line.encode("utf-8", "surrogateescape")) for line in lines), default=0)
        self._hold = max(_HOLD_BYTES, 4 * longest)
        # The current line's bytes held back; whether the line is known not to be code (its
        # bytes then pass as they come, until its end).
        self._held = bytearray()
        self._passing = False

    @classmethod
    def for_code(cls, code: bytes) -> CodeRedactor | None:
        """None when the code has no line to withhold."""
        lines = code_lines(code)
        return cls(lines) if lines else None

    def feed(self, data: bytes) -> bytes:
        """What of `data` may go to the log now."""
        out = bytearray()
        start = 0
        for match in _LINE_END.finditer(data):
            end = match.start()
            self._end_line(data[start:end], out)
            out += data[end : end + 1]
            start = end + 1
        if start < len(data):
            self._continue_line(data[start:], out)
        return bytes(out)

    def finish(self) -> bytes:
        """The last line, unfinished when the output ended."""
        out = bytearray()
        self._end_line(b"", out)
        return bytes(out)

    def _is_code(self, line: bytes) -> bool:
        return _text(line).strip() in self._lines

    def _may_begin_code(self, text: str) -> bool:
        """Whether a line whose stripped text so far is `text` may still be a line of the code
        once it ends: what follows can only lengthen it, or be whitespace."""
        at = bisect.bisect_left(self._sorted, text)
        return at < len(self._sorted) and self._sorted[at].startswith(text)

    def _end_line(self, rest: bytes, out: bytearray) -> None:
        if self._passing:
            out += rest
        else:
            line = bytes(self._held) + rest
            out += NOTICE if self._is_code(line) else line
        self._held.clear()
        self._passing = False

    def _continue_line(self, data: bytes, out: bytearray) -> None:
        if self._passing:
            out += data
            return
        self._held += data
        text = _text(split_utf8(bytes(self._held), final=False)[0]).strip()
        if text and not self._may_begin_code(text):
            out += self._held
            self._held.clear()
            self._passing = True
        elif len(self._held) > self._hold:
            self._bound(out)

    def _bound(self, out: bytearray) -> None:
        """Bounds what is held: the leading whitespace goes out (it shows nothing); when what
        remains is still too long (whitespace after a possible line of the code), the line is
        decided now and the rest of it passes."""
        held = bytes(self._held)
        body = held.lstrip(b" \t\v\f")
        out += held[: len(held) - len(body)]
        self._held[:] = body
        if len(body) > self._hold:
            stripped = body.rstrip(b" \t\v\f")
            out += NOTICE if self._is_code(stripped) else stripped
            out += body[len(stripped) :]
            self._held.clear()
            self._passing = True
