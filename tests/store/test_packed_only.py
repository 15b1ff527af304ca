"""Packed-only stores (a frozen ternary base): what creation writes and its size, LoRA and generation identical
to the qat store with the same packed weights, the refusals to train the weights, the import of a packed HF
BitNet checkpoint, export, merge, verify and info."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import pytest
import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StoreError, StreamingEngine, create_model
from offload_bitnet.api import open_for_training, open_model
from offload_bitnet.cli import main as cli
from offload_bitnet.model.config import config_for_size
from offload_bitnet.generate import Generator, SamplingOptions
from offload_bitnet.model.lora import AdapterSet, LoRAConfig
from offload_bitnet.store.sizing import store_bytes
from offload_bitnet.train.trainer import main as finetune
from repo_paths import REPO

ROOT = REPO
TEXT = os.path.join(ROOT, "test_data", "text.jsonl")
LORA = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))


def _pair(tmp_path, **overrides) -> tuple[str, str]:
    """A qat store and the packed-only store of the same seed (the same packed weights)."""
    shape = dict(size="demo", arch="bitnet", n_layers=2, seed=3, **overrides)
    return (create_model(str(tmp_path / "qat"), **shape),
            create_model(str(tmp_path / "packed"), packed_only=True, **shape))


def _digest(path: str) -> dict[str, str]:
    digests = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            digests[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return digests


def _weights(path: str) -> dict:
    store = BlockStore(path)
    return {unit: store.read(unit, "weights") for unit in store.units}


def _assert_same_tensors(a, b, where="tensors"):
    """Equal structure (dicts, tuples) of bit-identical tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{index}]")
    else:
        assert a.dtype == b.dtype and torch.equal(a, b), where


