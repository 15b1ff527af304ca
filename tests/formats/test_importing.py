"""The one import skeleton (formats.importing): an import or merge interrupted half-way leaves neither a partial
store nor a staging folder, a retry succeeds, and leftovers of killed imports are cleared."""
import os
import subprocess
import sys

import pytest
import torch

from offload_bitnet import BlockStore, EngineOptions, StoreError, StreamingEngine, create_model
from offload_bitnet.formats import export_model, import_model, importing
from offload_bitnet.formats.merge import merge_lora
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.model.lora import LoRAConfig

SHAPE = dict(n_layers=3, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=260)


def interrupt_after(monkeypatch, units: int, error=KeyboardInterrupt):
    """Make the source of every import raise ``error`` once ``units`` units have been written."""
    real = importing.write_store

    def write_store(path, config, source, *args, **kwargs):
        def cut():
            for index, item in enumerate(source):
                if index == units:
                    raise error("interrupted half-way")
                yield item
        return real(path, config, cut(), *args, **kwargs)

    monkeypatch.setattr(importing, "write_store", write_store)


def sources(root):
    """A tiny model in each importable format, and a merge job, as ``name -> (do(out_dir))``."""
    llama = create_model(str(root / "llama"), "demo", "llama", seed=1, **SHAPE)
    made = {fmt: export_model(llama, str(root / f"src-{fmt}"), format=fmt, progress=False)
            for fmt in ("hf", "meta", "gguf")}
    engine = StreamingEngine(BlockStore(llama), EngineOptions(lora=LoRAConfig(rank=2, alpha=4), seed=0,
                                                              adapter_dir=str(root / "adapter"),
                                                              optim=AdamWConfig(lr=1e-2)))
    engine.train_step([(torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0)), None)])
    engine.close()
    jobs = {fmt: (lambda out, progress=False, src=src: import_model(src, out, progress=progress))
            for fmt, src in made.items()}
    jobs["merge"] = lambda out, progress=False: merge_lora(llama, str(root / "adapter"), out, progress=progress)
    return jobs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    return sources(tmp_path_factory.mktemp("sources"))


@pytest.mark.parametrize("kind", ["hf", "meta", "gguf", "merge"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_import_leaves_nothing_and_a_retry_succeeds(jobs, kind, error, tmp_path, monkeypatch):
    out = tmp_path / "store"
    interrupt_after(monkeypatch, 2, error)
    with pytest.raises(error, match="interrupted half-way"):
        jobs[kind](str(out))
    assert os.listdir(tmp_path) == [], "a partial store or a staging folder was left behind"
    monkeypatch.undo()
    assert jobs[kind](str(out)) == str(out)
    assert BlockStore(str(out)).step == 0 and os.listdir(tmp_path) == ["store"]


def test_an_empty_target_folder_is_used_and_a_busy_one_refused(jobs, tmp_path):
    (tmp_path / "empty").mkdir()
    jobs["hf"](str(tmp_path / "empty"))
    assert BlockStore(str(tmp_path / "empty")).step == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not empty"):
        jobs["meta"](str(tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]
    with pytest.raises(StoreError, match="already holds a store"):
        jobs["merge"](str(tmp_path / "empty"))


def test_leftovers_of_killed_imports_are_removed_and_live_ones_kept(tmp_path):
    target = str(tmp_path / "store")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = importing.staging_path(target, pid=int(dead.stdout))
    running = importing.staging_path(target, pid=os.getppid())  # a live process (pytest's parent)
    for folder in (killed, running):
        os.makedirs(os.path.join(folder, "units"))
    with importing.staged_folder(target) as staging:
        assert os.path.dirname(staging) == str(tmp_path) and os.path.basename(staging).startswith(".store.importing-")
        open(os.path.join(staging, "marker"), "w").close()
    assert sorted(os.listdir(tmp_path)) == sorted(["store", os.path.basename(running)])
    assert os.listdir(target) == ["marker"]


def test_a_staged_target_is_written_in_place_by_a_nested_stage(tmp_path):
    """The import cache stages the importer's output; the importer's own staging then adds no second folder."""
    target = str(tmp_path / "entry")
    with importing.staged_folder(target, str(tmp_path / ".staging")) as outer:
        with importing.staged_folder(outer) as inner:
            assert inner == outer
            open(os.path.join(inner, "marker"), "w").close()
        assert os.listdir(tmp_path / ".staging") == [os.path.basename(outer)]
    assert os.listdir(target) == ["marker"] and os.listdir(tmp_path / ".staging") == []


@pytest.mark.parametrize("kind", ["hf", "meta", "gguf", "merge"])
def test_imports_report_progress_with_an_eta(jobs, kind, tmp_path, capsys):
    jobs[kind](str(tmp_path / "store"), progress=True)
    err = capsys.readouterr().err
    units = SHAPE["n_layers"] + 3  # embed, blocks, norm, head
    assert f"units {units}/{units} head" in err and "ETA 0s" in err
