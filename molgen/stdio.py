"""Standard output and standard error as molgen writes them: an output that fails names the stream, and messages
that standard error cannot take are dropped, not worth the work they would stop."""

from __future__ import annotations

import sys


class Stdio:
    """Standard output or standard error as the consoles write them, looked up at each write (a test may replace
    them). Standard error carries messages (progress, warnings, errors, a report moved there): where it cannot be
    written (a full disk, a reader gone) they are dropped and the command goes on; its files are its work. An error
    writing standard output names it ("standard output: No space left on device"), as a file's error names the
    file. A stream that is closed (``>&-``) takes nothing, as Python leaves it (None)."""

    def __init__(self, stderr: bool = False):
        self.stderr = stderr

    def _stream(self):
        return sys.stderr if self.stderr else sys.stdout

    def write(self, text: str) -> int:
        return self._guard(lambda stream: stream.write(text), len(text))

    def flush(self) -> None:
        self._guard(lambda stream: stream.flush(), None)

    def _guard(self, op, dropped):
        if (stream := self._stream()) is None:
            return dropped
        try:
            return op(stream)
        except OSError as e:
            if self.stderr:
                return dropped
            if e.filename or not e.errno:
                raise
            raise type(e)(e.errno, e.strerror, "standard output") from None

    def isatty(self) -> bool:
        stream = self._stream()
        return stream is not None and stream.isatty()

    def __getattr__(self, name):  # fileno, encoding, ...: the stream's own
        return getattr(self._stream(), name)


def to_stderr(line: str) -> None:
    """A line on standard error, where molgen's messages go; dropped where it cannot take it (closed, a full disk),
    as Python drops its warnings there: a message is not worth the work."""
    if sys.stderr is None:
        return
    try:
        print(line, file=sys.stderr)
    except OSError:
        pass


def silence_stdout() -> None:
    """Standard output goes nowhere from now on: its reader has gone, and flushing at exit would fail again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind it (a test's captured output)
        pass