def _batches(steps, micro=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, 256, (2, 16), generator=generator), None) for _ in range(micro)] for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- creation
def test_create_writes_only_the_forward_part_and_the_predicted_bytes(tmp_path, capsys):
    qat, packed = str(tmp_path / "qat"), str(tmp_path / "packed")
    assert cli(["create", qat, "--size", "demo", "--seed", "3"]) == 0
    assert cli(["create", packed, "--size", "demo", "--seed", "3", "--packed-only"]) == 0
    capsys.readouterr()
    files = os.listdir(os.path.join(packed, "units"))
    assert files and all(".weights." in name for name in files), files
    store = BlockStore(packed)
    assert store.settings.packed_only and store.settings.mode == "qat"
    assert all(not store.has_part(unit, part) for unit in store.units for part in ("shadow", "optim"))
    _assert_same_tensors(_weights(packed), _weights(qat))  # the same packed codes, scales, norms, embeddings

    predicted = store_bytes(store.config, packed_only=True, extra=store.extra)
    on_disk = store.disk_bytes()
    assert on_disk == {"weights": predicted["weights"], "shadow": 0, "optim": 0}
    assert predicted["units"] == predicted["weights"] == BlockStore(qat).disk_bytes()["weights"]
    assert sum(os.path.getsize(os.path.join(packed, "units", n)) for n in files) == predicted["units"]
    assert os.path.getsize(os.path.join(packed, "manifest.json")) <= predicted["manifest"]

    assert cli(["info", packed, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["settings"]["packed_only"] is True and info["bytes_on_disk"] == on_disk
    assert cli(["info", packed]) == 0
    assert "packed-only" in capsys.readouterr().out
    assert cli(["verify", packed]) == 0
    assert "all files match" in capsys.readouterr().out


def test_a_70b_packed_only_store_is_about_17_gib():
    config = config_for_size("70B", "bitnet")
    sizes = store_bytes(config, packed_only=True)
    projections = config.n_layers * sum(out * inp for out, inp in config.projection_shapes.values())
    matrices = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
    norms = config.param_count() - projections - matrices
    # 2 bits a ternary weight, 16-bit embedding and head, fp32 norms and scales, plus the safetensors headers
    data = projections // 4 + 2 * matrices + 4 * norms + 4 * 7 * config.n_layers
    assert sizes["shadow"] == sizes["optim"] == 0
    assert sizes["units"] == data + sizes["headers"] and sizes["headers"] < 2**20
    assert 16.5 * 2**30 < sizes["total"] < 17.5 * 2**30  # 18.2 GB, against 143 GB for the bf16 model


def test_packed_only_needs_qat_and_only_packed_only_manifests_need_the_new_format(tmp_path):
    with pytest.raises(StoreError, match="mode must be 'qat'"):
        create_model(str(tmp_path / "llama"), size="demo", arch="llama", n_layers=1, packed_only=True)
    qat, packed = _pair(tmp_path)
    # Every other store is written as before (version 1, no packed_only key): older versions still open it.
    manifest = json.load(open(os.path.join(qat, "manifest.json")))
    assert manifest["format_version"] == 1 and "packed_only" not in manifest["settings"]
    assert BlockStore(qat).settings.packed_only is False
    # A packed-only store is version 2, which an older version refuses with "upgrade" instead of reading it as
    # a qat store whose shadow weights are missing.
    manifest = json.load(open(os.path.join(packed, "manifest.json")))
    assert manifest["format_version"] == 2 and manifest["settings"]["packed_only"] is True


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_on_packed_only_is_bit_identical_to_lora_on_qat(tmp_path):
    qat, packed = _pair(tmp_path)
    before = _digest(packed)
    results = []
    for path in (qat, packed):
        adapter_dir = str(tmp_path / f"adapter-{os.path.basename(path)}")
        engine = StreamingEngine(BlockStore(path), EngineOptions(lora=LORA, adapter_dir=adapter_dir, seed=0,
                                                                 optim=AdamWConfig(lr=1e-2)))
        losses = [engine.train_step(batches).loss for batches in _batches(3)]
        engine.close()
        results.append((losses, AdapterSet.load(adapter_dir, BlockStore(path).config)))
    (qat_losses, qat_adapters), (packed_losses, packed_adapters) = results
    assert packed_losses == qat_losses and packed_losses[-1] < packed_losses[0]
    _assert_same_tensors(packed_adapters.weights, qat_adapters.weights)
    _assert_same_tensors(packed_adapters.moments, qat_adapters.moments)
    assert _digest(packed) == before  # the base is only read


def test_finetune_lora_on_packed_only_equals_qat_and_training_the_weights_is_refused(tmp_path, capsys):
    qat, packed = _pair(tmp_path)
    runs = str(tmp_path / "runs")
    common = ["--data", TEXT, "--runs-dir", runs, "--num-train-iters", "2", "--batch-size", "2", "--max-seq-len",
              "32", "--lr", "1e-2", "--val-fraction", "0.25", "--no-plot"]
    for path in (qat, packed):
        assert finetune([path, *common, "--mode", "lora", "--lora-rank", "4", "--experiment", os.path.basename(path)
                         ]) == 0
    capsys.readouterr()

    def losses(name):
        with open(os.path.join(runs, name, "metrics.jsonl")) as handle:
            return [r["loss"] for r in map(json.loads, handle) if r["type"] == "train"]

    assert losses("packed") == losses("qat") and len(losses("packed")) == 2
    config = BlockStore(packed).config
    _assert_same_tensors(AdapterSet.load(os.path.join(runs, "packed", "adapter"), config).weights,
                         AdapterSet.load(os.path.join(runs, "qat", "adapter"), config).weights)

    before = _digest(packed)
    for mode in (["--mode", "qat"], ["--mode", "full"], []):
        assert finetune([packed, *common, *mode, "--experiment", "weights-" + "".join(mode[1:])]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert "packed-only store" in err and "no master weights" in err and "--mode lora" in err and "-bf16" in err
    assert finetune([packed, *common, "--dry-run", "--experiment", "plan"]) == 1  # no plan for a refused run
    assert "packed-only store" in capsys.readouterr().err
    assert _digest(packed) == before
    with pytest.raises(StoreError, match="packed-only store .* no master weights"):
        open_for_training(packed)
    engine = open_for_training(packed, lora=LORA, adapter_dir=str(tmp_path / "api-adapter"))  # LoRA is fine
    engine.close()


# ---------------------------------------------------------------------------------------------- generation
def test_generation_and_logits_equal_the_qat_store(tmp_path, capsys, monkeypatch):
    qat, packed = _pair(tmp_path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with open_model(qat) as a, open_model(packed) as b:
        assert torch.equal(a.logits(ids), b.logits(ids))
    prompts = [[256, 72, 101, 108, 108, 111], [256, 65]]
    options = SamplingOptions(max_new_tokens=8, temperature=0.8, top_k=20, seed=2)
    tokens = []
    for path in (qat, packed):
        generator = Generator(path)
        tokens.append(generator.generate(prompts, options, stop_ids=set()).tokens)
        generator.close()
    assert tokens[0] == tokens[1]

    monkeypatch.syspath_prepend(ROOT)
    import test_gen

    outputs = []
    for path in (qat, packed):
        assert test_gen.main([path, "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Hello")


# ---------------------------------------------------------------------------------------------- merge
def test_merge_into_a_new_16bit_store_equals_the_qat_merge(tmp_path, capsys):
    qat, packed = _pair(tmp_path)
    merged = {}
    for path in (qat, packed):
        adapter_dir = str(tmp_path / f"adapter-{os.path.basename(path)}")
        engine = StreamingEngine(BlockStore(path), EngineOptions(lora=LORA, adapter_dir=adapter_dir, seed=0,
                                                                 optim=AdamWConfig(lr=1e-2)))
        for batches in _batches(2):
            engine.train_step(batches)
        engine.close()
        out = str(tmp_path / f"merged-{os.path.basename(path)}")
        assert cli(["merge", path, adapter_dir, out]) == 0
        merged[path] = out
    capsys.readouterr()
    store = BlockStore(merged[packed])
    assert store.settings.mode == "full" and store.settings.shadow_dtype == "fp16" and not store.settings.packed_only
    _assert_same_tensors(_weights(merged[packed]), _weights(merged[qat]))


# ---------------------------------------------------------------------------------------------- HF BitNet
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the packed checkpoints are made with transformers")


@pytest.fixture(scope="module")
def _eager(eager_transformers_quantizers):
    yield


@needs_transformers
@pytest.mark.parametrize("convention", ["autobitlinear", "bitlinear"])
def test_packed_hf_checkpoint_imports_as_packed_only_exactly(tmp_path, convention, _eager):
    from test_formats_hf import bitnet_packed_folder, read_folder

    src = tmp_path / "src"
    bitnet_packed_folder(src, convention)
    source = read_folder(src)
    store_path = str(tmp_path / "store")
    assert cli(["import", str(src), store_path]) == 0
    store = BlockStore(store_path)
    assert store.settings.packed_only and store.settings.mode == "qat" and store.settings.shadow_dtype == "fp32"
    assert store.disk_bytes()["shadow"] == store.disk_bytes()["optim"] == 0
    weights = store.read("block.001", "weights")
    for name in ("q_proj", "down_proj"):
        key = f"model.layers.1.{'self_attn' if name == 'q_proj' else 'mlp'}.{name}.weight"
        assert torch.equal(weights[f"{name}.packed"], source[key])  # the checkpoint's codes, never unpacked
        scale = source[key + "_scale"].float()
        assert torch.equal(weights[f"{name}.scale"], scale if convention == "autobitlinear" else 1.0 / scale)
    assert torch.equal(store.read("embed", "weights")["weight"], source["model.embed_tokens.weight"])

    # Back to the source layout: the same bytes (the scales too, in transformers' own convention).
    assert cli(["export", store_path, str(tmp_path / "same")]) == 0
    again = read_folder(tmp_path / "same")
    assert list(again) == list(source)
    for key, tensor in source.items():
        if key.endswith("_scale") and convention == "bitlinear":  # 1 / (1 / s): fp32 rounding
            assert torch.allclose(again[key], tensor, rtol=1e-6, atol=0), key
        else:
            assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    assert cli(["export", store_path, str(tmp_path / "packed"), "--format", "hf-bitnet"]) == 0
    packed = read_folder(tmp_path / "packed")
    assert torch.equal(packed["model.layers.1.mlp.down_proj.weight"], source["model.layers.1.mlp.down_proj.weight"])
    assert cli(["verify", store_path]) == 0

    # With explicit qat settings the import reconstructs latent shadow weights (no longer the default).
    from offload_bitnet.formats import import_model
    from offload_bitnet.store.blockstore import StoreSettings

    qat_path = import_model(str(src), str(tmp_path / "qat"), StoreSettings(mode="qat", shadow_dtype="fp32"),
                            progress=False)
    assert BlockStore(qat_path).has_part("block.000", "shadow")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with open_model(store_path) as a, open_model(qat_path) as b:
        print("DIFF", (a.logits(ids) - b.logits(ids)).abs().max().item(), a.logits(ids).abs().max().item())
        assert torch.allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-5)


@needs_transformers
def test_a_bf16_tied_bitlinear_checkpoint_like_bitnet_2b_4t_round_trips_bit_for_bit(tmp_path, _eager):
    """microsoft/bitnet-b1.58-2B-4T's layout: bitlinear (W = codes / weight_scale), tied embeddings, bf16 embedding,
    norms and weight_scale."""
    from safetensors.torch import load_file, save_file
    from test_formats_hf import bitnet_packed_folder, read_folder

    src = tmp_path / "src"
    bitnet_packed_folder(src, "bitlinear", tie=True)
    tensors = {key: value.to(torch.bfloat16) if value.is_floating_point() else value
               for key, value in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    config_json = json.loads((src / "config.json").read_text())
    config_json["dtype"] = config_json["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(config_json))

    store_path = str(tmp_path / "store")
    assert cli(["import", str(src), store_path]) == 0
    store = BlockStore(store_path)
    assert store.settings.packed_only and store.settings.shadow_dtype == "bf16" and store.config.tie_embeddings
    assert store.read("embed", "weights")["weight"].dtype == torch.bfloat16
    assert cli(["export", store_path, str(tmp_path / "same")]) == 0
    source, again = read_folder(src), read_folder(tmp_path / "same")
    assert list(again) == list(source)
    for key, tensor in source.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key


@needs_transformers
@pytest.mark.parametrize("fmt", ["source", "hf-bitnet", "hf"])
def test_exports_of_an_imported_packed_only_store_load_in_transformers(tmp_path, fmt, _eager):
    pytest.importorskip("accelerate")  # transformers loads BitNet-quantized checkpoints only with accelerate
    from test_formats_hf import bitnet_packed_folder, load_bitnet

    src = tmp_path / "src"
    bitnet_packed_folder(src, "bitlinear")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_bitnet(src)(ids).logits
    store_path = str(tmp_path / "store")
    assert cli(["import", str(src), store_path]) == 0
    with open_model(store_path) as engine:
        assert (engine.logits(ids) - expected).abs().max() <= 1e-4
    # hf: full precision, the latent weights of the codes (transformers quantizes them back on the fly)
    assert cli(["export", store_path, str(tmp_path / "out"), "--format", fmt]) == 0
    with torch.no_grad():
        got = load_bitnet(tmp_path / "out")(ids).logits
    assert (got - expected).abs().max() <= 1e-4


@needs_transformers
def test_finetune_refuses_to_train_the_weights_of_a_packed_checkpoint_before_importing(tmp_path, capsys, _eager):
    from test_formats_hf import bitnet_packed_folder

    src = tmp_path / "src"
    bitnet_packed_folder(src, "autobitlinear")
    runs = tmp_path / "runs"
    for mode in (["--mode", "qat"], []):
        assert finetune([str(src), "--data", TEXT, "--runs-dir", str(runs), "--num-train-iters", "1",
                         "--no-plot", *mode]) == 1
        err = capsys.readouterr().err
        assert "packed BitNet checkpoint" in err and "no master weights" in err and "-bf16" in err
        assert not os.path.exists(runs / "src" / "store")


def test_meta_export_of_a_llama_packed_only_store_reimports_to_the_same_ternary_model(tmp_path):
    from offload_bitnet.formats import meta
    from offload_bitnet.store.blockstore import StoreSettings

    packed = create_model(str(tmp_path / "packed"), size="demo", arch="llama", mode="qat", n_layers=2,
                          shadow_dtype="fp32", packed_only=True)
    meta.export_from_store(BlockStore(packed), str(tmp_path / "meta"), progress=False)
    # The export holds the latent weights of the codes: a qat import quantizes them back to the same codes, and
    # to the same scales up to fp32 rounding (which can flip an activation's 8-bit rounding, so no logit check).
    again = meta.import_to_store(str(tmp_path / "meta"), str(tmp_path / "again"),
                                 StoreSettings(mode="qat", shadow_dtype="fp32"), progress=False)
    original, reimported = _weights(packed), _weights(again)
    assert original.keys() == reimported.keys()
    for unit, tensors in original.items():
        assert tensors.keys() == reimported[unit].keys(), unit
        for name, tensor in tensors.items():
            if name.endswith(".scale"):
                assert torch.allclose(reimported[unit][name], tensor, rtol=1e-6, atol=0), (unit, name)
            else:
                assert torch.equal(reimported[unit][name], tensor), (unit, name)
