"""The compute backend seam: what differs between torch and MLX in a streamed step, behind one small interface.

The engine's scheduling (step plan, prefetch, writer, commit) and the store's I/O are the same for every
backend: units arrive as torch CPU tensors from the store (``Layout`` unpacks them), hidden states travel between
blocks as torch tensors (so the activation stash, its spill files and the embedding's scatter stay as they are),
and updates leave as torch tensors for the writer. A backend computes what happens in between:

- ``block_forward(params, x, ...)``: one block call (inference, training forward, generation with a KV cache);
- ``block_backward(params, x, grad_out, ...)``: the replay (forward again from the stashed input with the saved
  dropout state) and the vector-Jacobian product: returns dL/dx and sums each trainable leaf's gradient into its
  ``.grad`` (the torch convention; LoRA leaves are the adapters' matrices), which the trainable's update reads;
- ``head_loss(hidden, head, ...)``: the final norm and the head's chunked cross-entropy with their gradients;
- ``dropout_rng`` / ``save_rng`` / ``restore_rng``: one block call's dropout state from (seed, step, micro,
  layer), kept between the forward pass and the replay;
- ``adamw_update(param, grad, exp_avg, exp_avg_sq, ...)``: AdamW on one tensor, in place on the torch tensors;
- ``rms_norm`` and ``linear``: the final norm and head for inference.

``TorchBackend`` is what the engine always did (projection memos, ``LazyWeight`` and autograd leaves stay
inside it). ``MLXBackend`` runs the same math in ``backends.mlx``: its arrays are made from the torch tensors
at the start of each call and evaluated (``mx.eval``) before anything is returned, so every tensor handed back
to the engine (to the stash, the writer, an update, or dropped) is a plain evaluated buffer and no lazy MLX graph
ever spans two blocks: memory stays a few blocks whatever the depth. Those ``mx.eval`` calls are in
``MLXBackend._eval_torch`` (block forward and backward), ``MLXBackend.head_loss`` and ``MLXBackend.adamw_update``.

The quantize/pack of new weights stays at the store's edge (``Layout.encode``, torch): the store's bytes are then
the same whichever backend trained, and ``backends.mlx.ternary.unpack_weight`` reads them bit-identically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload_bitnet.model.adamw import AdamWConfig, adamw_update, decays
from offload_bitnet.model.block import (LazyWeight, ProjectionMemo, block_forward, dropout_generator, rms_norm)
from offload_bitnet.model.loss import chunked_cross_entropy

MLX_INSTALL_HINT = 'pip install -e ".[mlx]"  (on Linux this installs mlx[cpu]; on a Mac, mlx)'


class TorchBackend:
    """The torch compute of the streamed step (autograd leaves, projection memos, lazy weights)."""

    name = "torch"

    def __init__(self, device: str = "cpu"):
        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)  # the --device this backend is (another pass, e.g. samples, opens it)

    def new_memo(self) -> ProjectionMemo | None:
        """A memo for one forward block call's projection outputs (see ``model.ProjectionMemo``)."""
        return ProjectionMemo()

    def dropout_rng(self, seed: int, step: int, micro: int, layer: int):
        return dropout_generator(seed, step, micro, layer, self.torch_device)

    def save_rng(self, rng):
        """What the replay needs to draw the same masks as the forward pass did with ``rng``."""
        return rng.get_state()

    def restore_rng(self, saved):
        generator = torch.Generator(device=self.torch_device)
        generator.set_state(saved)
        return generator

    def block_forward(self, params: dict, x: torch.Tensor, config, cos, sin, *, quantize: float,
                      dropout_p: float = 0.0, rng=None, memo=None, kv_cache=None, attn_mask=None) -> torch.Tensor:
        if kv_cache is not None:
            return block_forward(params, x, config, cos, sin, quantize=quantize, kv_cache=kv_cache,
                                 attn_mask=attn_mask)
        return block_forward(params, x, config, cos, sin, quantize=quantize, dropout_p=dropout_p, generator=rng,
                             memo=memo)

    def block_backward(self, params: dict, x: torch.Tensor, grad_out: torch.Tensor, config, cos, sin, *,
                       quantize: float, dropout_p: float = 0.0, rng=None, memo=None) -> torch.Tensor:
        x = x.requires_grad_()
        with torch.enable_grad():
            out = block_forward(params, x, config, cos, sin, quantize=quantize, dropout_p=dropout_p, generator=rng,
                                memo=memo)
        out.backward(grad_out)
        return x.grad

    def head_loss(self, hidden: torch.Tensor, head, targets: torch.Tensor, eps: float, chunk_tokens: int,
                  scale: float, accumulate: bool, on_weight_rows=None) -> tuple[float, torch.Tensor]:
        """The final norm and the chunked cross-entropy of one micro-batch: returns ``(loss part, dL/dhidden)``;
        the head's gradient goes into ``head.weight_grad`` (``accumulate``: added), the norm's into its leaf."""
        h = hidden.detach().requires_grad_()
        with torch.enable_grad():
            normed = rms_norm(h, head.norm_weight, eps)
        part, grad_normed = chunked_cross_entropy(normed, head.weight, targets, chunk_tokens, scale, backward=True,
                                                  weight_grad=head.weight_grad, accumulate=accumulate,
                                                  on_weight_rows=on_weight_rows)
        normed.backward(grad_normed)
        return part, h.grad

    def adamw_update(self, param, grad, exp_avg, exp_avg_sq, step: int, config: AdamWConfig, lr: float | None):
        adamw_update(param, grad, exp_avg, exp_avg_sq, step, config, lr)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def projection_probe(self, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor):
        """A callable that runs one projection's products of a training step, for the calibration to time: the
        forward, the input gradient, and the weight gradient summed into a gradient buffer (as autograd sums
        it over micro-batches); it returns when the device has finished them. The tensors: on ``torch_device``
        in the engine's compute dtype."""
        weight_grad = torch.zeros_like(weight)

        def run():
            F.linear(x, weight)
            grad_out.mm(weight)
            weight_grad.add_(grad_out.t().mm(x))
            if self.torch_device.type == "cuda":
                torch.cuda.synchronize()

        return run

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


