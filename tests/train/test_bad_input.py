"""Bad input through the real commands: a clear one-paragraph error, no traceback (unless --debug), a non-zero
exit, and nothing changed on disk.

Every case runs ``python finetune.py``, ``python test_gen.py`` or ``python -m offload_bitnet.cli`` in a
subprocess, as a user would. Each command's inputs (model folders, stores, data files) are hashed before and
after; a store's ``lock`` file is left out, since every writable open records its holder there.

README.md lists every case with the first line of what the user sees; each test checks its rows
against what the command printed (``…`` in the table stands for any text, e.g. a temporary path), and
``test_every_documented_case_has_a_test`` checks that the table and the tests name the same cases.

Most of each command's ~3 s goes to importing torch, so the commands of one test run concurrently.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from offload_bitnet.store.write import create_model
from offload_bitnet.formats import export_model
from offload_bitnet.store.blockstore import BlockStore
from repo_paths import REPO

ROOT = REPO
DOC = os.path.join(ROOT, "README.md")
FINETUNE = [sys.executable, os.path.join(ROOT, "finetune.py")]
TEST_GEN = [sys.executable, os.path.join(ROOT, "test_gen.py")]
CLI = [sys.executable, "-m", "offload_bitnet.cli"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Result:
    """What one command did."""

    command: list
    rc: int
    out: str
    err: str


def run_all(*commands: list[str], env: dict | None = None) -> list[Result]:
    """Run the commands concurrently (each its own process); results in order."""
    environment = dict(os.environ, **(env or {}))
    environment.pop("OFFLOAD_BITNET_FAULTS", None)
    processes = [subprocess.Popen(c, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in commands]
    results = []
    for command, process in zip(commands, processes):
        out, err = process.communicate(timeout=300)
        results.append(Result(command, process.returncode, out, err))
    return results


def error_paragraph(result: Result) -> list[str]:
    """Assert a clean failure: non-zero exit, no traceback, stderr ending in one ``error:`` paragraph (no
    blank line in it). Returns the paragraph's lines."""
    context = f"{result.command[1:]}\nexit {result.rc}\nstdout: {result.out[-1500:]}\nstderr: {result.err[-3000:]}"
    assert result.rc > 0, context
    assert "Traceback" not in result.err, context
    lines = result.err.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, context
    paragraph = lines[starts[0]:]
    assert all(line.strip() for line in paragraph), context
    return paragraph


def debug_traceback(result: Result) -> str:
    """Assert a failure that shows a traceback (``--debug``); returns stderr."""
    assert result.rc > 0 and "Traceback (most recent call last)" in result.err, result.err[-3000:]
    return result.err


