"""The disk-size formulas against real stores and the engine's own byte counters."""
import os

import pytest
import torch

from offload_bitnet.store import sizing
from offload_bitnet.api import open_for_training, open_model
from offload_bitnet.model.config import config_for_size
from offload_bitnet.store.write import create_model
from offload_bitnet.io.safetensors import encode_safetensors
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.units import PARTS

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "u8": torch.uint8}


def test_safetensors_bytes_is_exact():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        specs = {}
        for i in range(int(torch.randint(1, 7, (1,), generator=g))):
            dtype = list(TORCH)[int(torch.randint(0, 4, (1,), generator=g))]
            shape = tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                        generator=g))
            specs[f"t{trial}_{i}.{'x' * i}"] = (dtype, shape)
        header, buffers = encode_safetensors({n: torch.zeros(shape, dtype=TORCH[d]) for n, (d, shape) in specs.items()})
        assert sizing.safetensors_bytes(specs) == len(header) + sum(len(b) for b in buffers), specs


def unit_files(store):
    return {(unit, part): entry for unit, parts in store.manifest["files"].items() for part, entry in parts.items()}


def disk_bytes(path):
    return sum(os.stat(os.path.join(root, name)).st_size for root, _, names in os.walk(path) for name in names)


CASES = [("demo", "bitnet", "qat", "fp16", "fp32", {}),
         ("demo", "llama", "full", "bf16", "fp16", {}),
         ("demo", "bitnet", "qat", "bf16", "bf16", {"tie_embeddings": True}),
         ("tiny", "bitnet", "qat", "fp16", "fp32", {"n_layers": 2})]


@pytest.mark.parametrize("size,arch,mode,shadow,state,overrides", CASES)
def test_formula_equals_a_real_store(tmp_path, size, arch, mode, shadow, state, overrides):
    path = str(tmp_path / "store")
    create_model(path, size, arch=arch, mode=mode, shadow_dtype=shadow, state_dtype=state, **overrides)
    config = config_for_size(size, arch, **overrides)
    settings = BlockStore(path).settings
    predicted = sizing.store_bytes(config, mode, shadow, state, extra=BlockStore(path).extra)
    io_first = sizing.step_io(config, mode, shadow, state, first_step=True)
    io_next = sizing.step_io(config, mode, shadow, state)

    # Fresh store: every part file has exactly the predicted size, and there are no optimizer files.
    store = BlockStore(path)
    files = unit_files(store)
    for (unit, part), entry in files.items():
        assert entry["bytes"] == sizing.part_bytes(config, unit, part, settings), (unit, part)
        assert os.stat(os.path.join(path, "units", entry["file"])).st_size == entry["bytes"]
    assert {(u, p) for u, p in files} == {(u, p) for u in store.units for p in PARTS
                                           if p != "optim" and sizing.part_bytes(config, u, p, settings)}
    assert store.disk_bytes() == {"weights": predicted["weights"], "shadow": predicted["shadow"], "optim": 0}

    # Evaluation reads exactly the weights parts it needs.
    engine = open_model(path)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    engine.logits(ids)
    assert engine.store.bytes_read == io_first["eval_read"]
    engine.close()

    # Two optimizer steps: the first reads no moments, the second reads them; both write every part.
    engine = open_for_training(path)
    for expected in (io_first, io_next):
        read0, written0 = engine.store.bytes_read, engine.store.bytes_written
        engine.train_step([(ids, None)], lr=1e-3)
        engine.flush()
        assert engine.store.bytes_read - read0 == expected["read"]
        assert engine.store.bytes_written - written0 == expected["written"]
    engine.close()

    # Trained store: optimizer files exist and every byte on disk is accounted for.
    store = BlockStore(path)
    assert store.disk_bytes() == {p: predicted[p] for p in PARTS}
    measured_units = disk_bytes(os.path.join(path, "units"))
    assert measured_units == predicted["units"]
    manifest = os.stat(os.path.join(path, "manifest.json")).st_size
    # The bound counts each checksum at 10 digits and the step at 8; real ones are at most that wide.
    slack = 9 * len(unit_files(store)) + 8
    assert predicted["manifest"] - slack <= manifest <= predicted["manifest"]
    lock = os.path.join(path, "lock")
    lock_bytes = os.stat(lock).st_size if os.path.exists(lock) else 0
    assert predicted["total"] - slack <= disk_bytes(path) - lock_bytes <= predicted["total"]


def test_packed_and_totals_add_up():
    config = config_for_size("7B", "bitnet")
    sizes = sizing.store_bytes(config, "qat", "fp16", "fp32")
    projections = config.n_layers * sum(o * i for o, i in config.projection_shapes.values())
    assert sizes["packed"] == projections // 4 + config.n_layers * 7 * 4  # 2 bits a weight + one fp32 scale each
    assert sizes["shadow"] - sizes["headers"] < projections * 2 <= sizes["shadow"]
    assert sizes["optim"] >= sizes["params"] * 8
    assert sizes["units"] == sizes["weights"] + sizes["shadow"] + sizes["optim"]
    full = sizing.store_bytes(config_for_size("7B", "llama"), "full", "bf16", "fp32")
    assert full["packed"] == 0 and full["shadow"] == 0
    assert full["weights"] >= full["params"] * 2


def test_plan_covers_both_modes():
    config = config_for_size("demo", "bitnet")
    plans = sizing.plan(config)
    assert set(plans) == {"qat", "full"}
    assert plans["qat"]["forward_read"] < plans["full"]["forward_read"]  # packed codes are 8x smaller than fp16
    assert plans["qat"]["written"] == sizing.store_bytes(config, "qat")["units"]