class MLXBackend:
    """The streamed step's compute in Apple MLX (``backends.mlx``), torch CPU tensors in and out."""

    name = "mlx"

    def __init__(self, device: str = "mlx"):
        try:
            import mlx.core as mx
        except ImportError:
            raise RuntimeError(f"--device mlx needs Apple MLX, which is not installed: {MLX_INSTALL_HINT}") from None
        from offload_bitnet.backends.mlx import arrays, model

        self.mx, self.arrays, self.model = mx, arrays, model
        self.torch_device = torch.device("cpu")  # where the store's tensors and the engine's buffers live
        self.device = "mlx"
        self.dtype = arrays.default_compute_dtype()  # fp32 on the CPU backend, bf16 on a Mac's GPU

    def new_memo(self):
        return None  # MLX's vjp replays the block as a whole: no per-projection memo

    def dropout_rng(self, seed: int, step: int, micro: int, layer: int):
        return self.model.dropout_key(seed, step, micro, layer)

    def save_rng(self, rng):
        return rng  # a key is its own state: the replay draws the same masks from it

    def restore_rng(self, saved):
        return saved

    # ------------------------------------------------------------------ arrays in and out
    def _to_mx(self, value):
        array = self.arrays.to_mx(value)
        return array.astype(self.dtype) if self.mx.issubdtype(array.dtype, self.mx.floating) else array

    def _block_arrays(self, params: dict) -> tuple[dict, dict, float, float]:
        """``(arrays, leaves, lora_scaling, lora_dropout)``: the block's tensors as MLX arrays in
        ``backends.mlx.model``'s naming, and the torch leaves among them that get gradients, by that name."""
        arrays, leaves, scaling, dropout_p = {}, {}, 1.0, 0.0
        for name, value in params.items():
            if name.endswith(".lora"):  # a LoRAAdapter (model.lora): its two matrices are the block's LoRA entries
                proj = name[: -len(".lora")]
                scaling, dropout_p = value.scaling, value.dropout_p
                for suffix, matrix in ((self.model.LORA_A, value.lora_a), (self.model.LORA_B, value.lora_b)):
                    arrays[proj + suffix] = self._to_mx(matrix)
                    if matrix.requires_grad:
                        leaves[proj + suffix] = matrix
                continue
            if isinstance(value, LazyWeight):  # made per matmul; its gradient goes to the leaf from the vjp
                arrays[name] = self._lazy_projection(value)
                continue
            arrays[name] = self._to_mx(value)
            if getattr(value, "requires_grad", False):
                leaves[name] = value
        return arrays, leaves, scaling, dropout_p

    def _lazy_projection(self, weight: LazyWeight):
        """A ``LazyWeight`` as ``backends.mlx.model.LazyProjection``: made from the engine's tensor per matmul,
        its gradient summed into ``weight.grad``."""
        def on_grad(grad):
            _accumulate_grad(weight, self._eval_torch(grad))

        return self.model.LazyProjection(lambda: self._to_mx(weight.dense()),
                                         on_grad if weight.requires_grad else None)

    def _eval_torch(self, array) -> torch.Tensor:
        """Evaluate ``array`` and hand it to the engine as an fp32 torch CPU tensor (the point where MLX's lazy
        graph of a block call ends)."""
        self.mx.eval(array)
        # Contiguous: MLX may hand back a transposed layout (a vjp's weight gradient), which torch's fused
        # kernels (AdamW) would read as if it were row-major.
        return self.arrays.to_torch(array.astype(self.mx.float32) if array.dtype != self.mx.float32 else array
                                    ).contiguous()

    def _tables(self, cos, sin):
        return self._to_mx(cos), self._to_mx(sin)

    # ------------------------------------------------------------------ compute
    def block_forward(self, params: dict, x: torch.Tensor, config, cos, sin, *, quantize: float,
                      dropout_p: float = 0.0, rng=None, memo=None, kv_cache=None, attn_mask=None) -> torch.Tensor:
        arrays, _, scaling, lora_dropout = self._block_arrays(params)
        cos, sin = self._tables(cos, sin)
        mask = None if attn_mask is None else self.arrays.to_mx(attn_mask)
        out = self.model.block_forward(arrays, self._to_mx(x), config, cos, sin, quantize=float(quantize),
                                       dropout_p=dropout_p, key=rng, lora_scaling=scaling,
                                       lora_dropout=lora_dropout, kv_cache=kv_cache, attn_mask=mask)
        if kv_cache is not None:
            self.mx.eval(out, *kv_cache.values())
        return self._eval_torch(out)

    def block_backward(self, params: dict, x: torch.Tensor, grad_out: torch.Tensor, config, cos, sin, *,
                       quantize: float, dropout_p: float = 0.0, rng=None, memo=None) -> torch.Tensor:
        arrays, leaves, scaling, lora_dropout = self._block_arrays(params)
        cos, sin = self._tables(cos, sin)
        grad_x, grads = self.model.block_backward(arrays, self._to_mx(x), self._to_mx(grad_out), config, cos, sin,
                                                  trainable=list(leaves), quantize=float(quantize),
                                                  dropout_p=dropout_p, key=rng, lora_scaling=scaling,
                                                  lora_dropout=lora_dropout)
        self.mx.eval(grad_x, grads)
        for name, leaf in leaves.items():
            _accumulate_grad(leaf, self._eval_torch(grads[name]))
        return self._eval_torch(grad_x)

    def head_loss(self, hidden: torch.Tensor, head, targets: torch.Tensor, eps: float, chunk_tokens: int,
                  scale: float, accumulate: bool, on_weight_rows=None) -> tuple[float, torch.Tensor]:
        from offload_bitnet.backends.mlx.loss import chunked_cross_entropy as mlx_cross_entropy

        mx = self.mx
        h, norm_weight = self._to_mx(hidden), self._to_mx(head.norm_weight)

        def norm(h, weight):
            return self.model.rms_norm(h, weight, eps)

        normed = norm(h, norm_weight)
        part, grad_normed, grad_weight = mlx_cross_entropy(normed, self._to_mx(head.weight), self.arrays.to_mx(targets),
                                                           chunk_tokens, scale, backward=True)
        _, (grad_h, grad_norm) = mx.vjp(norm, [h, norm_weight], [grad_normed])
        mx.eval(grad_h, grad_norm, grad_weight)
        if head.norm_weight.requires_grad:
            _accumulate_grad(head.norm_weight, self._eval_torch(grad_norm))
        if head.weight_grad is not None:
            grad_weight = self._eval_torch(grad_weight)
            if accumulate:
                head.weight_grad.add_(grad_weight.to(head.weight_grad.dtype))
            else:
                head.weight_grad.copy_(grad_weight)
            if on_weight_rows is not None:  # every row is final at once here: one range, the whole head
                on_weight_rows(slice(0, head.weight_grad.shape[0]), part)
        return part, self._eval_torch(grad_h)

    def adamw_update(self, param, grad, exp_avg, exp_avg_sq, step: int, config: AdamWConfig, lr: float | None):
        """AdamW (``backends.mlx.optim``) on one fp32 tensor, written back into the torch tensors in place."""
        from offload_bitnet.backends.mlx.optim import adamw_update as mlx_adamw

        to_mx = self.arrays.to_mx
        new = mlx_adamw(to_mx(param), to_mx(grad), to_mx(exp_avg), to_mx(exp_avg_sq), step,
                        config.lr if lr is None else lr, (config.beta1, config.beta2), config.eps,
                        config.weight_decay, decay=decays(param))
        self.mx.eval(*new)
        for target, value in zip((param, exp_avg, exp_avg_sq), new):
            target.copy_(self.arrays.to_torch(value))  # copy_ follows both tensors' strides

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._eval_torch(self.model.rms_norm(self._to_mx(x), self._to_mx(weight), eps))

    def projection_probe(self, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor):
        """``TorchBackend.projection_probe`` in MLX (the arrays made once, each run evaluated)."""
        mx = self.mx
        x, weight, grad_out = self._to_mx(x), self._to_mx(weight), self._to_mx(grad_out)
        state = {"weight_grad": mx.zeros_like(weight)}

        def run():
            outputs = (x @ weight.T, grad_out @ weight, state["weight_grad"] + grad_out.T @ x)
            mx.eval(*outputs)
            state["weight_grad"] = outputs[2]

        return run

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._eval_torch(self._to_mx(x) @ self._to_mx(weight).T)


def _accumulate_grad(leaf, grad: torch.Tensor):
    """Sum ``grad`` into ``leaf.grad``, as autograd does for a leaf over several micro-batches."""
    if leaf.grad is None:
        leaf.grad = grad.clone() if isinstance(leaf, LazyWeight) else grad.to(leaf.dtype).clone()
    else:
        leaf.grad.add_(grad.to(leaf.grad.dtype))


def is_mlx_device(device) -> bool:
    """Whether ``device`` names the MLX backend (``"mlx"``)."""
    return isinstance(device, str) and device == "mlx"


def make_backend(device) -> TorchBackend | MLXBackend:
    """The backend for a ``--device``: ``mlx`` -> MLXBackend (RuntimeError saying how to install MLX when it is
    missing), anything else -> TorchBackend on that torch device."""
    return MLXBackend() if is_mlx_device(device) else TorchBackend(device)
