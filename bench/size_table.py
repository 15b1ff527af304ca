"""What each model size takes, predicted by the plan: the README's size table (issue 11, section 5).

    python bench/size_table.py                 # this machine (its calibration) and a 96 GB Apple M2 Max
    python bench/size_table.py --markdown      # the same as a Markdown table (README)

For 7B, 13B, 34B, 70B and 100B (the shapes of ``model/config.py``), and for each way to train them (qat with
fp32, bf16 or int8 moments; LoRA rank 8 on every projection of a packed-only base and of a 16-bit base), it
prints the store's bytes on disk, the predicted peak RAM, the bytes read and written per step, and the seconds
per step and tokens/s, from ``train.plan.predict_step``: the same prediction ``--dry-run`` makes.

The workload is fixed: one optimizer step of 4 micro-batches of 1 x 256 tokens (1,024 tokens), an 8 GiB
activation budget.

- **this machine**: its calibration (``train.calibration.calibrate``: measured in ``--dir`` and cached, as a
  dry run measures it; a busy machine measures slow, so run it quiet).
- **M2 Max (96 GB)**: a calibration from published figures, not measured: GPU 13.6 TFLOP/s fp32 (38-core),
  of which the plan assumes half for bf16 matmuls at these shapes; internal SSD 5 GB/s read and write
  (reviews of the 1-2 TB models); per-parameter work (unpack, quantize, update) at this machine's measured
  cost divided by ``--m2-cpu-speedup`` (default 2: an M2 P-core against this CPU's core, single thread).
  Treat those rows as predictions to check, not as results.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload_bitnet.model.config import config_for_size  # noqa: E402
from offload_bitnet.model.lora import ALL_TARGETS, LoRAConfig  # noqa: E402
from offload_bitnet.store.blockstore import StoreSettings  # noqa: E402
from offload_bitnet.store.sizing import human, store_bytes  # noqa: E402
from offload_bitnet.train.calibration import Calibration, ComputeSpeed, DiskSpeed, calibrate, probe_shape  # noqa: E402
from offload_bitnet.train.plan import predict_step  # noqa: E402

SIZES = ("7B", "13B", "34B", "70B", "100B")
# name -> (arch, store settings, LoRA or None)
KINDS = {
    "qat, fp32 moments": ("bitnet", StoreSettings("qat", "fp16", "fp32"), None),
    "qat, bf16 moments": ("bitnet", StoreSettings("qat", "fp16", "bf16"), None),
    "qat, int8 moments": ("bitnet", StoreSettings("qat", "fp16", "int8"), None),
    "lora r8, packed base": ("bitnet", StoreSettings("qat", "fp16", "fp32", packed_only=True),
                             LoRAConfig(rank=8, alpha=16, targets=ALL_TARGETS)),
    "lora r8, 16-bit base": ("llama", StoreSettings("full", "bf16", "fp32"), LoRAConfig(rank=8, alpha=16, targets=ALL_TARGETS)),
}
MICRO, GRAD_ACCUM, SEQ = 1, 4, 256
BUDGET = 8 << 30
M2_MATMUL_FLOPS = 13.6e12 * 0.5
M2_DISK_BPS = 5e9


def m2_max(measured: ComputeSpeed, cpu_speedup: float) -> Calibration:
    """A 96 GB M2 Max from published figures (see the module docstring); per-parameter costs scaled from
    this machine's measured ones."""
    compute = dataclasses.replace(measured, matmul_flops=M2_MATMUL_FLOPS, device="mps", threads=1,
                                  unpack_ns=measured.unpack_ns / cpu_speedup,
                                  masters_ns=measured.masters_ns / cpu_speedup,
                                  quantize_ns=measured.quantize_ns / cpu_speedup,
                                  update_ns=measured.update_ns / cpu_speedup, busy=0.0,
                                  measured="published figures (not measured)")
    disk = DiskSpeed(read_bps=M2_DISK_BPS, write_bps=M2_DISK_BPS, folder="(internal SSD)", measured="published",
                     fsync_s=0.005)
    return Calibration(disk, compute, cached=("disk", "compute"), path="(none)")


def rows(folder: str, cpu_speedup: float, threads: int, recalibrate: bool = False):
    """One row per (size, kind, machine): predicted disk, peak RAM, bytes per step, seconds and tokens/s."""
    for size in SIZES:
        for kind, (arch, settings, lora) in KINDS.items():
            config = config_for_size(size, arch)
            shape = probe_shape(MICRO * SEQ, config.dim, config.hidden_dim)
            here = calibrate(folder, "cpu", shape, settings, recalibrate=recalibrate)
            sizes = store_bytes(config, settings.mode, settings.shadow_dtype, settings.state_dtype,
                                packed_only=settings.packed_only)
            # A LoRA base never gets moments (its adapters live in the run folder: a few MB)
            disk = sizes["total"] - (sizes["optim"] if lora is not None else 0)
            for machine, calibration, machine_threads in (("this machine (2 cores)", here, threads),
                                                          ("M2 Max 96 GB (published figures)",
                                                           m2_max(here.compute, cpu_speedup), 1)):
                prediction = predict_step(config, settings, calibration, micro_batch_size=MICRO,
                                          grad_accum=GRAD_ACCUM, seq_len=SEQ, memory_budget_bytes=BUDGET, lora=lora,
                                          threads=machine_threads)
                yield dict(size=size, kind=kind, machine=machine, disk=disk, peak=prediction.peak_rss_bytes,
                           read=prediction.read_bytes, written=prediction.written_bytes,
                           seconds=prediction.step_seconds, tokens_s=prediction.tokens / prediction.step_seconds,
                           bound=prediction.bound)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".", help="where this machine's disk is calibrated (the stores' folder)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--m2-cpu-speedup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="the engine's threads on this machine")
    parser.add_argument("--recalibrate", action="store_true", help="measure this machine again (not the cache)")
    args = parser.parse_args(argv)
    print(f"workload: 1 step of {GRAD_ACCUM} x {MICRO} x {SEQ} tokens, activation budget {human(BUDGET)}; "
          "predicted by train.plan.predict_step")
    if args.markdown:
        print("| size | training | machine | disk | peak RAM | read / written per step | s per step | tokens/s |")
        print("|---|---|---|---|---|---|---|---|")
    for row in rows(args.dir, args.m2_cpu_speedup, args.threads, args.recalibrate):
        if args.markdown:
            print(f"| {row['size']} | {row['kind']} | {row['machine']} | {human(row['disk'])} | {human(row['peak'])} | "
                  f"{human(row['read'])} / {human(row['written'])} | {row['seconds']:,.0f} | {row['tokens_s']:.1f} |")
        else:
            print(f"{row['size']:>5} {row['kind']:<22} {row['machine']:<34} disk {human(row['disk']):>10} "
                  f"peak {human(row['peak']):>10} read {human(row['read']):>10} written {human(row['written']):>10} "
                  f"{row['seconds']:>8,.0f} s/step {row['tokens_s']:>7.1f} tok/s ({row['bound']}-bound)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
