"""How a command ends when it does not succeed: an expected failure (bad input, a file that cannot be read or
written, memory that runs out) as one line on stderr and exit code 2; Ctrl-C as one line and exit code 130, SIGTERM
with 143; a reader of standard output that stopped early quietly, with exit code 141. Anything else keeps its
traceback.
For the command line (:mod:`molgen.cli`), and any other front end that runs molgen's work as commands."""

from __future__ import annotations

import functools
import re
import signal
import threading

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


INTERRUPTED, TERMINATED = 130, 143  # the exit codes of a command stopped by Ctrl-C (128 + SIGINT), SIGTERM (128 + 15)


def stopped_by(signum) -> str:
    """How a stop by ``signum`` (SIGINT from Ctrl-C, or SIGTERM) is told: "interrupted", "terminated (SIGTERM)"."""
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`, `timeout`): a command stops as on Ctrl-C, with exit code 143."""


def _terminate(*_):
    raise Terminated


def _on_sigterm():
    """Make SIGTERM raise :class:`Terminated` (in the main thread, unless it is ignored); the handler before."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _terminate)


def friendly(fn):
    """A command's failures as above (files are written whole or not at all, so none is left half-written)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        previous = _on_sigterm()
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
        except KeyboardInterrupt as e:
            how = stopped_by(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            say(f"{how}: molgen {fn.__name__} stopped (a file molgen writes is written whole or not at all)")
            raise SystemExit(TERMINATED if isinstance(e, Terminated) else INTERRUPTED)
        finally:
            report_to_stderr(False)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
