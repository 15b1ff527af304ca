"""How the command-line scripts report failures: one readable paragraph, the traceback only with --debug, and
the exit statuses they return."""
from __future__ import annotations

import functools
import os
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 130 = 128 + SIGINT, as a shell reports Ctrl-C


def describe_error(error: BaseException) -> str:
    """The message of an expected failure: the package's own errors and plain ``ValueError``s name the file and the
    fix; for an OS error its reason and file; for anything else (a library's ``ValueError`` subclass such as
    ``UnicodeDecodeError`` included) its type too, and how to see the traceback."""
    if type(error).__module__.startswith("offload_bitnet") or type(error) is ValueError:
        return str(error)
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    return f"unexpected {type(error).__name__}: {error} (run again with --debug for the traceback)"


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a Unix tool cut off by `| head`


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (``... | head``): stop without an error message, as Unix tools do.
    stdout is pointed at /dev/null so that the interpreter's final flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_BROKEN_PIPE


def pipe_safe(main):
    """Wrap a script's ``main`` so that a closed stdout (``... | head``) ends it quietly: stdout is flushed
    before returning (also after argparse's --help, which exits through SystemExit), so the error cannot
    surface at interpreter exit as "Exception ignored ... BrokenPipeError". ``main`` itself should return
    ``quiet_broken_pipe()`` on a BrokenPipeError raised while it runs."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
        except SystemExit:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                return quiet_broken_pipe()
            raise
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return quiet_broken_pipe()
        return result
    return wrapper
