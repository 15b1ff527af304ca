"""The block store: a folder of per-unit safetensors files, a JSON manifest, checksums and atomic commits.

Layout::

    STORE/manifest.json        format version, model config, settings, step, every file with size and crc32c
    STORE/units/<unit>.<part>.s<step>.safetensors
    STORE/lock                 held (flock) by the one process that may write

A unit is ``embed``, ``block.NNN``, ``norm`` or ``head``; a part is ``weights`` (what forward reads),
``shadow`` (16-bit master weights of ternary projections) or ``optim`` (AdamW moments); a packed-only store
(a frozen ternary base for LoRA or generation) has only ``weights`` parts. New versions are
written beside the old ones under a new step number (writeback starts at once); ``commit`` fsyncs them, then
switches to them with one atomic rename of the manifest, and only then recycles the files it replaced (they
are overwritten by the next versions). A crash at any moment leaves the manifest at step k or k+1, and the
files that belong to neither are removed the next time the store is opened for writing. Across ranks
(``distributed/commit.py``), ``commit(keep_previous=True)`` keeps the replaced state's files and records that
state in the manifest (``previous``), so a store that got one step ahead of another rank can ``rollback``;
``release_previous`` recycles them once every rank has switched. Reads copy a file
into memory (a caller's ``BufferPool`` when given) and check its size and crc32c; ``read_lazily`` checks them
first and then reads each tensor when it is asked for.

The store knows files, checksums and commits; it knows nothing about training.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
from dataclasses import dataclass

import torch
from crc32c import crc32c

from offload_bitnet.io.buffers import BufferPool
from offload_bitnet.io.faults import fault_point
from offload_bitnet.io.files import fsync_path, write_file_atomic
from offload_bitnet.io.locks import HolderLock, LockHeld
from offload_bitnet.io.safetensors import LazySafetensors, SafetensorsError, decode_safetensors, encode_safetensors
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.store.units import MODES, PARTS, unit_names, unit_shapes

# The newest format this code reads. A store is written with the oldest version that describes it, so older
# readers keep opening what they can read: 2 = packed-only (``StoreSettings.packed_only``), 1 = everything else
# (and 3 below).
FORMAT_VERSION = 3
# 3 = a manifest that keeps its previous step for a rollback across ranks (``commit(keep_previous=True)``): an
# older reader would delete the kept files. Only between the two phases of a distributed commit.
KEPT_PREVIOUS_VERSION = 3
PREVIOUS_KEYS = ("format_version", "step", "files", "extra")  # what a kept previous state records
MANIFEST = "manifest.json"
UNITS_DIR = "units"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# AdamW moments: bytes per value on disk ("int8": 8-bit blockwise, see blockwise.py; ~1 byte plus block scales;
# "fp16" only for stores that ask for it explicitly: its range is too small for second moments).
STATE_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
CHECK_CHUNK_BYTES = 8 << 20  # read_lazily's checksum pass: a buffer this size, not the file's


def _file_crc(fd: int, size: int, origin: str) -> int:
    """crc32c of the first ``size`` bytes of ``fd``, read through a buffer of ``CHECK_CHUNK_BYTES``."""
    crc, done, chunk = 0, 0, memoryview(bytearray(min(size, CHECK_CHUNK_BYTES) or 1))
    while done < size:
        count = os.preadv(fd, [chunk[:size - done]], done)
        if not count:
            raise StoreError(f"{origin} shrank while it was read")
        crc, done = crc32c(chunk[:count], crc), done + count
    return crc


class StoreError(RuntimeError):
    """A store cannot be opened, read or written; the message names the file and what to do."""


@dataclass
class StoreSettings:
    """How a store represents its tensors."""

    mode: str = "qat"            # qat: packed ternary projections + shadow; full: 16-bit projections
    shadow_dtype: str = "fp16"   # master weights (the projections in qat, every matrix in full)
    state_dtype: str = "fp32"    # AdamW moments: fp32, bf16 or int8 (8-bit blockwise)
    # qat only: the packed ternary projections without their shadow (a frozen base: LoRA, generation, export;
    # no master weights to train). Manifests written before this field existed read as False.
    packed_only: bool = False

    def manifest_record(self) -> tuple[int, dict]:
        """The format version and the ``settings`` entry of a manifest for these settings (``packed_only`` is
        written only when set: a version-1 reader then opens every other store as before)."""
        record = self.__dict__.copy()
        if not self.packed_only:
            del record["packed_only"]
        return (2 if self.packed_only else 1), record

    def validate(self):
        if self.mode not in MODES:
            raise StoreError(f"store mode must be 'qat' or 'full', got {self.mode!r}")
        if self.packed_only and self.mode != "qat":
            raise StoreError(f"a packed-only store holds packed ternary projections, so its mode must be 'qat', "
                             f"not {self.mode!r} (pass --mode qat)")
        if self.shadow_dtype not in DTYPES:
            raise StoreError(f"shadow_dtype must be one of {sorted(DTYPES)}, got {self.shadow_dtype!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise StoreError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {self.state_dtype!r}")


def store_is_complete(path: str) -> bool:
    """A store whose creation (or import) finished: its first commit made step 0. Reads only the manifest."""
    try:
        with open(os.path.join(path, MANIFEST)) as handle:
            return json.load(handle).get("step", -1) >= 0
    except (OSError, ValueError):
        return False


def no_master_weights(what: str) -> str:
    """Why a model with only packed ternary weights cannot have its weights trained, and what to do instead."""
    return (f"{what}: it has no master weights, only the packed 2-bit projections that forward reads, so it "
            "cannot be trained with --mode qat or full. Train LoRA adapters on it (--mode lora), or import the "
            "full-precision checkpoint (for example the -bf16 one) to fine-tune all weights.")


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class BlockStore:
    """A model on disk, one unit per file set. Reads never need more than one unit in memory."""

    def __init__(self, path: str, *, writable: bool = False, verify: bool = True):
        self.path = os.path.abspath(path)
        self.verify = verify
        self.writable = writable
        self.bytes_read = 0
        self.bytes_written = 0
        self._lock = threading.Lock()
        self._lock_handle = None
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise StoreError(f"{self.path} is not an offload_bitnet store: {MANIFEST} is missing")
        try:
            with open(manifest_path) as handle:
                self.manifest = json.load(handle)
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read {manifest_path}: {error}") from error
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(f"{manifest_path} has format version {version!r}; this offload_bitnet reads "
                             f"versions up to {FORMAT_VERSION}. Upgrade offload_bitnet to open it.")
        self.config = ModelConfig.from_dict(self.manifest["config"])
        self.settings = StoreSettings(**self.manifest["settings"])
        # The files the next read should see: committed ones, replaced by newer writes not yet committed.
        self._working = {unit: dict(parts) for unit, parts in self.manifest["files"].items()}
        self._unsynced: set[str] = set()  # written since the last commit, not yet fsynced
        if writable:
            self._acquire_lock()
            self.remove_uncommitted_files()

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str, config: ModelConfig, settings: StoreSettings, extra: dict | None = None) -> "BlockStore":
        """Make an empty store folder (no units yet) and open it for writing."""
        settings.validate()
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise StoreError(f"{path} already holds a store; choose another folder or delete it first")
        if os.path.isdir(path) and os.listdir(path):
            raise StoreError(f"{path} exists and is not empty; choose an empty or new folder")
        os.makedirs(os.path.join(path, UNITS_DIR), exist_ok=True)
        version, settings_record = settings.manifest_record()
        manifest = {
            "format_version": version,
            "config": config.to_dict(),
            "settings": settings_record,
            "step": -1,  # -1: creation not finished; the first commit makes it 0
            "files": {},
            "extra": extra or {},
        }
        write_file_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())
        return cls(path, writable=True)

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra", {})

    @property
    def units(self) -> list[str]:
        return unit_names(self.config)

    def require_master_weights(self):
        """Raise StoreError saying what to do when the store has no master weights to train (packed-only)."""
        if self.settings.packed_only:
            raise StoreError(no_master_weights(f"{self.path} is a packed-only store (a frozen ternary base)"))

    def has_part(self, unit: str, part: str) -> bool:
        with self._lock:
            return part in self._working.get(unit, {})

    def disk_bytes(self) -> dict[str, int]:
        """Bytes on disk per part kind, from the committed manifest."""
        totals = {part: 0 for part in PARTS}
        for parts in self.manifest["files"].values():
            for part, entry in parts.items():
                totals[part] += entry["bytes"]
        return totals

    def step_write_bytes(self) -> int:
        """About how many bytes one training step writes (every part of every unit, moments included)."""
        state_bytes = STATE_DTYPES[self.settings.state_dtype]
        total = 0
        for unit in self.units:
            parts = self.manifest["files"].get(unit, {})
            total += sum(entry["bytes"] for entry in parts.values())
            if "optim" not in parts:
                numel = sum(math.prod(shape) for shape in unit_shapes(self.config, unit).values())
                total += 2 * state_bytes * numel
        return total

    def check_free_space(self):
        """Refuse to start a run that cannot write its first step (StoreError saying how much is needed)."""
        needed, free = self.step_write_bytes(), shutil.disk_usage(self.path).free
        if free < needed:
            raise StoreError(f"not enough free disk space for training in {self.path}: a step needs about "
                             f"{_gib(needed)} free, there is {_gib(free)}. Free some space or move the store.")

    # ------------------------------------------------------------------ reading
    def read(self, unit: str, part: str, pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
        """Load one part of one unit, checking its size and checksum; into ``pool``'s memory when given."""
        entry, file_path = self._entry(unit, part)
        try:
            fault_point("read")
            with open(file_path, "rb", buffering=0) as handle:
                size = self._checked_size(handle.fileno(), entry, file_path, unit, part)
                # Read into memory of our own (reused across units when a pool is given) rather than mapping the
                # file: the caller may update the tensors in place, and a private mapping pays a copy-on-write
                # fault per page for that.
                data = pool.empty((size,), torch.uint8) if pool is not None else torch.empty(size, dtype=torch.uint8)
                view, done = memoryview(data.numpy()), 0
                while done < size:
                    count = handle.readinto(view[done:])
                    if not count:
                        raise StoreError(f"{file_path} ({unit} {part}) shrank while it was read")
                    done += count
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read {file_path} ({unit} {part}): {getattr(error, 'strerror', None) or error}")\
                from error
        self._check_crc(lambda: crc32c(view), entry, file_path, unit, part)
        with self._lock:
            self.bytes_read += size
        try:
            return decode_safetensors(data, f"{file_path} ({unit} {part})")
        except SafetensorsError as error:
            raise StoreError(str(error)) from error

    def read_lazily(self, unit: str, part: str, pool: BufferPool | None = None) -> LazySafetensors:
        """One part of one unit as a mapping that reads each tensor when it is asked for (into ``pool``'s memory
        when given) and keeps none, after checking the file's size and checksum in one pass through a small
        buffer. For an update that takes one projection at a time: it then holds one projection's bytes of the
        old version, not the part's (at 7B a block's old shadow and moments are 0.8 GB)."""
        entry, file_path = self._entry(unit, part)
        origin = f"{file_path} ({unit} {part})"
        fd = None
        try:
            fault_point("read")
            fd = os.open(file_path, os.O_RDONLY)
            size = self._checked_size(fd, entry, file_path, unit, part)
            self._check_crc(lambda: _file_crc(fd, size, origin), entry, file_path, unit, part)
            with self._lock:
                self.bytes_read += size
            lazy = LazySafetensors(fd, origin, (lambda nbytes: pool.empty((nbytes,), torch.uint8)) if pool else None)
            fd = None  # the mapping owns it now
            return lazy
        except SafetensorsError as error:
            raise StoreError(str(error)) from error
        except OSError as error:
            raise StoreError(f"cannot read {origin}: {error.strerror or error}") from error
        finally:
            if fd is not None:
                os.close(fd)

    def _entry(self, unit: str, part: str) -> tuple[dict, str]:
        """A part's manifest entry and file path (StoreError when the store has no such part)."""
        with self._lock:
            entry = self._working.get(unit, {}).get(part)
        if entry is None:
            raise StoreError(f"store {self.path} has no {part!r} part for unit {unit!r}")
        return entry, os.path.join(self.path, UNITS_DIR, entry["file"])

    @staticmethod
    def _checked_size(fd: int, entry: dict, file_path: str, unit: str, part: str) -> int:
        size = os.fstat(fd).st_size
        if size != entry["bytes"]:
            raise StoreError(f"{file_path} ({unit} {part}) is {size} bytes, the manifest says "
                             f"{entry['bytes']}: the file is truncated or damaged. Restore it from a backup "
                             "or re-import the model.")
        return size

    def _check_crc(self, compute_crc, entry: dict, file_path: str, unit: str, part: str):
        """Compare ``compute_crc()`` with the manifest's (when the store verifies)."""
        if "crc32c" not in entry:
            raise StoreError(f"the manifest of {self.path} has no crc32c checksum for {unit} {part}: the store was "
                             "written by a development version of offload_bitnet. Re-import or re-create it.")
        if self.verify and compute_crc() != entry["crc32c"]:
            raise StoreError(f"{file_path} ({unit} {part}) fails its checksum: the file is damaged. "
                             "Restore it from a backup or re-import the model.")

    def verify_all(self, progress=None) -> list[str]:
        """Check size and checksum of every committed file; returns one line per problem (empty: all good)."""
        problems = []
        entries = [(unit, part) for unit, parts in self.manifest["files"].items() for part in parts]
        for index, (unit, part) in enumerate(entries):
            try:
                self.read(unit, part)
            except StoreError as error:
                problems.append(str(error))
            if progress:
                progress(index + 1, len(entries), f"{unit} {part}")
        return problems

    # ------------------------------------------------------------------ writing
    def write(self, unit: str, part: str, tensors: dict[str, torch.Tensor], step: int):
        """Write a new version of one part of one unit, for ``step``; visible to reads at once, durable
        after ``commit(step)``."""
        self._check_writable()
        header, buffers = encode_safetensors(tensors)
        name = f"{unit}.{part}.s{step:08d}.safetensors"
        try:
            size, crc = write_file_atomic(os.path.join(self.path, UNITS_DIR, name), header, *buffers,
                                          durable=False, reuse=self._recycle_path(unit, part))
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"disk full while writing {unit} {part} in {self.path}: a training step writes a new version of "
                    f"every unit before deleting the old one and needs about {_gib(self.step_write_bytes())} free "
                    f"there (free now: {_gib(shutil.disk_usage(self.path).free)}). Free some space and run the same "
                    f"command again; the store is still at step {self.step}.") from error
            raise StoreError(f"cannot write {unit} {part} in {self.path}: {error.strerror or error}. The store is "
                             f"still at step {self.step}; fix the disk and run the same command again.") from error
        with self._lock:
            self.bytes_written += size
            self._working.setdefault(unit, {})[part] = {"file": name, "bytes": size, "crc32c": crc}
            self._unsynced.add(name)

    def commit(self, step: int, extra: dict | None = None, keep_previous: bool = False):
        """Make every write so far the store's state at ``step``, atomically, then delete what it replaced.

        ``keep_previous`` (the second phase of a commit across ranks, ``distributed/commit.py``): keep the files
        of the state it replaces, and a record of that state in the manifest (``previous``), so that
        ``rollback`` can go back to it until ``release_previous`` is called once every rank has switched."""
        self._check_writable()
        if keep_previous and "previous" in self.manifest:
            raise StoreError(f"cannot commit store {self.path} at step {step} keeping step {self.step}: the "
                             f"previous step {self.manifest['previous']['step']} is still kept; release it first")
        with self._lock:
            files = {unit: dict(parts) for unit, parts in self._working.items()}
        missing = [unit for unit in self.units if "weights" not in files.get(unit, {})]
        if missing:
            raise StoreError(f"cannot commit store {self.path}: units {missing[:3]} have no weights")
        old_files = self._referenced_files(self.manifest["files"])
        manifest = dict(self.manifest, step=step, files=files)
        if extra is not None:
            manifest["extra"] = extra
        if keep_previous:
            manifest["format_version"] = max(manifest["format_version"], KEPT_PREVIOUS_VERSION)
            manifest["previous"] = {key: self.manifest[key] for key in PREVIOUS_KEYS if key in self.manifest}
        self.sync_writes()
        self._switch_manifest(manifest)
        fault_point("commit.cleanup")
        if not keep_previous:
            self._recycle_unreferenced(old_files)

    def sync_writes(self):
        """Make every file written since the last commit durable (fsync them and the units folder): the first
        phase of a commit; ``commit`` calls it itself."""
        with self._lock:
            files = self._referenced_files(self._working)
            pending = sorted(self._unsynced & files)
        # Every file the new manifest names must be on disk before the manifest is (their writeback started
        # when they were written, so this mostly waits for what is still in flight).
        for name in pending:
            fsync_path(os.path.join(self.path, UNITS_DIR, name))
        with self._lock:
            self._unsynced.clear()
        fsync_path(os.path.join(self.path, UNITS_DIR))

    @property
    def previous_step(self) -> int | None:
        """The step whose files a two-phase commit still keeps (``commit(keep_previous=True)``), or None."""
        previous = self.manifest.get("previous")
        return None if previous is None else previous["step"]

    def release_previous(self):
        """Forget the kept previous step and recycle its files (every rank has switched: no rollback needed)."""
        self._check_writable()
        if "previous" not in self.manifest:
            return
        kept = self._referenced_files(self.manifest["previous"]["files"])
        manifest = {key: value for key, value in self.manifest.items() if key != "previous"}
        manifest["format_version"] = self.manifest["previous"].get("format_version", manifest["format_version"])
        self._switch_manifest(manifest)
        self._recycle_unreferenced(kept)

    def rollback(self, step: int):
        """Go back to the kept previous state at ``step`` (this store committed ``step + 1``, or ``step`` again,
        while another rank did not): one atomic manifest switch, then the newer files are recycled. No-op at
        ``step`` already with no kept state of that step."""
        self._check_writable()
        previous = self.manifest.get("previous")
        if previous is None or previous["step"] != step:
            if self.step == step:
                return
            kept = "no earlier step" if previous is None else f"step {previous['step']}"
            raise StoreError(f"cannot roll store {self.path} back from step {self.step} to step {step}: it keeps "
                             f"{kept}. The ranks' stores do not belong to one run (or were changed by hand); "
                             "restore them from one run's folders, or start the run again from the model.")
        newer = self._referenced_files(self.manifest["files"])
        manifest = {key: value for key, value in self.manifest.items() if key != "previous"}
        manifest.update(previous)
        self._switch_manifest(manifest)
        with self._lock:
            self._working = {unit: dict(parts) for unit, parts in manifest["files"].items()}
            self._unsynced.clear()
        self._recycle_unreferenced(newer)

    def _switch_manifest(self, manifest: dict):
        """Replace the manifest with one atomic, durable rename."""
        manifest_path = os.path.join(self.path, MANIFEST)
        data = json.dumps(manifest, indent=1).encode()
        tmp = manifest_path + ".commit.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        fault_point("commit.rename")
        os.replace(tmp, manifest_path)
        fsync_path(self.path)
        self.manifest = manifest

    def _recycle_unreferenced(self, old_files: set[str]):
        """Keep each of ``old_files`` the manifest no longer names as the next version of its unit and part,
        overwritten in place: deleting and allocating every file of the model each step costs more than writing
        it on some file systems."""
        for stale in old_files - self._referenced_files(self.manifest["files"]):
            unit, part = stale.rsplit(".", 3)[:2]
            try:
                os.replace(os.path.join(self.path, UNITS_DIR, stale), self._recycle_path(unit, part))
            except FileNotFoundError:
                pass

    def _recycle_path(self, unit: str, part: str) -> str:
        return os.path.join(self.path, UNITS_DIR, f"{unit}.{part}.recycle.tmp")

    def remove_recycled_files(self):
        """Delete the files kept for reuse (at the end of a run; they are disposable)."""
        units_dir = os.path.join(self.path, UNITS_DIR)
        for name in os.listdir(units_dir):
            if name.endswith(".recycle.tmp"):
                os.remove(os.path.join(units_dir, name))

    def remove_uncommitted_files(self) -> int:
        """Delete files a crashed run left behind (not in the committed manifest). Returns how many."""
        self._check_writable()
        keep = self._referenced_files(self.manifest["files"])
        if "previous" in self.manifest:  # kept for a rollback across ranks (commit(keep_previous=True))
            keep |= self._referenced_files(self.manifest["previous"]["files"])
        removed = 0
        units_dir = os.path.join(self.path, UNITS_DIR)
        for name in os.listdir(units_dir):
            if name not in keep:
                os.remove(os.path.join(units_dir, name))
                removed += 1
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):
                os.remove(os.path.join(self.path, name))
                removed += 1
        if os.path.isdir(os.path.join(self.path, "scratch")):  # activations spilled by a crashed run
            shutil.rmtree(os.path.join(self.path, "scratch"))
        with self._lock:
            self._working = {unit: dict(parts) for unit, parts in self.manifest["files"].items()}
            self._unsynced.clear()
        return removed

    # ------------------------------------------------------------------ locking
    def _acquire_lock(self):
        try:
            self._lock_handle = HolderLock(os.path.join(self.path, "lock"))
        except LockHeld as held:
            raise StoreError(f"store {self.path} is in use by {held.holder}; wait for that run to finish "
                             "or stop it before starting another") from None

    def close(self):
        """Delete the files kept for reuse and release the write lock (if held)."""
        if self._lock_handle is not None:
            self.remove_recycled_files()
            self._lock_handle.release()
            self._lock_handle = None

    def _check_writable(self):
        if not self.writable:
            raise StoreError(f"store {self.path} was opened read-only")

    @staticmethod
    def _referenced_files(files: dict) -> set[str]:
        return {entry["file"] for parts in files.values() for entry in parts.values()}
