"""Source texts and the spans that point into them (1-based line and column, exclusive end)."""
from __future__ import annotations

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

    def line(self, number: int) -> str:
        """The text of a 1-based line, without its newline ("" past the end)."""
        lines = self.text.splitlines()
        if 1 <= number <= len(lines):
            return lines[number - 1]
        return ""

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        line = self.text.count("\n", 0, offset) + 1
        column = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return line, column

    def span(self, start: int, end: int | None = None) -> "Span":
        """The span of the character range [start, end) (one character when end is None)."""
        if end is None:
            end = start + 1
        line, column = self.position(start)
        end_line, end_column = self.position(max(start, end))
        return Span(self, line, column, end_line, end_column, start, max(start, end))

    def line_span(self, number: int) -> "Span":
        """The span of a whole 1-based line (used for errors inside a pairs file)."""
        lines = self.text.splitlines(keepends=True)
        start = sum(len(s) for s in lines[: number - 1])
        text = lines[number - 1].rstrip("\r\n") if 0 < number <= len(lines) else ""
        return self.span(start, start + max(len(text), 1))


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
