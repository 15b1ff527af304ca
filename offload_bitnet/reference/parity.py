"""One optimizer step through the streaming engine vs. the same step in memory (autograd + torch AdamW).

Used by ``test_backprop.py`` and the tests: it is the end-to-end check that streaming, RNG replay,
layer-major accumulation, chunked cross-entropy and the per-block AdamW reproduce plain training.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from offload_bitnet.store.write import create_model
from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
from offload_bitnet.reference.inmemory import InMemoryModel
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.store.layout import Layout
from offload_bitnet.store.units import is_block


@dataclass
class ParityResult:
    streamed_loss: float
    in_memory_loss: float
    max_rel_err: float
    worst_tensor: str
    tensors_compared: int


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (0 when both are zero)."""
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_parity(mode: str = "qat", dropout: float = 0.1, micro_batches: int = 2, seed: int = 0,
               workdir: str | None = None, **overrides) -> ParityResult:
    """Build a small GQA model, take one step both ways from the same weights and data, compare."""
    shape = dict(size="demo", n_layers=4, n_heads=4, n_kv_heads=2, dim=64, hidden_dim=192, tie_embeddings=False)
    shape.update(overrides)
    arch = "bitnet" if mode == "qat" else "llama"
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        path = create_model(f"{root}/store", arch=arch, mode=mode, shadow_dtype="fp32", seed=seed, **shape)
        optim = AdamWConfig(lr=1e-3, weight_decay=0.1)
        generator = torch.Generator().manual_seed(seed + 1)
        store = BlockStore(path, writable=True)
        vocab = store.config.vocab_size
        batches = []
        for _ in range(micro_batches):
            ids = torch.randint(0, vocab, (2, 24), generator=generator)
            labels = ids.clone()
            labels[:, :3] = -100  # a masked prompt, as in instruction data
            batches.append((ids, labels))

        reference = InMemoryModel.from_store(store)
        optimizer = reference.optimizer(optim)
        loss = reference.step_loss(batches, dropout=dropout, seed=seed, step=1)
        loss.backward()
        optimizer.step()

        engine = StreamingEngine(store, EngineOptions(dropout=dropout, seed=seed, optim=optim,
                                                      activation_budget_bytes=8 << 10))
        stats = engine.train_step(batches)
        engine.close()

        updated = InMemoryModel.from_store(BlockStore(path)).named_unit_tensors()
        expected = reference.named_unit_tensors()
        worst, worst_name, count = abs(stats.loss - loss.item()) / abs(loss.item()), "loss", 0
        for unit, tensors in expected.items():
            for name, tensor in tensors.items():
                err = relative_error(updated[unit][name], tensor.detach())
                count += 1
                if err > worst:
                    worst, worst_name = err, f"{unit}.{name}"
        return ParityResult(stats.loss, loss.item(), worst, worst_name, count)


@dataclass
class MLXParityResult:
    """A streamed MLX step against its references.

    - ``grad_err``: its gradients (recovered from the first step's moments, ``exp_avg = (1 - beta1) g``) against
      torch autograd, dropout off (the two RNGs differ). In qat this comparison is ill-conditioned in fp32: see
      ``reference.activation_codes``;
    - ``weights_vs_torch``: the weights after the step against torch autograd + torch.optim.AdamW. Reported, not a
      parity check: AdamW's first step is about lr * g / (|g| + eps), so an element whose gradient lies within
      the two libraries' rounding noise of zero (|g| ~ eps) moves apart by up to lr;
    - ``adamw_vs_torch``: the weights the MLX step's AdamW made against ``torch.optim.AdamW(fused=True)`` applied
      to the same gradients and weights (every update the step made, one tensor at a time);
    - ``grad_vs_same_codes`` (qat only, else None): the gradients against torch autograd run with the 8-bit
      activation codes the MLX step chose (``code_flips``: where torch's own roundings differed);
    - ``grad_vs_mlx`` / ``weights_vs_mlx`` / ``loss_vs_mlx``: with ``dropout``, the gradients, the weights after
      AdamW and the loss against the MLX in-memory ``mx.grad`` reference (``backends.mlx.reference``) with the
      same dropout keys: the same library, so the same bits are expected, as the torch step gets against
      torch's in-memory reference."""

    streamed_loss: float
    torch_loss: float
    grad_err: float
    grad_worst: str
    weights_vs_torch: float
    weights_vs_torch_worst: str
    adamw_vs_torch: float
    adamw_vs_torch_worst: str
    dropout_streamed_loss: float
    mlx_loss: float
    loss_vs_mlx: float
    weights_vs_mlx: float
    weights_vs_mlx_worst: str
    grad_vs_mlx: float
    grad_vs_mlx_worst: str
    tensors_compared: int
    same_codes_loss: float | None = None
    grad_vs_same_codes: float | None = None
    grad_vs_same_codes_worst: str = ""
    code_flips: object = None  # activation_codes.CodeFlips


def _worst(pairs) -> tuple[float, str]:
    worst, worst_name = 0.0, ""
    for name, actual, expected in pairs:
        err = relative_error(actual, expected)
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name