# ---------------------------------------------------------------------------------------------- disk state
def digest(*paths) -> dict[str, str]:
    """sha256 of every file under ``paths`` (a store's ``lock`` file aside)."""
    found = {}
    for top in map(str, paths):
        if os.path.isfile(top):
            found[top] = hashlib.sha256(open(top, "rb").read()).hexdigest()
            continue
        for folder, _, files in os.walk(top):
            for name in files:
                path = os.path.join(folder, name)
                if name == "lock" and os.path.isfile(os.path.join(folder, "manifest.json")):
                    continue
                found[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def files_under(path) -> list[str]:
    """Relative paths of the files under ``path`` (folders alone do not count)."""
    return sorted(os.path.relpath(os.path.join(folder, name), path)
                  for folder, _, files in os.walk(path) for name in files)


def assert_run_folder_clean(runs_dir):
    """A failed run leaves nothing in the runs folder: no model, no metrics, no run.json, no run.lock."""
    assert files_under(runs_dir) == [] and not os.listdir(runs_dir) if os.path.isdir(runs_dir) else True, \
        files_under(runs_dir)


# ---------------------------------------------------------------------------------------------- the doc
def doc_rows() -> dict[str, dict]:
    """Rows of the bad-input table in README.md by case id: {"input", "command", "message", "exit"}."""
    rows = {}
    for line in open(DOC, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 5 or not re.fullmatch(r"`[a-z0-9-]+`", cells[0]):  # the README has other tables
            continue
        case, bad_input, command, message, code = cells
        rows[case.strip("`")] = {"input": bad_input, "command": command, "message": message, "exit": code}
    return rows


def check_doc(case: str, lines: list[str], rc: int):
    """The documented message of ``case`` (its lines separated by ``<br>``) matches the first lines the
    command printed (``…`` matches any text), and so does the exit status."""
    row = doc_rows().get(case)
    assert row is not None, f"README.md has no row for {case!r}"
    documented = row["message"].split("<br>")
    for wanted, line in zip(documented, lines + [""] * len(documented)):  # a missing line matches nothing
        pattern = ".*?".join(re.escape(part) for part in wanted.strip().strip("`").split("…"))
        assert re.fullmatch(pattern, line.strip(), re.S), f"{case}: the doc says\n  {wanted}\nsaw\n  {line}"
    assert row["exit"] == str(rc), f"{case}: the doc says exit {row['exit']}, the command exited {rc}"


def expect(case: str, result: Result) -> str:
    """A clean failure whose message is the documented one; returns the whole stderr."""
    check_doc(case, error_paragraph(result), result.rc)
    return result.err


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small store and its Hugging Face export (made in-process: no subprocess start-up)."""
    root = tmp_path_factory.mktemp("models")
    store = create_model(str(root / "store"), size="demo", n_layers=2)
    hf = export_model(store, str(root / "hf"), "hf")
    data = root / "data.txt"
    data.write_text(TEXT)
    return {"root": root, "store": store, "hf": hf, "data": str(data)}


def copy_store(models, tmp_path, name="store") -> str:
    target = str(tmp_path / name)
    shutil.copytree(models["store"], target)
    return target


def hf_variant(models, tmp_path, name: str) -> str:
    target = tmp_path / name
    shutil.copytree(models["hf"], target)
    return str(target)


class Payload:
    """Pickles to a call of os.system: unpickling it (i.e. executing the file) creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


# ---------------------------------------------------------------------------------------------- model paths
def test_missing_or_wrong_model_path(models, tmp_path):
    runs = tmp_path / "runs"
    before = digest(models["data"])
    missing, not_model, under_file = run_all(
        FINETUNE + [str(tmp_path / "no-such-model"), "--data", models["data"], "--runs-dir", str(runs)],
        FINETUNE + [models["data"], "--data", models["data"], "--runs-dir", str(runs)],
        CLI + ["create", os.path.join(models["data"], "store")])
    expect("missing-model-path", missing)
    expect("model-path-is-a-data-file", not_model)
    expect("output-path-under-a-file", under_file)
    assert digest(models["data"]) == before
    assert files_under(runs) == []


def test_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    (folder / "weights.bin").write_bytes(b"\0" * 64)
    before = digest(folder)
    (gen,) = run_all(TEST_GEN + [str(folder), "--prompt", "hi"], env={"OFFLOAD_BITNET_CACHE": str(tmp_path / "cache")})
    assert "found: notes.txt, weights.bin" in expect("folder-not-a-model", gen)
    assert digest(folder) == before
    assert files_under(tmp_path / "cache") == []


def test_unsupported_architecture(models, tmp_path):
    src = hf_variant(models, tmp_path, "gpt2")
    config = json.load(open(os.path.join(src, "config.json")))
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    json.dump(config, open(os.path.join(src, "config.json"), "w"))
    before = digest(src)
    (imported,) = run_all(CLI + ["import", src, str(tmp_path / "out")])
    expect("unsupported-architecture", imported)
    assert digest(src) == before
    assert not os.path.exists(tmp_path / "out")


def test_truncated_model_files(models, tmp_path):
    """A safetensors shard and a GGUF file cut short, as an interrupted download leaves them."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    hf = hf_variant(models, tmp_path, "cut")
    weights = os.path.join(hf, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:len(data) * 2 // 3])
    gguf_path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(gguf_path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.ones((256, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = open(gguf_path, "rb").read()
    open(gguf_path, "wb").write(data[:len(data) // 2])
    before = digest(hf, gguf_path)
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    train, gen = run_all(FINETUNE + [hf, "--data", models["data"], "--runs-dir", str(runs)],
                         TEST_GEN + [gguf_path, "--prompt", "hi"], env={"OFFLOAD_BITNET_CACHE": str(cache)})
    expect("truncated-safetensors", train)
    expect("truncated-gguf", gen)
    assert digest(hf, gguf_path) == before
    assert files_under(runs) == [] and files_under(cache) == []


def test_run_folder_or_adapter_folder_given_as_the_model(models, tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    shutil.copytree(models["store"], run / "store")
    (run / "run.json").write_text(json.dumps({"source": "new demo BitNet model (seed 0)", "store": str(run / "store")}))
    lora = tmp_path / "runs" / "lora"
    (lora / "adapter").mkdir(parents=True)
    (lora / "run.json").write_text(json.dumps({"source": "/models/SmolLM2.gguf", "store": "/cache/SmolLM2-x"}))
    (lora / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/SmolLM2-x"}))
    before = digest(run, lora)
    run_gen, adapter_gen = run_all(TEST_GEN + [str(run), "--prompt", "hi"],
                                   TEST_GEN + [str(lora / "adapter"), "--prompt", "hi"],
                                   env={"OFFLOAD_BITNET_CACHE": str(tmp_path / "cache")})
    expect("run-folder-as-model", run_gen)
    expect("adapter-folder-as-model", adapter_gen)
    assert digest(run, lora) == before and not os.path.exists(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- vocabulary
def test_tokenizer_larger_than_the_embedding_is_refused_at_import(models, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    src = hf_variant(models, tmp_path, "hf-big-tokenizer")
    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(300)} | {"[UNK]": 300}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(os.path.join(src, "tokenizer.json"))  # 301 tokens; the model has 260 embedding rows

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 32}))
    hidden = 96  # Meta's rule for dim 32, multiple_of 32
    generator = torch.Generator().manual_seed(0)
    shapes = {"tok_embeddings.weight": (64, 32), "norm.weight": (32,), "output.weight": (64, 32),
              "layers.0.attention.wq.weight": (32, 32), "layers.0.attention.wk.weight": (32, 32),
              "layers.0.attention.wv.weight": (32, 32), "layers.0.attention.wo.weight": (32, 32),
              "layers.0.feed_forward.w1.weight": (hidden, 32), "layers.0.feed_forward.w2.weight": (32, hidden),
              "layers.0.feed_forward.w3.weight": (hidden, 32), "layers.0.attention_norm.weight": (32,),
              "layers.0.ffn_norm.weight": (32,)}
    torch.save({k: torch.randn(s, generator=generator) for k, s in shapes.items()}, meta / "consolidated.00.pth")
    # A Llama 3 style tiktoken rank file: 10 ranks + 256 special tokens = 266 ids, for a 64-row embedding.
    (meta / "tokenizer.model").write_text("".join(f"{chr(65 + i).encode().hex()} {i}\n" for i in range(10)))
    before = digest(src, meta)
    runs = tmp_path / "runs"
    hf_train, meta_import = run_all(FINETUNE + [src, "--data", models["data"], "--runs-dir", str(runs)],
                                    CLI + ["import", str(meta), str(tmp_path / "out-meta")])
    expect("tokenizer-larger-than-embedding", hf_train)
    expect("tokenizer-larger-than-embedding-meta", meta_import)
    assert digest(src, meta) == before
    assert files_under(runs) == [] and not os.path.exists(tmp_path / "out-meta")


def test_model_vocabulary_smaller_than_the_tokenizer_ids(models, tmp_path):
    # A store whose embedding has 200 rows while its (byte) tokenizer produces ids up to 259.
    store = create_model(str(tmp_path / "small-vocab"), size="demo", n_layers=1, vocab_size=200)
    before = digest(store, models["data"])
    runs = tmp_path / "runs"
    # --tokenizer byte: asked for on purpose (without it the store is refused, as the next test shows), so
    # the ids themselves are checked.
    train, gen = run_all(FINETUNE + [store, "--data", models["data"], "--runs-dir", str(runs), "--tokenizer", "byte"],
                         TEST_GEN + [store, "--prompt", "hi", "--tokenizer", "byte"])
    expect("vocab-smaller-than-tokenizer-ids", train)
    expect("vocab-smaller-than-tokenizer-ids-generate", gen)
    assert "warning: using the built-in byte tokenizer" in gen.err
    assert digest(store, models["data"]) == before
    assert_run_folder_clean(runs)


def test_model_without_a_tokenizer_whose_vocabulary_is_not_bytes(models, tmp_path):
    # A blank store with a 1000-token vocabulary carries no tokenizer: bytes would be garbage to it.
    store = create_model(str(tmp_path / "big-vocab"), size="demo", n_layers=1, vocab_size=1000)
    before = digest(store, models["data"])
    runs = tmp_path / "runs"
    train, gen = run_all(FINETUNE + [store, "--data", models["data"], "--runs-dir", str(runs)],
                         TEST_GEN + [store, "--prompt", "hi"])
    expect("no-tokenizer-vocab-mismatch", gen)
    expect("no-tokenizer-vocab-mismatch-train", train)
    assert digest(store, models["data"]) == before
    assert_run_folder_clean(runs)


# ---------------------------------------------------------------------------------------------- data
def test_bad_data_files(models, tmp_path):
    files = {
        "malformed-jsonl": ("bad.jsonl", b'{"text": "fine"}\n{"text": "no closing brace"\n{"text": "fine"}\n'),
        "malformed-json": ("bad.json", b'[{"text": "fine"},\n {"text": "missing comma"} {"text": "x"}]\n'),
        "empty-data": ("empty.jsonl", b"\n\n"),
        "non-utf8-text": ("latin1.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")),
    }
    paths, stores, commands = {}, {}, []
    for case, (name, content) in files.items():
        paths[case] = str(tmp_path / name)
        open(paths[case], "wb").write(content)
        # One store per command: a run holds its store's write lock while it loads the data.
        stores[case] = copy_store(models, tmp_path, f"store-{case}")
        commands.append(FINETUNE + [stores[case], "--data", paths[case], "--runs-dir", str(tmp_path / f"runs-{case}")])
    before = digest(*paths.values(), *stores.values())
    results = dict(zip(files, run_all(*commands)))
    assert "line 2" in expect("malformed-jsonl", results["malformed-jsonl"])
    assert "line 2" in expect("malformed-json", results["malformed-json"])
    expect("empty-data", results["empty-data"])
    assert "byte 0xe9" in expect("non-utf8-text", results["non-utf8-text"])
    assert digest(*paths.values(), *stores.values()) == before
    for case in files:
        assert_run_folder_clean(tmp_path / f"runs-{case}")


# ---------------------------------------------------------------------------------------------- run config
def test_contradictory_config_values_and_bad_sizes(models, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = ["{models["data"]}"]\nnum_epochs = 2\nnum_train_iters = 50\nbatch_size = 6\n'
                    'grad_accum = 4\n')
    runs = tmp_path / "runs"
    before = digest(models["store"], toml)
    contradictory, sizes = run_all(
        FINETUNE + [models["store"], "--config", str(toml), "--runs-dir", str(runs)],
        FINETUNE + [models["store"], "--data", models["data"], "--runs-dir", str(runs), "--batch-size", "0",
                    "--max-seq-len", "-5", "--memory-budget=-1GiB", "--num-train-iters", "0"])
    assert "grad_accum could be one of [1, 2, 3, 6]" in expect("contradictory-config", contradictory)
    expect("zero-or-negative-sizes", sizes)
    assert digest(models["store"], toml) == before
    assert files_under(runs) == []


def test_command_line_mistakes_get_one_line(models, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "exported"
    before = digest(models["store"], models["data"])
    negative, unknown, unknown_sub, device = run_all(
        FINETUNE + [models["store"], "--data", models["data"], "--runs-dir", str(runs), "--lr", "-1e-3"],
        FINETUNE + [models["store"], "--data", models["data"], "--runs-dir", str(runs), "--lerning-rate", "1e-3"],
        CLI + ["export", models["store"], str(out), "--formt", "hf"],
        TEST_GEN + [models["store"], "mps", "--device", "cpu", "--prompt", "hi"])
    # One line each, not argparse's usage.
    assert len(expect("negative-learning-rate", negative).splitlines()) == 1
    assert len(expect("unknown-option", unknown).splitlines()) == 1
    assert len(expect("unknown-option-subcommand", unknown_sub).splitlines()) == 1
    assert len(expect("device-given-twice", device).splitlines()) == 1
    assert digest(models["store"], models["data"]) == before
    assert files_under(runs) == [] and not out.exists()


# ---------------------------------------------------------------------------------------------- stores
def test_store_locked_by_another_run(models, tmp_path):
    store = copy_store(models, tmp_path)
    holder = BlockStore(store, writable=True)  # this test process is "the other run"
    try:
        before = digest(store)
        (train,) = run_all(FINETUNE + [store, "--data", models["data"], "--runs-dir", str(tmp_path / "runs")])
        assert f"in use by pid {os.getpid()}" in expect("store-locked", train)
        assert digest(store) == before
    finally:
        holder.close()
    assert_run_folder_clean(tmp_path / "runs")


def test_pth_with_pickled_code_is_refused_and_never_executed(models, tmp_path):
    marker = str(tmp_path / "payload-ran")
    zipped, legacy = tmp_path / "meta-zip", tmp_path / "meta-legacy"
    for folder in (zipped, legacy):
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2}))
    torch.save({"tok_embeddings.weight": Payload(marker)}, zipped / "consolidated.00.pth")
    with open(legacy / "consolidated.00.pth", "wb") as handle:  # a raw pickle, as torch < 1.6 wrote them
        pickle.dump({"tok_embeddings.weight": Payload(marker)}, handle)
    before = digest(zipped, legacy)
    runs = tmp_path / "runs"
    trained, imported = run_all(FINETUNE + [str(zipped), "--data", models["data"], "--runs-dir", str(runs)],
                                CLI + ["import", str(legacy), str(tmp_path / "out")])
    assert "GLOBAL posix.system" in expect("pickled-code-pth", trained)
    expect("legacy-pickle-pth", imported)
    assert not os.path.exists(marker), "the pickled payload was executed"
    assert digest(zipped, legacy) == before
    assert files_under(runs) == [] and not os.path.exists(tmp_path / "out")
    # The payload is live: loading the file the unsafe way does run it (so the check above means something).
    torch.load(zipped / "consolidated.00.pth", weights_only=False)
    assert os.path.exists(marker)


def test_corrupted_store_file(models, tmp_path):
    store = copy_store(models, tmp_path, "corrupt")
    units = os.path.join(store, "units")
    name = next(n for n in sorted(os.listdir(units)) if n.startswith("block.001.weights"))
    data = bytearray(open(os.path.join(units, name), "rb").read())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data
    open(os.path.join(units, name), "wb").write(bytes(data))
    before = digest(store)
    runs = tmp_path / "runs"
    verify, train = run_all(
        CLI + ["verify", store],
        FINETUNE + [store, "--data", models["data"], "--runs-dir", str(runs), "--num-train-iters", "1"])
    assert verify.rc == 1 and "Traceback" not in verify.err
    report = [line for line in verify.out.split("\n") if "problem(s)" in line or "  " + store in line]
    check_doc("corrupted-store-verify", report, verify.rc)
    assert f"{name} (block.001 weights) fails its checksum" in verify.out, verify.out
    assert f"{name} (block.001 weights) fails its checksum" in expect("corrupted-store-file", train)
    assert digest(store) == before
    assert_run_folder_clean(runs)


def test_store_with_a_newer_format_version(models, tmp_path):
    store = copy_store(models, tmp_path, "future")
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    manifest["format_version"] = 99
    json.dump(manifest, open(os.path.join(store, "manifest.json"), "w"), indent=1)
    before = digest(store)
    runs = tmp_path / "runs"
    (train,) = run_all(FINETUNE + [store, "--data", models["data"], "--runs-dir", str(runs)])
    expect("newer-store-format", train)
    assert digest(store) == before
    assert_run_folder_clean(runs)


# ---------------------------------------------------------------------------------------------- --debug
def test_debug_shows_the_traceback(models, tmp_path):
    runs = tmp_path / "runs"
    train, cli = run_all(FINETUNE + [str(tmp_path / "no-such-model"), "--data", models["data"], "--runs-dir",
                                     str(runs), "--debug"],
                         CLI + ["--debug", "verify", str(tmp_path / "no-such-store")])
    # The traceback, then the same one-paragraph message as without --debug.
    assert debug_traceback(train).rstrip().split("\n")[-1].startswith("error: ")
    assert "StoreError" in debug_traceback(cli)
    assert files_under(runs) == []


def test_a_failed_run_writes_nothing_in_its_run_folder(models, tmp_path):
    store = copy_store(models, tmp_path)
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    runs = tmp_path / "runs"
    (train,) = run_all(FINETUNE + [store, "--data", str(data), "--runs-dir", str(runs)])
    error_paragraph(train)
    assert files_under(runs) == []


# ---------------------------------------------------------------------------------------------- the table
def test_every_documented_case_has_a_test():
    rows = doc_rows()
    source = open(__file__, encoding="utf-8").read()
    used = set(re.findall(r'(?:expect|check_doc)\("([a-z0-9-]+)"', source))
    assert len(rows) >= 20, sorted(rows)
    assert set(rows) == used, {"documented, no test": sorted(set(rows) - used),
                               "tested, not documented": sorted(used - set(rows))}
    for case, row in rows.items():
        assert row["message"] and row["command"] and row["exit"].isdigit(), (case, row)
