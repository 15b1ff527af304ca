"""The import cache (formats/cache.py): keyed by the source's identity, re-imported when it changes, safe when
two processes import the same source at once, listed and cleared by ``offload-bitnet cache``."""
import json
import multiprocessing
import os
import re
import time

import pytest

from offload_bitnet.cli import main as cli
from offload_bitnet.store.write import create_model
from offload_bitnet.formats import cache, ensure_store, is_complete_store
from repo_paths import REPO

TEST_DATA = os.path.join(REPO, "test_data")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_BITNET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_importer(src, out_dir, settings, progress):
    """Stands in for an importer: records the call, then writes a one-block store."""
    with open(src + ".imports", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    delay = float(os.environ.get("FAKE_IMPORT_SECONDS", "0"))
    time.sleep(delay)  # widens the window in which a second process could collide; correctness never needs it
    create_model(out_dir, size="demo", n_layers=1)
    return out_dir


def imports_of(src) -> int:
    return len(open(src + ".imports").read().split()) if os.path.exists(src + ".imports") else 0


def write_source(path, head: bytes, size: int = 3 << 20):
    """A fake model file of ``size`` bytes starting with ``head``."""
    with open(path, "wb") as handle:
        handle.write(head + bytes(size - len(head)))


def test_a_changed_source_is_imported_again_and_said_so(tmp_path, cache_dir, capsys):
    src = str(tmp_path / "model.gguf")
    write_source(src, b"GGUF first")
    first = cache.ensure_cached_import(src, fake_importer)
    assert is_complete_store(first) and first.startswith(str(cache_dir))
    assert "importing" in capsys.readouterr().err
    assert cache.ensure_cached_import(src, fake_importer) == first and imports_of(src) == 1
    assert f"using the cached import of {src}: {first}" in capsys.readouterr().err

    # Another file of the same name and size, with the modification time put back: the content hash differs.
    stat = os.stat(src)
    write_source(src, b"GGUF other")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = cache.ensure_cached_import(src, fake_importer)
    err = capsys.readouterr().err
    assert second != first and imports_of(src) == 2
    assert f"{src} changed since it was imported into {first} (model.gguf: content changed)" in err
    # The same content touched later (a copy, a re-download) is imported again too: its data may differ
    # past the hashed first MiB.
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = cache.ensure_cached_import(src, fake_importer)
    assert third not in (first, second) and "modified time changed" in capsys.readouterr().err

    # list: the earlier imports are stale; clear --stale removes only them.
    assert cli(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count("stale (source changed)") == 2 and out.count("  ok") == 1 and "3 import(s)" in out
    assert "MiB" in out or "KiB" in out
    assert cli(["cache", "clear", "--stale"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not os.path.exists(first) and not os.path.exists(second) and is_complete_store(third)
    assert cache.ensure_cached_import(src, fake_importer) == third and imports_of(src) == 3


def test_a_folder_source_is_keyed_by_its_small_files(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"vocab_size": 260}')
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    before = cache.source_identity(str(folder))
    assert set(before["files"]) == {"config.json", "model.safetensors"}
    time.sleep(0.01)
    (folder / "config.json").write_text('{"vocab_size": 261}')
    after = cache.source_identity(str(folder))
    assert after["files"]["config.json"]["sha256"] != before["files"]["config.json"]["sha256"]
    assert cache.entry_name(str(folder), before) != cache.entry_name(str(folder), after)
    assert after["files"]["model.safetensors"] == before["files"]["model.safetensors"]


def _import_in_child(src, queue):
    queue.put(cache.ensure_cached_import(src, fake_importer, progress=False))


def test_two_processes_importing_the_same_source_share_one_import(tmp_path, monkeypatch):
    src = str(tmp_path / "model.gguf")
    write_source(src, b"GGUF shared")
    monkeypatch.setenv("FAKE_IMPORT_SECONDS", "1")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_import_in_child, args=(src, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert results[0] == results[1] and is_complete_store(results[0])
    assert imports_of(src) == 1  # the second waited on the lock, then used the first's import
    root = cache.cache_root()
    assert sorted(os.listdir(root)) == sorted([".locks", ".staging", os.path.basename(results[0])])
    assert os.listdir(os.path.join(root, ".staging")) == [] and os.listdir(os.path.join(root, ".locks")) == []


def test_an_interrupted_import_leaves_nothing(tmp_path, cache_dir):
    src = str(tmp_path / "model.gguf")
    write_source(src, b"GGUF broken")

    def failing(src, out_dir, settings, progress):
        create_model(out_dir, size="demo", n_layers=1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.ensure_cached_import(src, failing)
    leftovers = [os.path.join(folder, name) for folder, _, names in os.walk(cache_dir) for name in names]
    assert leftovers == []
    assert is_complete_store(cache.ensure_cached_import(src, fake_importer))


def test_cache_clear_older_than(tmp_path, capsys):
    src = str(tmp_path / "model.gguf")
    write_source(src, b"GGUF old")
    entry = cache.ensure_cached_import(src, fake_importer, progress=False)
    assert cli(["cache", "clear", "--older-than", "1d"]) == 0
    assert os.path.isdir(entry) and "freed 0 B" in capsys.readouterr().out
    record = json.load(open(os.path.join(entry, cache.SOURCE_RECORD)))
    record["imported"] = "2020-01-01T00:00:00"
    json.dump(record, open(os.path.join(entry, cache.SOURCE_RECORD), "w"))
    assert cli(["cache", "list"]) == 0 and re.search(r"imported \d+d\d\dh ago", capsys.readouterr().out)
    assert cli(["cache", "clear", "--older-than", "2w"]) == 0
    assert not os.path.exists(entry) and f"removed {entry}" in capsys.readouterr().out
    assert cli(["cache", "clear", "--older-than", "soon"]) == 1
    assert "not a duration: 'soon'" in capsys.readouterr().err
    assert cache.parse_duration("30m") == 1800 and cache.parse_duration("12h") == 43200


def test_lora_runs_share_the_cached_import_of_their_base(tmp_path, cache_dir, capsys):
    from offload_bitnet.formats import export_model
    from offload_bitnet.train.trainer import main

    store = create_model(str(tmp_path / "base"), size="demo", arch="llama", n_layers=1)
    hf = export_model(store, str(tmp_path / "hf"), "hf", progress=False)
    runs = tmp_path / "runs"
    for experiment in ("a", "b"):
        assert main([hf, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(runs), "--experiment",
                     experiment, "--mode", "lora", "--num-train-iters", "1", "--batch-size", "2",
                     "--max-seq-len", "32", "--no-plot", "--tokenizer", "byte"]) == 0
    assert not os.path.exists(runs / "a" / "store") and not os.path.exists(runs / "b" / "store")
    entries = [name for name in os.listdir(cache_dir) if not name.startswith(".")]
    assert len(entries) == 1
    err = capsys.readouterr().err
    assert f"using the cached import of {hf}: {cache_dir / entries[0]}" in err
    assert json.load(open(runs / "b" / "run.json"))["store"] == str(cache_dir / entries[0])
    assert ensure_store(hf, progress=False) == str(cache_dir / entries[0])
    # --restart of a LoRA run leaves the shared base alone.
    assert main([hf, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--runs-dir", str(runs), "--experiment", "a",
                 "--mode", "lora", "--num-train-iters", "1", "--batch-size", "2", "--max-seq-len", "32",
                 "--no-plot", "--tokenizer", "byte", "--restart"]) == 0
    assert is_complete_store(str(cache_dir / entries[0]))