def _parity_store(root: str, mode: str, seed: int, overrides: dict) -> str:
    shape = dict(size="demo", n_layers=4, n_heads=4, n_kv_heads=2, dim=64, hidden_dim=192, tie_embeddings=False)
    shape.update(overrides)
    arch = "bitnet" if mode == "qat" else "llama"
    return create_model(f"{root}/store", arch=arch, mode=mode, shadow_dtype="fp32", seed=seed, **shape)


def _parity_batches(vocab: int, micro_batches: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(micro_batches):
        ids = torch.randint(0, vocab, (2, 24), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append((ids, labels))
    return batches


def _streamed_mlx_step(path: str, batches, dropout: float, seed: int, optim) -> tuple[float, dict, dict, list]:
    """One streamed step on ``--device mlx``: (loss, weights after it, its gradients from the moments, and each
    AdamW update it made as ``(weights before, gradient, weights after, step, lr)``)."""
    from offload_bitnet.store.units import unit_shapes

    store = BlockStore(path, writable=True)
    engine = StreamingEngine(store, EngineOptions(device="mlx", dropout=dropout, seed=seed, optim=optim,
                                                  activation_budget_bytes=8 << 10))
    updates, backend_update = [], engine.backend.adamw_update

    def recorded_update(param, grad, exp_avg, exp_avg_sq, step, config, lr):
        before = param.detach().clone()
        backend_update(param, grad, exp_avg, exp_avg_sq, step, config, lr)
        updates.append((before, grad.detach().float().clone(), param.detach().clone(), step, lr))

    engine.backend.adamw_update = recorded_update
    try:
        stats = engine.train_step(batches)
        engine.flush()
        grads = {}
        for unit in store.units:
            shapes = unit_shapes(store.config, unit)
            moments = engine.layout.moments(engine._optim_part(unit, stored=True), shapes, "cpu")
            grads[unit] = {name: exp_avg / (1 - optim.beta1) for name, (exp_avg, _) in moments.items()}
    finally:
        engine.close()
    updated = InMemoryModel.from_store(BlockStore(path)).named_unit_tensors()
    return stats.loss, updated, grads, updates


def _torch_adamw_on(updates, optim) -> tuple[float, str]:
    """The worst relative error of the recorded updates' results against ``torch.optim.AdamW(fused=True)`` run on
    the same weights and gradients (each a first step, as in the parity check)."""
    from offload_bitnet.model.adamw import torch_param_groups

    pairs = []
    for index, (before, grad, after, step, lr) in enumerate(updates):
        if step != 1:
            raise ValueError(f"the AdamW comparison replays first steps only, got step {step}")
        param = torch.nn.Parameter(before.clone())
        param.grad = grad.clone()
        torch.optim.AdamW(torch_param_groups({"p": param}, optim), lr=optim.lr if lr is None else lr,
                          betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True).step()
        pairs.append((f"update {index} {tuple(before.shape)}", after, param.detach()))
    return _worst(pairs)


def _torch_step(path: str, batches, seed: int, optim) -> tuple[float, dict, dict]:
    """The in-memory torch step, dropout off: (loss, its gradients, the weights after torch.optim.AdamW)."""
    reference = InMemoryModel.from_store(BlockStore(path))
    optimizer = reference.optimizer(optim)
    loss = reference.step_loss(batches, dropout=0.0, seed=seed, step=1)
    loss.backward()
    grads = {unit: {n: p.grad.clone() for n, p in tensors.items()}
             for unit, tensors in reference.named_unit_tensors().items()}
    optimizer.step()
    weights = {unit: {n: p.detach() for n, p in tensors.items()}
               for unit, tensors in reference.named_unit_tensors().items()}
    return loss.item(), grads, weights


def _mlx_reference_units(store: BlockStore) -> tuple[dict, dict]:
    """``(masters, computed)`` MLX unit dicts for ``backends.mlx.reference``: the masters AdamW updates, and the
    tensors the step computes with. The ternary projections are the store's (unpacked, as the streamed step
    computes with them) rather than quantized again in MLX: a last-bit difference in gamma would flip 8-bit
    activation levels (see ``activation_codes``). By the straight-through estimator their gradients are the
    shadows'."""
    from offload_bitnet.backends.mlx.arrays import tree_to_mx

    layout = Layout(store.settings)
    masters = {unit: tree_to_mx({n: t.detach() for n, t in tensors.items()})
               for unit, tensors in InMemoryModel.from_store(store).named_unit_tensors().items()}
    computed = {unit: tree_to_mx(layout.forward_tensors(unit, store.read(unit, "weights"), torch.float32, "cpu"))
                if is_block(unit) else tensors for unit, tensors in masters.items()}
    return masters, computed


def _torch_step_with_mlx_codes(path: str, batches, seed: int) -> tuple[float, dict, object]:
    """Torch autograd's step (dropout off) with the 8-bit activation codes the MLX in-memory step chose:
    (loss, gradients, ``activation_codes.CodeFlips``)."""
    import mlx.core as mx

    from offload_bitnet.backends.mlx import reference as mlx_reference
    from offload_bitnet.backends.mlx.arrays import to_mx, to_torch
    from offload_bitnet.reference.activation_codes import recording_mlx_codes, torch_with_codes

    store = BlockStore(path)
    _, computed = _mlx_reference_units(store)
    codes = []
    with recording_mlx_codes(codes):
        loss, _ = mlx_reference.loss_and_grads(computed, [(to_mx(i), to_mx(l)) for i, l in batches], store.config,
                                               quantize=1.0, seed=seed, step=1)
    mx.eval(loss, codes)
    reference = InMemoryModel.from_store(store)
    with torch_with_codes([to_torch(c) for c in codes]) as flips:
        torch_loss = reference.step_loss(batches, dropout=0.0, seed=seed, step=1)
        torch_loss.backward()
    grads = {unit: {n: p.grad.clone() for n, p in tensors.items()}
             for unit, tensors in reference.named_unit_tensors().items()}
    return torch_loss.item(), grads, flips


def run_mlx_parity(mode: str = "qat", dropout: float = 0.1, micro_batches: int = 2, seed: int = 0,
                   workdir: str | None = None, **overrides) -> MLXParityResult:
    """One streamed step on MLX against torch autograd + torch AdamW (dropout off; in qat also with the MLX
    step's activation codes), and with ``dropout`` against the MLX in-memory reference (see ``MLXParityResult``)."""
    import mlx.core as mx

    from offload_bitnet.backends.mlx import reference as mlx_reference
    from offload_bitnet.backends.mlx.arrays import to_mx, to_torch

    optim = AdamWConfig(lr=1e-3, weight_decay=0.1)
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        path = _parity_store(root + "/a", mode, seed, overrides)
        batches = _parity_batches(BlockStore(path).config.vocab_size, micro_batches, seed)
        torch_loss, torch_grads, expected = _torch_step(path, batches, seed, optim)
        same_codes = _torch_step_with_mlx_codes(path, batches, seed) if mode == "qat" else None
        streamed_loss, updated, grads, updates = _streamed_mlx_step(path, batches, 0.0, seed, optim)
        grad_err, grad_worst = _worst((f"{u}.{n}", grads[u][n], g) for u, t in torch_grads.items()
                                      for n, g in t.items())
        weights_err, weights_worst = _worst((f"{u}.{n}", updated[u][n], t) for u, ts in expected.items()
                                            for n, t in ts.items())
        adamw_err, adamw_worst = _torch_adamw_on(updates, optim)
        count = sum(len(t) for t in expected.values())
        same_codes_fields = {}
        if same_codes is not None:
            same_loss, same_grads, flips = same_codes
            same_err, same_worst = _worst((f"{u}.{n}", grads[u][n], g) for u, t in same_grads.items()
                                          for n, g in t.items())
            loss_err = abs(streamed_loss - same_loss) / abs(same_loss)
            if loss_err > same_err:
                same_err, same_worst = loss_err, "loss"
            same_codes_fields = dict(same_codes_loss=same_loss, grad_vs_same_codes=same_err,
                                     grad_vs_same_codes_worst=same_worst, code_flips=flips)

        # Dropout on: the MLX in-memory reference from the same initial weights and keys.
        path = _parity_store(root + "/b", mode, seed, overrides)
        store = BlockStore(path)
        masters, computed = _mlx_reference_units(store)
        quantize = 1.0 if mode == "qat" else 0.0
        mlx_batches = [(to_mx(ids), to_mx(labels)) for ids, labels in batches]
        mlx_loss, mlx_grads = mlx_reference.loss_and_grads(computed, mlx_batches, store.config, quantize=quantize,
                                                           dropout_p=dropout, seed=seed, step=1)
        stepped, moments = mlx_reference.adamw_step(masters, mlx_grads, {}, step=1, lr=optim.lr,
                                                    betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                                    weight_decay=optim.weight_decay)
        mx.eval(stepped, moments)
        dropout_loss, updated, streamed_grads, _ = _streamed_mlx_step(path, batches, dropout, seed, optim)
        # The reference's gradients recovered from its moments as the streamed step's are: equal gradients
        # compare equal, bit for bit (g itself would differ from exp_avg / (1 - beta1) by that division's rounding).
        mlx_grad_err, mlx_grad_worst = _worst((f"{u}.{n}", streamed_grads[u][n],
                                               to_torch(exp_avg) / (1 - optim.beta1))
                                              for u, ts in moments.items() for n, (exp_avg, _) in ts.items())
        mlx_err, mlx_worst = _worst((f"{u}.{n}", updated[u][n], to_torch(a)) for u, ts in stepped.items()
                                    for n, a in ts.items())
        mlx_loss = mlx_loss.item()
        mlx_loss_err = abs(dropout_loss - mlx_loss) / abs(mlx_loss)
    return MLXParityResult(streamed_loss, torch_loss, grad_err, grad_worst, weights_err, weights_worst, adamw_err,
                           adamw_worst, dropout_loss, mlx_loss, mlx_loss_err, mlx_err, mlx_worst, mlx_grad_err,
                           mlx_grad_worst, count, **same_codes_fields)
