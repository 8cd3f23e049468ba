"""How a command ends when it does not succeed: an expected failure (bad input, a file that cannot be read or
written, memory that runs out) as one line on stderr and exit code 2; Ctrl-C as one line and exit code 130, SIGTERM
with 143; a reader of standard output that stopped early quietly, with exit code 141. Anything else keeps its
traceback. :func:`friendly` wraps each command; :func:`run_program` runs the commands as a program.
For the command line (:mod:`molgen.cli`), and any other front end that runs molgen's work as commands."""

from __future__ import annotations

import functools
import re
import signal
import threading
from typing import Callable

from molgen import MolgenError
from molgen.display import err, error, report_to_stderr, say
from molgen.stdio import silence_stdout

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


def run_program(app, name: str, commands: Callable | None = None) -> None:
    """Run a Typer ``app`` as the program ``name``, with a usage error (an unknown command or option, a value of the
    wrong type, an empty value: :func:`empty_argument`, given ``commands``, which makes the app's Click group) as one
    line and exit code 2, like molgen's own errors; Click would print the usage before it."""
    import sys

    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character (Å, °) shows "?" instead
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if commands is not None and (why := empty_argument(lambda: commands(app), name, sys.argv[1:])) is not None:
        error(MolgenError(why))
        sys.exit(2)
    try:
        code = app(prog_name=name, standalone_mode=False)
    except SystemExit as e:
        _exit_if_stopped(e.code)
        if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            sys.exit(141)  # Click's own end of a broken pipe (help, --version): 141, as molgen's reports
        raise
    except Exception as e:  # Click's exceptions, known by what they carry (Typer may bring its own copy of Click)
        if type(e).__name__ == "Abort":
            err.print("Aborted!")
            sys.exit(1)
        if not (hasattr(e, "exit_code") and hasattr(e, "show")):
            raise
        if e.exit_code != 2 or type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # a bare `molgen` shows its help, as before
            sys.exit(e.exit_code)
        command = getattr(getattr(e, "ctx", None), "command_path", name)
        error(MolgenError(f"{e.format_message().rstrip('.')} (see {command} --help)"))
        sys.exit(2)
    _exit_if_stopped(code)
    sys.exit(code if isinstance(code, int) else 0)


def empty_argument(group_of: Callable, name: str, args: list[str]) -> str | None:
    """What is wrong with a command line ``args`` that gives an empty value (``-o ''``, ``--out=``, an empty file
    name), or None: no molgen option or argument takes one, and Click reads an empty path as the current folder, so
    that ``molgen train --out ''`` would train into it. ``group_of()``: the program's Click group (its commands'
    flags are told from options that take a value), made only for a command line with an empty value."""
    def empty(arg: str) -> bool:  # '' or --option=
        return arg == "" or (arg.startswith("--") and arg.endswith("=") and len(arg) > 3)

    if not any(empty(a) for a in args):
        return None
    group = group_of()
    command = group.commands.get(args[0]) if args else None
    path = f"{name} {args[0]}" if command is not None else name
    params = command.params if command is not None else group.params
    flags = {o for p in params if getattr(p, "is_flag", False) for o in (*p.opts, *p.secondary_opts)}
    for i, arg in enumerate(args):
        if arg == "--":
            if "" in args[i + 1:]:
                return f"an empty argument (see {path} --help)"
            return None
        if empty(arg) and arg:  # --option=
            return f"{arg[:-1]}: an empty value (see {path} --help)"
        if arg == "":
            before = args[i - 1] if i else ""
            if before.startswith("-") and before not in ("-", "--") and "=" not in before and before not in flags:
                return f"{before}: an empty value (see {path} --help)"
            return f"an empty argument (see {path} --help)"
    return None


def _exit_if_stopped(code) -> None:
    """After Ctrl-C or SIGTERM, exit now: Python's own exit would wait for the computations still queued (a chunk of
    training steps, network calls) and for worker processes that may be gone."""
    import os
    import sys

    if code in (INTERRUPTED, TERMINATED):
        _release_worker_resources()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _release_worker_resources() -> None:
    """What worker pools hold that outlives the process, released without waiting on the pools' threads: named
    semaphores (which multiprocessing's tracker would otherwise remove with a warning) and the temporary folder of
    the fork server's socket (a ``pymp-*`` folder that would stay behind in the temporary folder)."""
    import shutil

    try:
        from multiprocessing import process, util

        util._run_finalizers(0)  # priority >= 0: semaphores and queues closed; not the threads' joins (< 0)
        folder = process.current_process()._config.get("tempdir")
    except Exception:  # another Python: the tracker removes the semaphores, with its warning
        return
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
