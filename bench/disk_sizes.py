"""Disk size of blank BitNet stores by model size, measured on real stores and extended by the exact formula.

Real stores (``create_model`` + one optimizer step, so the AdamW moment files exist) are made for ``demo``,
``tiny`` and ``350M`` (the latter with 2 of its 24 blocks: every block's files are identical in size, so the
measured block files times 24 plus the measured non-block files give the full model). Their bytes on disk
(``os.stat``) are compared with ``offload_bitnet.store.sizing.store_bytes``; a mismatch fails the run. Larger sizes
use the formula. A second table gives the bytes one optimizer step reads and writes (``sizing.plan``).

Settings: ``arch=bitnet``, ``qat`` (packed ternary projections + fp16 shadow), AdamW moments fp32.

Usage: ``python bench/disk_sizes.py [--quick] [--workdir DIR] [--keep]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

import _common as c
from offload_bitnet.store import sizing
from offload_bitnet.api import open_for_training
from offload_bitnet.model.config import config_for_size
from offload_bitnet.store.write import create_model
from offload_bitnet.store.sizing import folder_bytes
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.units import PARTS

SIZES = ["350M", "1B", "3B", "7B", "13B", "34B", "70B", "100B", "300B"]
ARCH, MODE, SHADOW, STATE = "bitnet", "qat", "fp16", "fp32"


def measure(path: str) -> dict:
    """Bytes on disk (os.stat) of a store: per part kind, per unit, and the manifest."""
    store = BlockStore(path)
    by_part = {part: 0 for part in PARTS}
    by_unit: dict[str, int] = {}
    for unit, parts in store.manifest["files"].items():
        for part, entry in parts.items():
            size = os.stat(os.path.join(path, "units", entry["file"])).st_size
            by_part[part] += size
            by_unit[unit] = by_unit.get(unit, 0) + size
    on_disk = folder_bytes(os.path.join(path, "units"))
    return {"parts": by_part, "units": by_unit, "units_dir": on_disk,
            "manifest": os.stat(os.path.join(path, "manifest.json")).st_size}


def make_trained_store(path: str, size: str, **overrides) -> None:
    """A blank store after one optimizer step (so it has every part a training run keeps on disk)."""
    create_model(path, size, arch=ARCH, mode=MODE, shadow_dtype=SHADOW, state_dtype=STATE, seed=0, **overrides)
    config = config_for_size(size, ARCH, **overrides)
    engine = open_for_training(path)
    try:
        ids = torch.randint(0, min(config.vocab_size, 256), (1, 8), generator=torch.Generator().manual_seed(0))
        engine.train_step([(ids, None)], lr=1e-4)
        engine.flush()
    finally:
        engine.close()


def verify(label: str, path: str, size: str, overrides: dict) -> dict:
    """Measure a real store and fail the run unless it matches the formula byte for byte."""
    config = config_for_size(size, ARCH, **overrides)
    formula = sizing.store_bytes(config, MODE, SHADOW, STATE, extra=BlockStore(path).extra)
    measured = measure(path)
    for part in PARTS:
        if measured["parts"][part] != formula[part]:
            c.fail(f"{label} {part} bytes", f"measured {measured['parts'][part]}, formula {formula[part]}")
    if measured["units_dir"] != formula["units"]:
        c.fail(f"{label} units folder", f"measured {measured['units_dir']}, formula {formula['units']}")
    c.check(f"{label} manifest bytes vs bound", measured["manifest"], formula["manifest"])
    print(f"{label}: weights {measured['parts']['weights']:,} shadow {measured['parts']['shadow']:,} "
          f"optim {measured['parts']['optim']:,} bytes measured = formula "
          f"{'(exact)' if measured['units_dir'] == formula['units'] else '(MISMATCH)'}; manifest "
          f"{measured['manifest']:,} <= bound {formula['manifest']:,}")
    return measured


def row(name: str, params: int, packed: int, shadow: int, optim: int, weights: int, total: int, source: str) -> str:
    h = sizing.human
    return (f"| {name} | {params / 1e6:,.0f}M | {h(packed)} | {h(shadow)} | {h(optim)} | {h(weights)} | "
            f"{h(total)} | {source} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="real stores for demo and tiny only")
    parser.add_argument("--workdir", default=None, help="where the scratch stores go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch stores")
    args = parser.parse_args()
    c.pin_threads()
    c.banner("disk size of blank stores (bitnet, qat, fp16 shadow, fp32 AdamW moments)", args.quick)

    rows = []
    with c.scratch_dir(args.workdir, args.keep) as scratch:
        print(f"scratch folder {scratch} ({c.filesystem_of(scratch)})")
        real = [("demo", "demo", {}), ("tiny", "tiny", {})]
        if not args.quick:
            real.append(("350M", "350M", {"n_layers": 2}))
        for label, size, overrides in real:
            path = os.path.join(scratch, label)
            make_trained_store(path, size, **overrides)
            measured = verify(f"{label}{' (2 blocks)' if overrides else ''}", path, size, overrides)
            config = config_for_size(size, ARCH)
            formula = sizing.store_bytes(config, MODE, SHADOW, STATE)
            if overrides:
                # Extend to every block: all blocks' files have the same size (same names, shapes, dtypes).
                extend = config.n_layers - overrides["n_layers"]
                block = BlockStore(path).manifest["files"]["block.000"]
                block_parts = {p: os.stat(os.path.join(path, "units", e["file"])).st_size for p, e in block.items()}
                parts = {p: measured["parts"][p] + extend * block_parts.get(p, 0) for p in PARTS}
                source = f"measured ({overrides['n_layers']} blocks, x{config.n_layers} per block)"
                manifest = formula["manifest"]
            else:
                parts, source, manifest = measured["parts"], "measured", measured["manifest"]
            if sum(parts.values()) != formula["units"]:
                c.fail(f"{label} extended total", f"measured {sum(parts.values())}, formula {formula['units']}")
            rows.append(row(label, config.param_count(), formula["packed"], parts["shadow"], parts["optim"],
                            parts["weights"], sum(parts.values()) + manifest, source))
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)  # free the disk before the next, larger store

    for size in SIZES:
        if any(r.startswith(f"| {size} |") for r in rows):
            continue
        config = config_for_size(size, ARCH)
        f = sizing.store_bytes(config, MODE, SHADOW, STATE)
        rows.append(row(size, config.param_count(), f["packed"], f["shadow"], f["optim"], f["weights"], f["total"],
                        "formula"))

    print()
    print("| Size | Params | Packed ternary | Shadow (fp16) | AdamW moments (fp32) | Forward reads (weights part) "
          "| Total on disk | Source |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for line in rows:
        print(line)
    print()
    print("Packed ternary: 2-bit codes + one fp32 scale per projection (inside the weights part). The weights part"
          " also holds the fp16 embedding/head and fp32 norms. Totals include safetensors headers and the "
          "manifest; a fresh store has no AdamW files until its first step.")

    print()
    print("Bytes per optimizer step (any number of micro-batches; moments present):")
    print("| Size | qat forward read | qat backward read | qat written | full forward read | full backward read "
          "| full written |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    h = sizing.human
    for size in ["demo", "tiny"] + SIZES:
        plans = sizing.plan(config_for_size(size, ARCH), SHADOW, STATE)
        q, f = plans["qat"], plans["full"]
        print(f"| {size} | {h(q['forward_read'])} | {h(q['backward_read'])} | {h(q['written'])} | "
              f"{h(f['forward_read'])} | {h(f['backward_read'])} | {h(f['written'])} |")
    return c.finish()


if __name__ == "__main__":
    sys.exit(main())
