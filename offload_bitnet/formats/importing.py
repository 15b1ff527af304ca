"""The one way a new store is made from a model at the edge (an import, a merge, the import cache).

``staged_folder(target)`` owns the staging folder: the store is built in ``.<name>.importing-<pid>`` beside
``target`` (or in a given staging root) and renamed onto ``target`` only when everything is written, so an
interrupted import (an error, Ctrl-C, ``kill -9``) never leaves something at ``target`` that looks like a
store. On any exception, KeyboardInterrupt included, the staging folder is removed; leftovers of processes
that were killed are removed by the next import of the same target.

``import_units`` is the import routine every importer (``hf``, ``meta``, ``gguf``) and ``merge`` use: staging,
``write_store`` of the units, progress with an ETA, the files that go beside the store (tokenizer), rename.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from offload_bitnet.model.config import ModelConfig
from offload_bitnet.progress import unit_reporter
from offload_bitnet.store.blockstore import MANIFEST, BlockStore, StoreError, StoreSettings
from offload_bitnet.store.units import unit_names
from offload_bitnet.store.write import write_store

STAGING_MARK = ".importing-"
# Staging folders handed out by staged_folder in this process: a target that is one of them (the import cache
# stages an importer that stages itself) is already staged, and is written in place.
_ACTIVE: set[str] = set()


def is_store(path: str) -> bool:
    """Whether ``path`` holds a store's manifest."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def is_complete_store(path: str) -> bool:
    """A store whose creation or import finished (its first commit happened)."""
    return is_store(path) and BlockStore(path).step >= 0


def staging_path(target: str, staging_root: str | None = None, pid: int | None = None) -> str:
    """Where the store for ``target`` is built: ``.<name>.importing-<pid>`` in ``staging_root`` (default:
    beside ``target``, on the same file system, so the final rename is atomic)."""
    target = os.path.abspath(target)
    root = staging_root or os.path.dirname(target)
    return os.path.join(root, f".{os.path.basename(target)}{STAGING_MARK}{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(target: str, staging_root: str | None = None):
    """Remove staging folders of ``target`` left by this process or by processes that no longer run."""
    probe = staging_path(target, staging_root, pid=0)
    root, prefix = os.path.dirname(probe), os.path.basename(probe)[:-1]
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def check_target(target: str, error: type[Exception] = StoreError):
    """Refuse a ``target`` that is a file, a store or a folder with files in it (nothing there is touched)."""
    if is_store(target):
        raise error(f"{target} already holds a store; choose another folder or delete it first")
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise error(f"{target} exists and is not empty; choose an empty or new folder")
    if os.path.isdir(target) and os.path.ismount(target):
        # The store is built beside the target and renamed onto it: a mount point can be neither replaced nor
        # reached by a rename from the file system above it.
        raise error(f"{target} is a mount point; choose a new folder inside it (e.g. {os.path.join(target, 'store')})")


@contextmanager
def staged_folder(target: str, staging_root: str | None = None, error: type[Exception] = StoreError):
    """Yield an empty staging folder for ``target``; rename it onto ``target`` when the block ends normally,
    remove it when the block raises (anything, KeyboardInterrupt included). ``error``: the exception type of
    a refused ``target``."""
    if os.path.abspath(target) in _ACTIVE:  # staged by an enclosing staged_folder, which owns the rename
        yield target
        return
    check_target(target, error)
    staging = staging_path(target, staging_root)
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    remove_leftovers(target, staging_root)
    os.makedirs(staging)
    _ACTIVE.add(staging)
    try:
        yield staging
        if os.path.isdir(target):
            os.rmdir(target)  # an empty folder made for the import (check_target refused anything else)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(staging)


def import_units(out_dir: str, config: ModelConfig, units: Iterable[tuple[str, dict]],
                 settings: StoreSettings | None, extra: dict, label: str,
                 add_files: Callable[[str], None] | None = None, progress: bool = True,
                 error: type[Exception] = StoreError) -> str:
    """Write a new store at ``out_dir`` from ``(unit, {name: tensor})`` pairs (consumed one unit at a time),
    through a staging folder; ``add_files(folder)`` then writes what goes beside the units (the tokenizer)
    before the rename, so a store never lacks the files its manifest names. Returns ``out_dir``'s absolute path.
    """
    report = unit_reporter(len(unit_names(config)), label) if progress else None
    with staged_folder(out_dir, error=error) as staging:
        store = write_store(staging, config, units, settings, extra=extra, progress=report)
        store.close()
        if add_files is not None:
            add_files(staging)
    return os.path.abspath(out_dir)
