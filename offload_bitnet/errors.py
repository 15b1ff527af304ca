"""How the command-line scripts report failures: one readable paragraph, the traceback only with --debug."""
from __future__ import annotations


def describe_error(error: BaseException) -> str:
    """The message of an expected failure (the package's errors and ValueErrors name the file and the fix);
    for an OS error its reason and file; for anything else its type too, and how to see the traceback."""
    if type(error).__module__.startswith("offload_bitnet") or isinstance(error, ValueError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    return f"unexpected {type(error).__name__}: {error} (run again with --debug for the traceback)"
