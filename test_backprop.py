"""One optimizer step streamed vs. in memory: prints max_rel_err and exits non-zero above the tolerance.

    python test_backprop.py --mode qat --dropout 0.1
    python test_backprop.py --mode full
"""
import argparse
import sys

from offload_bitnet.argparsing import ArgumentParser
from offload_bitnet.reference.parity import run_parity


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["qat", "full"], default="qat")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--micro-batches", type=int, default=2, help="gradient accumulation G")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    result = run_parity(args.mode, args.dropout, args.micro_batches, args.seed)
    print(f"mode={args.mode} dropout={args.dropout} micro_batches={args.micro_batches} "
          f"tensors={result.tensors_compared}")
    print(f"loss streamed={result.streamed_loss:.8f} in_memory={result.in_memory_loss:.8f}")
    print(f"max_rel_err={result.max_rel_err:.3e} (worst: {result.worst_tensor})")
    if result.max_rel_err > args.tolerance:
        print(f"FAIL: max_rel_err above {args.tolerance:g}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
