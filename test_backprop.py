"""One optimizer step streamed vs. in memory: prints max_rel_err and exits non-zero above the tolerance.

    python test_backprop.py --mode qat --dropout 0.1
    python test_backprop.py --mode full
    python test_backprop.py --device mlx --mode qat --dropout 0.1   # the step in Apple MLX (pip install -e ".[mlx]")

With --device mlx it runs two checks: the streamed MLX step's gradients against torch autograd with dropout off
(the two RNGs differ), and with --dropout against the in-memory MLX ``mx.grad`` reference (the same keys). The
weights after the step are printed beside them: AdamW's first step is about lr * g / (|g| + eps), so gradient
elements within rounding noise of zero move their weights apart by up to lr (see README, "MLX backend").
"""
import argparse
import sys

from offload_bitnet.argparsing import ArgumentParser
from offload_bitnet.reference.parity import run_mlx_parity, run_parity


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["qat", "full"], default="qat")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--micro-batches", type=int, default=2, help="gradient accumulation G")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--device", choices=["cpu", "mlx"], default="cpu",
                        help="the streamed step's compute backend (mlx: Apple MLX)")
    args = parser.parse_args(argv)
    if args.device == "mlx":
        return check_mlx(args)
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


def check_mlx(args) -> int:
    """The MLX step's two checks; exits non-zero when a gradient is above the tolerance."""
    try:
        result = run_mlx_parity(args.mode, args.dropout, args.micro_batches, args.seed)
    except ImportError:
        print('--device mlx needs Apple MLX: pip install -e ".[mlx]"', file=sys.stderr)
        return 2
    print(f"mode={args.mode} device=mlx micro_batches={args.micro_batches} tensors={result.tensors_compared}")
    print(f"[mlx vs torch autograd, dropout 0] loss streamed={result.streamed_loss:.8f} "
          f"torch={result.torch_loss:.8f}")
    print(f"  gradient max_rel_err={result.grad_err:.3e} (worst: {result.grad_worst})")
    print(f"  weights after AdamW max_rel_err={result.weights_vs_torch:.3e} (worst: {result.weights_vs_torch_worst})")
    print(f"[mlx streamed vs mlx mx.grad reference, dropout {args.dropout}] loss streamed="
          f"{result.dropout_streamed_loss:.8f} reference={result.mlx_loss:.8f}")
    print(f"  gradient max_rel_err={result.grad_vs_mlx:.3e} (worst: {result.grad_vs_mlx_worst})")
    print(f"  weights after AdamW max_rel_err={result.weights_vs_mlx:.3e} (worst: {result.weights_vs_mlx_worst})")
    failed = [name for name, err in (("gradients vs torch", result.grad_err),
                                     ("gradients vs the MLX reference", result.grad_vs_mlx)) if err > args.tolerance]
    if failed:
        print(f"FAIL: max_rel_err above {args.tolerance:g} for " + ", ".join(failed))
        return 1
    print("PASS (gradients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
