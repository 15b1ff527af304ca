"""One optimizer step streamed vs. in memory: prints max_rel_err and exits non-zero above the tolerance.

    python test_backprop.py --mode qat --dropout 0.1
    python test_backprop.py --mode full
    python test_backprop.py --device mlx --mode qat --dropout 0.1   # the step in Apple MLX (pip install -e ".[mlx]")

With --device mlx the streamed MLX step is checked against:
  1. torch autograd + torch.optim.AdamW, fp32, dropout off (the two RNGs differ), in two parts:
     - its gradients against torch autograd's. In qat this comparison is ill-conditioned: an activation whose
       x * 127 / absmax lies within the last fp32 bits of a rounding boundary gets codes one apart in the two
       libraries (their matmul and RMSNorm sum in different orders), which moves it by a whole 8-bit step. The
       line below it counts those codes. It is a pass/fail check in full mode, and in qat when no code differs;
       otherwise its figure is reported, and check 2 stands in for it;
     - its AdamW against torch.optim.AdamW(fused=True) run on the same weights and gradients (every update).
     The weights after the step against torch's whole step are printed too, not checked: AdamW's first step is
     about lr * g / (|g| + eps), so an element whose gradient is within the two libraries' rounding noise of
     zero moves its weight apart by up to lr (see README, "MLX backend").
  2. (qat) torch autograd, fp32, dropout off, run with the 8-bit activation codes the MLX step chose (torch's own
     scales and straight-through gradients: only the rounding decisions are MLX's). Each code that differed must
     be one step apart at a rounding boundary (within MARGIN of k + 1/2), else it is a real disagreement.
  3. the in-memory MLX mx.grad reference + its AdamW with --dropout (the same dropout keys): gradients, loss and
     the weights after the step, as the torch check above compares them.
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


# A code that differs between the backends must come from an input within the last bits of a rounding boundary:
# |x * scale - (k + 1/2)| <= MARGIN (fp32 resolves 7.6e-6 at 127; a real disagreement sits anywhere up to 0.5).
MARGIN = 1e-3


def check_mlx(args) -> int:
    """The MLX step's checks (see the module docstring); exits non-zero when one fails."""
    try:
        result = run_mlx_parity(args.mode, args.dropout, args.micro_batches, args.seed)
    except ImportError:
        print('--device mlx needs Apple MLX: pip install -e ".[mlx]"', file=sys.stderr)
        return 2
    tolerance, failed = args.tolerance, []
    print(f"mode={args.mode} device=mlx micro_batches={args.micro_batches} tensors={result.tensors_compared}")
    print(f"[1: mlx streamed vs torch autograd, fp32, dropout 0] loss streamed={result.streamed_loss:.8f} "
          f"torch={result.torch_loss:.8f}")
    print(f"  gradient max_rel_err={result.grad_err:.3e} (worst: {result.grad_worst})")
    print(f"  AdamW vs torch.optim.AdamW on the same gradients and weights: max_rel_err="
          f"{result.adamw_vs_torch:.3e} (worst: {result.adamw_vs_torch_worst})")
    print(f"  (not checked) weights after the step vs torch's whole step: max_rel_err={result.weights_vs_torch:.3e} "
          f"(worst: {result.weights_vs_torch_worst})")
    if result.adamw_vs_torch > tolerance:
        failed.append("1 (AdamW vs torch.optim.AdamW)")
    flips = result.code_flips
    if flips is not None:
        print(f"  8-bit activation codes differing between torch and MLX: {flips.differing} of {flips.elements} "
              f"({flips.calls} quantizer calls)" + (f", at most {flips.largest_step} step apart, each within "
                                                    f"{flips.widest_margin:.1e} of a rounding boundary"
                                                    if flips.differing else ""))
    if flips is None or flips.differing == 0:
        if result.grad_err > tolerance:
            failed.append("1 (gradients vs torch)")
    else:
        print("  (not a pass/fail check with codes differing: one code moves an activation by a whole 8-bit step;"
              " check 2 compares with equal codes)")
        print(f"[2: mlx streamed vs torch autograd with the MLX step's activation codes, fp32, dropout 0] "
              f"loss torch={result.same_codes_loss:.8f}")
        print(f"  gradient max_rel_err={result.grad_vs_same_codes:.3e} (worst: {result.grad_vs_same_codes_worst})")
        if result.grad_vs_same_codes > tolerance:
            failed.append("2 (gradients vs torch with equal codes)")
        if flips.largest_step > 1 or flips.widest_margin > MARGIN:
            failed.append(f"2 (a differing code is not a rounding-boundary tie: margin {flips.widest_margin:.1e} "
                          f"> {MARGIN:g} or {flips.largest_step} steps)")
    print(f"[3: mlx streamed vs mlx mx.grad reference, dropout {args.dropout}] loss streamed="
          f"{result.dropout_streamed_loss:.8f} reference={result.mlx_loss:.8f}")
    print(f"  gradient max_rel_err={result.grad_vs_mlx:.3e} (worst: {result.grad_vs_mlx_worst})")
    print(f"  weights after AdamW max_rel_err={result.weights_vs_mlx:.3e} (worst: {result.weights_vs_mlx_worst}), "
          f"loss rel_err={result.loss_vs_mlx:.3e}")
    for name, error in (("gradients", result.grad_vs_mlx), ("weights", result.weights_vs_mlx),
                        ("loss", result.loss_vs_mlx)):
        if error > tolerance:
            failed.append(f"3 ({name} vs the MLX reference)")
    if failed:
        print(f"FAIL: max_rel_err above {tolerance:g} in check " + "; ".join(failed))
        return 1
    print(f"PASS (within {tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
