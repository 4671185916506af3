"""Source texts and the spans that point into them (1-based line and column, exclusive end)."""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

__all__ = ["Source", "Span"]


@dataclass(frozen=True, slots=True)
class Source:
    """A named text that spans point into: a spec, or a pairs file an error was found in.

    `name` is what messages show (the path as the user gave it); `path` is the resolved file, if any.
    """

    name: str
    text: str = field(repr=False)
    path: str | None = None
    _starts: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def _line_starts(self) -> list[int]:
        """Offsets where each line begins, computed once: every position lookup is then a binary search
        (a rescan per lookup made checking 10,000 pairs quadratic)."""
        starts = self._starts
        if starts is None:
            starts = [0]
            text = self.text
            find = text.find
            i = find("\n")
            while i >= 0:
                starts.append(i + 1)
                i = find("\n", i + 1)
            object.__setattr__(self, "_starts", starts)
        return starts

    def line(self, number: int) -> str:
        """The text of a 1-based line, without its newline ("" past the end)."""
        starts = self._line_starts()
        if not 1 <= number <= len(starts):
            return ""
        end = starts[number] - 1 if number < len(starts) else len(self.text)
        line = self.text[starts[number - 1]:end]
        return line[:-1] if line.endswith("\r") else line

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        starts = self._line_starts()
        index = bisect_right(starts, offset) - 1
        return index + 1, offset - starts[index] + 1

    def span(self, start: int, end: int | None = None) -> "Span":
        """The span of the character range [start, end) (one character when end is None)."""
        if end is None:
            end = start + 1
        line, column = self.position(start)
        end_line, end_column = self.position(max(start, end))
        return Span(self, line, column, end_line, end_column, start, max(start, end))

    def line_offset(self, number: int) -> int:
        """The offset where a 1-based line begins (the text's end past the last line)."""
        starts = self._line_starts()
        return starts[number - 1] if 1 <= number <= len(starts) else len(self.text)

    def line_span(self, number: int) -> "Span":
        """The span of a whole 1-based line (used for errors inside a pairs file)."""
        start = self.line_offset(number)
        return self.span(start, start + max(len(self.line(number)), 1))


@dataclass(frozen=True, slots=True)
class Span:
    """Where something is: lines and columns are 1-based, `end_column` is the column after the end.

    `start` and `end` are character offsets into `source.text`.
    """

    source: Source = field(repr=False, compare=False)
    line: int
    column: int
    end_line: int
    end_column: int
    start: int = 0
    end: int = 0

    @property
    def file(self) -> str:
        """The file name that messages show."""
        return self.source.name

    def to(self, other: "Span") -> "Span":
        """The span from the start of this one to the end of `other`."""
        return Span(self.source, self.line, self.column, other.end_line, other.end_column, self.start, other.end)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"
