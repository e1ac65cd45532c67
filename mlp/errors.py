"""Errors the user can fix: the scripts print their message and exit, with no traceback."""

import errno
import multiprocessing
import os
import select
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class UserError(Exception):
    """Bad input (a flag, a path, a file); the message says what was wrong and how to fix it."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def why_not_a_file(path: Path) -> str:
    """What `path` is instead of a regular file to read, for a message: a named pipe would block a reader for good."""
    if path.is_dir():
        return "is a folder"
    return "is no regular file (a device or a pipe)" if path.exists() else "not found"


def run_script(main: Callable[[], object], interrupted: str,
               writes_with: str | None = "--trainer.logger.init_args.save_dir") -> None:
    """Run a script's main; report bad input, I/O failures and Ctrl-C in one line and a non-zero exit.
    `writes_with`: the flags that choose where the script writes (None: it writes nothing), named when I/O fails."""
    try:
        main()
    except UserError as error:
        exit_saying(f"error: {error}")
    except OSError as error:  # disk full, permission denied, a path under a file...
        if isinstance(error, BrokenPipeError) and stdout_reader_left():  # `| head` took what it wanted: no error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's flush at exit fails again
            sys.exit(1)
        exit_saying(f"error: {write_failed(error, writes_with) if writes_with else error}")
    except KeyboardInterrupt as interrupt:  # its own words, where the code that stopped knows better
        exit_saying(f"interrupted: {interrupt.args[0] if interrupt.args else interrupted}")


def write_failed(error: OSError, flag: str) -> str:
    """The failed write, and what to do: choose another path with `flag`, the one that chose it."""
    fix = "free some space, or choose" if error.errno == errno.ENOSPC else "choose"
    return f"{error}\n{fix} another path with {flag}"


def stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reader closed it (the kernel reports an error on its write end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), 0)
    except (ValueError, OSError):  # stdout closed or replaced by an object without a file
        return False
    return any(events & select.POLLERR for _, events in poll.poll(0))


def exit_saying(message: str) -> NoReturn:
    """Exit with status 1, the message on stderr, in one write where other processes may say the same at once (DDP's,
    whose LOCAL_RANK Lightning sets; tune.py's device workers): sys.exit writes the newline apart, and lines merge."""
    if "LOCAL_RANK" in os.environ or multiprocessing.parent_process() is not None:
        sys.stderr.write(f"{message}\n")
        sys.stderr.flush()
        sys.exit(1)
    sys.exit(message)
