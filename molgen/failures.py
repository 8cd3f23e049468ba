"""How a command ends when it does not succeed: an expected failure (bad input, a file that cannot be read or
written, memory that runs out) as one line on stderr and exit code 2; Ctrl-C as one line and exit code 130; a
reader of standard output that stopped early quietly, with exit code 141. Anything else keeps its traceback.
For the command line (:mod:`molgen.cli`), and any other front end that runs molgen's work as commands."""

from __future__ import annotations

import functools
import re

from molgen import MolgenError
from molgen.display import error, report_to_stderr, say, silence_stdout

# What to change when JAX runs out of memory, by command; the arrays a call needs grow with its batch
MEMORY_HINTS = {"sample": "sample fewer molecules (-n), or fewer at a time (a smaller --batch-size)",
                "train": "train with a smaller --batch-size"}


def is_out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, or JAX's out-of-memory error (RESOURCE_EXHAUSTED): the device, the machine or a memory
    limit set on the process refused an array."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and
                                          str(e).strip().startswith("RESOURCE_EXHAUSTED"))


def first_line(e: BaseException) -> str:
    """An error's first line of text (its type's name when it has none)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def out_of_memory(e: BaseException, command: str) -> MolgenError | None:
    """An out-of-memory error as one line that says what to change; None for any other error."""
    if not is_out_of_memory(e):
        return None
    what = first_line(e).removeprefix("RESOURCE_EXHAUSTED:").strip().rstrip(".")
    what = re.sub(r"(\d{7,}) bytes", lambda m: f"{int(m.group(1)) / 2**30:.1f} GiB", what)
    return MolgenError(f"out of memory ({what}); {MEMORY_HINTS.get(command, 'use smaller inputs')}")


def friendly(fn):
    """A command's failures as above (files are written whole or not at all, so none is left half-written)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except BrokenPipeError:  # standard output's reader stopped early (`| head`): quietly, as `cat` does
            silence_stdout()
            raise SystemExit(141)
        except (MolgenError, OSError, UnicodeDecodeError) as e:
            error(e)
            raise SystemExit(2)
        except (RuntimeError, MemoryError) as e:
            if (oom := out_of_memory(e, fn.__name__)) is None:
                raise
            error(oom)
            raise SystemExit(2)
        except KeyboardInterrupt:
            say(f"interrupted: molgen {fn.__name__} stopped (a file molgen writes is written whole or not at all)")
            raise SystemExit(130)
        finally:
            report_to_stderr(False)

    return wrapper
