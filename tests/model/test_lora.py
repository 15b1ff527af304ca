import os

import pytest
import torch

from offload_bitnet import AdamWConfig, BlockStore, EngineOptions, StreamingEngine, create_model
from offload_bitnet.reference.inmemory import InMemoryModel
from offload_bitnet.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSet, LoRAAdapter, LoRAConfig
from offload_bitnet.model.block import block_forward, dropout_generator, rms_norm, rope_tables
from offload_bitnet.reference.parity import relative_error
from offload_bitnet.store.units import block_unit
from offload_bitnet.model.ternary import ste_quantize_weight


def _batches(n, vocab=256, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (2, 16), generator=generator), None) for _ in range(n)]


def _engine(path, adapter_dir, lora, lr=1e-2):
    return StreamingEngine(BlockStore(path), EngineOptions(lora=lora, adapter_dir=adapter_dir, seed=0,
                                                           optim=AdamWConfig(lr=lr)))


def _files(path):
    return {name: open(os.path.join(path, "units", name), "rb").read() for name in os.listdir(os.path.join(path, "units"))}


@pytest.mark.parametrize("arch", ["bitnet", "llama"])
def test_lora_starts_at_base_trains_and_leaves_base_untouched(tmp_path, arch):
    path = create_model(str(tmp_path / "base"), size="demo", arch=arch, n_layers=2)
    before = _files(path)
    batches = _batches(1)
    base_loss = StreamingEngine(BlockStore(path)).loss(batches[0][0])
    engine = _engine(path, str(tmp_path / "adapter"), LoRAConfig(rank=4, alpha=8))
    assert engine.loss(batches[0][0]) == pytest.approx(base_loss, rel=1e-6)  # B = 0 at init
    losses = [engine.train_step(batches).loss for _ in range(6)]
    assert losses[-1] < losses[0] - 0.2
    assert _files(path) == before
    assert os.path.exists(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert os.path.exists(tmp_path / "adapter" / ADAPTER_CONFIG)


def test_lora_step_equals_in_memory_autograd(tmp_path):
    path = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2, shadow_dtype="fp32")
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    optim = AdamWConfig(lr=1e-3, weight_decay=0.1)
    batches = _batches(2)
    store = BlockStore(path)
    reference = InMemoryModel.from_store(store)
    adapters = AdapterSet(store.config, lora)
    leaves = {key: {m: torch.nn.Parameter(t.clone()) for m, t in mats.items()} for key, mats in adapters.weights.items()}
    opt = torch.optim.AdamW([p for mats in leaves.values() for p in mats.values()], lr=optim.lr,
                            weight_decay=optim.weight_decay, foreach=False)
    cfg = store.config
    cos, sin = rope_tables(cfg, torch.arange(16))
    total, count = 0.0, 0
    for micro, (ids, _) in enumerate(batches):
        x = torch.nn.functional.embedding(ids, reference.unit("embed")["weight"].detach())
        for layer in range(cfg.n_layers):
            params = {n: ste_quantize_weight(p.detach()) if n.endswith("_proj") else p.detach()
                      for n, p in reference.unit(block_unit(layer)).items()}
            for name in lora.targets:
                mats = leaves[(layer, name)]
                params[f"{name}.lora"] = LoRAAdapter(mats["lora_A"], mats["lora_B"], lora.scaling, lora.dropout)
            x = block_forward(params, x, cfg, cos, sin, quantize=True, generator=dropout_generator(0, 1, micro, layer, "cpu"))
        logits = rms_norm(x, reference.unit("norm")["weight"].detach(), cfg.norm_eps) @ reference.head_weight().detach().T
        total = total + torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size),
                                                          ids[:, 1:].reshape(-1), reduction="sum")
        count += ids[:, 1:].numel()
    (total / count).backward()
    opt.step()  # B starts at zero, so only B gets a gradient step; A moves by weight decay alone

    engine = StreamingEngine(store, EngineOptions(lora=lora, adapter_dir=str(tmp_path / "a"), seed=0, optim=optim))
    stats = engine.train_step(batches)
    assert stats.loss == pytest.approx((total / count).item(), rel=1e-6)
    for key, mats in leaves.items():
        for matrix, param in mats.items():
            assert relative_error(engine.adapters.weights[key][matrix], param.detach()) < 1e-5, (key, matrix)


