"""The import cache: models given by path (a Hugging Face or Meta folder, a .gguf file) are imported once into
``~/.cache/offload_bitnet`` (or ``$OFFLOAD_BITNET_CACHE``) and read from there afterwards.

An entry is keyed by the source's identity, not only its path: the size and modification time of every file
and a hash of what is cheap to read (small files such as config.json, index and tokenizer files whole; the
first MiB of large files: safetensors headers, the GGUF header). A source replaced by another file of the
same name gets a new import, and the user is told. Layout::

    CACHE/<name>-<digest>/            a finished store; <digest> covers the path, the identity and the settings
    CACHE/<name>-<digest>/import_source.json    what was imported, when, and its identity
    CACHE/.staging/                   imports in progress (``formats.importing.staged_folder``; renamed into
                                      place when finished, removed when they fail)
    CACHE/.locks/<name>-<digest>.lock exists (and is flocked) while an import of that entry runs

Two processes importing the same source at once: the second waits on the lock, then uses the first's import.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import time

from offload_bitnet.formats.importing import is_complete_store, staged_folder
from offload_bitnet.notices import warn
from offload_bitnet.progress import format_seconds
from offload_bitnet.store.sizing import folder_bytes, human

SOURCE_RECORD = "import_source.json"
STAGING = ".staging"
LOCKS = ".locks"
HASH_WHOLE = 1 << 20      # files up to this size are hashed whole (configs, indexes, tokenizers)
HASH_HEAD = 1 << 20       # larger files: their first MiB (safetensors header, GGUF header and metadata)


def cache_root() -> str:
    """``$OFFLOAD_BITNET_CACHE``, else ``~/.cache/offload_bitnet``."""
    return os.environ.get("OFFLOAD_BITNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "offload_bitnet")


def _hash_file(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(HASH_WHOLE if size <= HASH_WHOLE else HASH_HEAD))
    return digest.hexdigest()[:16]


def source_identity(src: str) -> dict:
    """Size, mtime and a cheap content hash of each file of ``src`` (a file, or the top level of a folder)."""
    src = os.path.abspath(src)
    if os.path.isfile(src):
        paths = [src]
    else:
        paths = sorted(os.path.join(src, name) for name in os.listdir(src)
                       if not name.startswith(".") and os.path.isfile(os.path.join(src, name)))
    files = {}
    for path in paths:
        info = os.stat(path)
        files[os.path.basename(path)] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns,
                                         "sha256": _hash_file(path, info.st_size)}
    return {"files": files}


def _digest(src: str, identity: dict, settings) -> str:
    key = {"path": os.path.abspath(src), "identity": identity,
           "settings": settings.__dict__ if settings is not None else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def entry_name(src: str, identity: dict, settings=None) -> str:
    base = os.path.basename(os.path.abspath(src).rstrip("/")) or "model"
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', base)}-{_digest(src, identity, settings)}"


def cached_store_dir(src: str, settings=None) -> str:
    """Where the import of ``src`` as it is now (with ``settings``) lives in the cache."""
    return os.path.join(cache_root(), entry_name(src, source_identity(src), settings))


def read_record(entry: str) -> dict | None:
    try:
        with open(os.path.join(entry, SOURCE_RECORD)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _changes(old: dict, new: dict) -> str:
    """What differs between two identities, in a few words."""
    old_files, new_files = old.get("files", {}), new.get("files", {})
    notes = []
    for name in sorted(set(old_files) | set(new_files)):
        before, after = old_files.get(name), new_files.get(name)
        if before is None:
            notes.append(f"{name} is new")
        elif after is None:
            notes.append(f"{name} is gone")
        elif before != after:
            words = {"size": "size", "mtime_ns": "modified time", "sha256": "content"}
            what = [words[key] for key in words if before.get(key) != after.get(key)]
            notes.append(f"{name}: {', '.join(what)} changed")
    return "; ".join(notes[:4]) + ("; ..." if len(notes) > 4 else "") or "settings differ"


def _earlier_imports(root: str, src: str, keep: str) -> list[tuple[str, dict]]:
    """Cache entries of the same source path other than ``keep``, oldest first."""
    found = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            entry = os.path.join(root, name)
            record = read_record(entry) if not name.startswith(".") else None
            if record and record.get("source") == os.path.abspath(src) and entry != keep:
                found.append((entry, record))
    return sorted(found, key=lambda item: os.stat(os.path.join(item[0], SOURCE_RECORD)).st_mtime_ns)


class _EntryLock:
    """An exclusive flock on ``CACHE/.locks/<entry>.lock``. The holder deletes the file before unlocking, so
    none is left behind; a process that locked a file which was deleted meanwhile sees that the path no
    longer names its file and tries again (so two processes never both hold the lock)."""

    def __init__(self, root: str, name: str):
        os.makedirs(os.path.join(root, LOCKS), exist_ok=True)
        self.path = os.path.join(root, LOCKS, name + ".lock")
        self.handle = None

    def acquire(self, blocking: bool = True, on_wait=None) -> bool:
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    handle.close()
                    return False
                if on_wait:
                    on_wait()
                    on_wait = None
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.handle = handle
                return True
            handle.close()  # its holder deleted it while we waited: lock the new one

    def release(self):
        if self.handle is not None:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def ensure_cached_import(src: str, importer, settings=None, progress: bool = True) -> str:
    """The cached store of ``src``, imported by ``importer(src, out_dir, settings, progress)`` when it is not in
    the cache yet or the source changed since. Prints (to stderr) which one it uses and why."""
    root = cache_root()
    identity = source_identity(src)
    name = entry_name(src, identity, settings)
    target = os.path.join(root, name)

    def say(message: str):
        if progress:
            warn(message)

    if is_complete_store(target):
        say(f"using the cached import of {src}: {target} (offload-bitnet cache list shows all)")
        return target
    os.makedirs(root, exist_ok=True)
    lock = _EntryLock(root, name)
    lock.acquire(on_wait=lambda: say(f"waiting for another process that is importing {src} into {target}"))
    try:
        if is_complete_store(target):  # the other process finished it while we waited
            say(f"using the cached import of {src}: {target}")
            return target
        if os.path.isdir(target):  # not a finished store (an older layout, or damaged): import again
            shutil.rmtree(target)
        earlier = _earlier_imports(root, src, target)
        if earlier:
            entry, record = earlier[-1]
            say(f"{src} changed since it was imported into {entry} ({_changes(record.get('identity', {}), identity)}): "
                f"importing it again into {target}. The earlier import is kept in case a running job reads it; "
                "`offload-bitnet cache clear --stale` removes it.")
        else:
            say(f"importing {src} into the cache: {target} (once; later runs reuse it)")
        # Built in CACHE/.staging (an importer that stages its own output writes straight into this folder).
        with staged_folder(target, os.path.join(root, STAGING)) as staging:
            importer(src, staging, settings, progress)
            record = {"source": os.path.abspath(src), "identity": identity,
                      "settings": settings.__dict__ if settings is not None else None,
                      "imported": datetime.datetime.now().isoformat(timespec="seconds")}
            with open(os.path.join(staging, SOURCE_RECORD), "w") as handle:
                json.dump(record, handle, indent=1)
        return target
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------- list / clear
def list_entries() -> list[dict]:
    """Every cache entry: path, source, bytes, age in seconds, and status (ok, stale, missing, unknown)."""
    root = cache_root()
    entries = []
    if not os.path.isdir(root):
        return entries
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        record = read_record(path) or {}
        source = record.get("source")
        if not source:
            status = "unknown source (imported by an older version)"
        elif not os.path.exists(source):
            status = "source missing"
        else:
            try:
                same = source_identity(source) == record.get("identity")
            except OSError:
                same = False
            status = "ok" if same else "stale (source changed)"
        try:
            imported = datetime.datetime.fromisoformat(record["imported"]).timestamp()
        except (KeyError, TypeError, ValueError):
            imported = os.path.getmtime(path)
        entries.append({"path": path, "source": source, "bytes": folder_bytes(path), "status": status,
                        "age_seconds": time.time() - imported, "imported": record.get("imported")})
    return entries


def format_entries(entries: list[dict]) -> list[str]:
    """Readable lines for ``offload-bitnet cache list``."""
    if not entries:
        return [f"the import cache {cache_root()} is empty"]
    lines = [f"import cache {cache_root()}:"]
    for entry in entries:
        age = format_seconds(entry["age_seconds"])
        lines.append(f"  {os.path.basename(entry['path'])}  {human(entry['bytes'])}  imported {age} ago  {entry['status']}")
        lines.append(f"      from {entry['source'] or '?'}")
    total = sum(entry["bytes"] for entry in entries)
    lines.append(f"{len(entries)} import(s), {human(total)} in all")
    return lines


def parse_duration(text: str) -> float:
    """Seconds from ``30m``, ``12h``, ``7d``, ``2w`` or a plain number of seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h|d|w)?\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w)")
    scale = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * scale


def clear_entries(older_than: float | None = None, stale_only: bool = False) -> tuple[list[dict], list[dict]]:
    """Remove cache entries (those older than ``older_than`` seconds; only stale or orphaned ones with
    ``stale_only``). Entries being imported right now are skipped. Returns (removed, kept-because-busy)."""
    root = cache_root()
    removed, busy = [], []
    for entry in list_entries():
        if older_than is not None and entry["age_seconds"] < older_than:
            continue
        if stale_only and entry["status"] == "ok":
            continue
        lock = _EntryLock(root, os.path.basename(entry["path"]))
        if not lock.acquire(blocking=False):
            busy.append(entry)
            continue
        try:
            # Rename first so that nobody picks up a half-deleted store, then delete.
            doomed = os.path.join(root, STAGING, os.path.basename(entry["path"]) + f".removing-{os.getpid()}")
            os.makedirs(os.path.dirname(doomed), exist_ok=True)
            os.rename(entry["path"], doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(entry)
        finally:
            lock.release()
    return removed, busy