def test_lora_resume_equals_uninterrupted(tmp_path):
    path = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2)
    lora = LoRAConfig(rank=2, alpha=4, dropout=0.1)
    batches = [_batches(1, seed=s) for s in range(4)]
    straight = _engine(path, str(tmp_path / "straight"), lora)
    for batch in batches:
        straight.train_step(batch)
    first = _engine(path, str(tmp_path / "resumed"), lora)
    for batch in batches[:2]:
        first.train_step(batch)
    resumed = _engine(path, str(tmp_path / "resumed"), lora)
    assert resumed.step == 2
    for batch in batches[2:]:
        resumed.train_step(batch)
    for key, mats in straight.adapters.weights.items():
        for matrix, tensor in mats.items():
            assert torch.equal(tensor, resumed.adapters.weights[key][matrix])


def test_lora_config_is_validated():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRAConfig(rank=0)


@pytest.mark.parametrize("micro", [1, 2])
def test_lora_on_projections_made_one_at_a_time_changes_nothing(tmp_path, micro):
    """A base whose blocks are above ``dense_block_bytes`` is unpacked one projection at a time in forward and
    in the LoRA backward (``model.LazyWeight``): the adapters must come out bit-identical."""
    path = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2)
    adapters = {}
    for name, dense_bytes in (("dense", 1 << 40), ("lazy", 0)):
        engine = StreamingEngine(BlockStore(path), EngineOptions(
            lora=LoRAConfig(rank=4, alpha=8, dropout=0.1), adapter_dir=str(tmp_path / name), seed=0,
            optim=AdamWConfig(lr=1e-2), dense_block_bytes=dense_bytes))
        losses = [engine.train_step(_batches(micro, seed=step)).loss for step in range(3)]
        engine.close()
        adapters[name] = losses, AdapterSet.load(str(tmp_path / name), engine.config).weights
    assert adapters["dense"][0] == adapters["lazy"][0]
    for key, mats in adapters["dense"][1].items():
        for matrix, tensor in mats.items():
            assert torch.equal(tensor, adapters["lazy"][1][key][matrix]), (key, matrix)


def test_lora_base_kept_resident_is_read_once_per_run(tmp_path):
    """With ``resident_bytes`` room for the base's forward parts, a LoRA run reads its base once (step 1:
    once per unit, not again in backward; later steps: nothing), with bit-identical adapters."""
    path = create_model(str(tmp_path / "base"), size="demo", arch="bitnet", n_layers=2)
    runs = {}
    for name, budget in (("streamed", 0), ("resident", 1 << 30)):
        engine = StreamingEngine(BlockStore(path), EngineOptions(
            lora=LoRAConfig(rank=4, alpha=8), adapter_dir=str(tmp_path / name), seed=0,
            optim=AdamWConfig(lr=1e-2), resident_bytes=budget))
        stats = [engine.train_step(_batches(2, seed=step)) for step in range(3)]
        engine.close()
        runs[name] = stats, AdapterSet.load(str(tmp_path / name), engine.config).weights
    forward_bytes = sum(entry["bytes"] for parts in BlockStore(path).manifest["files"].values()
                        for part, entry in parts.items() if part == "weights")
    streamed, resident = runs["streamed"][0], runs["resident"][0]
    assert resident[0].bytes_read == forward_bytes and streamed[0].bytes_read > forward_bytes
    assert resident[1].bytes_read == resident[2].bytes_read == 0 and streamed[2].bytes_read > 0
    assert [s.loss for s in streamed] == [s.loss for s in resident]
    for key, mats in runs["streamed"][1].items():
        for matrix, tensor in mats.items():
            assert torch.equal(tensor, runs["resident"][1][key][matrix]), (key, matrix)
