"""The MLX in-memory reference against torch's in-memory model, and the backend functions composed as a
streamed step against the MLX reference with dropout on (issue 15's second check, in miniature)."""
import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from offload_bitnet.backends.mlx import loss as ml  # noqa: E402
from offload_bitnet.backends.mlx import model as mm  # noqa: E402
from offload_bitnet.backends.mlx import reference as mr  # noqa: E402
from offload_bitnet.backends.mlx.arrays import to_mx, to_numpy, tree_to_mx  # noqa: E402
from offload_bitnet.reference.inmemory import InMemoryModel  # noqa: E402
from offload_bitnet.model.adamw import AdamWConfig  # noqa: E402
from offload_bitnet.store.units import block_unit  # noqa: E402
from mlx_cases import (SEQ, TOLERANCE, check, config_of, lora_mats, micro_batches, model_units,  # noqa: E402
                       rel_err)


@pytest.mark.parametrize("arch,tie,mode", [("llama", False, "full"), ("llama", True, "full"),
                                           ("bitnet", False, "qat"), ("bitnet", True, "qat")])
def test_reference_gradients_and_adamw_step_match_the_torch_in_memory_model(arch, tie, mode):
    config = config_of(arch, tie=tie)
    units = model_units(config)
    batches = micro_batches(config)
    torch_model = InMemoryModel(config, units, mode)
    loss = torch_model.step_loss(batches, step=1)
    loss.backward()
    torch_grads = {unit: {n: p.grad for n, p in params.items()} for unit, params in
                   torch_model.named_unit_tensors().items()}

    quantize = 1.0 if mode == "qat" else 0.0
    mlx_units = {unit: tree_to_mx(tensors) for unit, tensors in units.items()}
    mlx_batches = [(to_mx(ids), to_mx(labels)) for ids, labels in batches]
    mlx_loss, grads = mr.loss_and_grads(mlx_units, mlx_batches, config, quantize=quantize, weight_quantize=quantize)
    assert abs(mlx_loss.item() - loss.item()) <= TOLERANCE * abs(loss.item())
    worst = max(check(f"reference {arch} tie={tie} {mode} d{unit}.{name}", grads[unit][name], torch_grads[unit][name])
                for unit in units for name in units[unit])
    print(f"reference {arch} tie={tie} {mode}: loss {mlx_loss.item():.6f} vs {loss.item():.6f}, "
          f"worst grad max_rel_err {worst:.2e}")

    optim_config = AdamWConfig(lr=1e-3, weight_decay=0.1)
    optimizer = torch_model.optimizer(optim_config)
    optimizer.step()
    after = torch_model.named_unit_tensors()
    # The update itself, from torch's gradients: AdamW's arithmetic against torch.optim.AdamW(fused=True).
    same_grads = {unit: tree_to_mx(g) for unit, g in torch_grads.items()}
    stepped, moments = mr.adamw_step(mlx_units, same_grads, {}, step=1, lr=1e-3, weight_decay=0.1)
    worst = max(check(f"reference {arch} tie={tie} {mode} AdamW from torch's grads {unit}.{name}",
                      stepped[unit][name], after[unit][name], tolerance=1e-6) for unit in units for name in units[unit])
    print(f"reference {arch} tie={tie} {mode}: AdamW-stepped weights (same grads) worst max_rel_err {worst:.2e}")
    # From its own gradients the first AdamW step is about lr * sign(g): a gradient element within the two
    # backends' rounding noise of zero moves its weight by up to 2 lr apart, so only that bound holds.
    own, _ = mr.adamw_step(mlx_units, grads, {}, step=1, lr=1e-3, weight_decay=0.1)
    apart = max(float(np.abs(to_numpy(own[u][n]) - after[u][n].detach().numpy()).max())
                for u in units for n in units[u])
    worst_own = max(rel_err(own[u][n], after[u][n]) for u in units for n in units[u])
    print(f"reference {arch} tie={tie} {mode}: AdamW-stepped weights (own grads) worst max_rel_err {worst_own:.2e}, "
          f"max |difference| {apart:.2e} (lr 1e-3)")
    assert apart <= 2e-3
    assert set(moments) == set(units)


def _streamed_step(units, batches, config, *, quantize, weight_quantize, dropout_p, lora_dropout, seed, step,
                   chunk_tokens, lora):
    """A layer-major streamed step written with the backend functions only: forward each block for every
    micro-batch keeping its input, chunked cross-entropy, then each block replayed last to first with its
    dropout key. Returns (loss, grads) shaped like reference.loss_and_grads'."""
    targets = [ml.shift_labels(ids, labels) for ids, labels in batches]
    n_tokens = sum(int((t != ml.IGNORE_INDEX).sum().item()) for t in targets)
    cos, sin = mm.rope_tables(config, SEQ)
    options = dict(quantize=quantize, weight_quantize=weight_quantize, dropout_p=dropout_p,
                   lora_dropout=lora_dropout, lora_scaling=0.5)
    training = dropout_p > 0 or lora_dropout > 0
    hidden = [units["embed"]["weight"][ids] for ids, _ in batches]
    stash = {}
    for layer in range(config.n_layers):
        for m in range(len(batches)):
            stash[(layer, m)] = hidden[m]
            key = mm.dropout_key(seed, step, m, layer) if training else None
            hidden[m] = mm.block_forward(units[block_unit(layer)], hidden[m], config, cos, sin, key=key, **options)
            mx.eval(hidden[m])
    head = mr.head_weight(units, config)
    grads = {unit: {} for unit in units}
    loss, grad_hidden, head_grad, norm_grad = 0.0, [], None, None
    for m, target in enumerate(targets):
        part, grad_normed, grad_head = ml.chunked_cross_entropy(mm.rms_norm(hidden[m], units["norm"]["weight"],
                                                                            config.norm_eps),
                                                                head, target, chunk_tokens, 1.0 / n_tokens, True)
        loss += part
        _, (grad_h, grad_norm) = mx.vjp(lambda h, w: mm.rms_norm(h, w, config.norm_eps),
                                        [hidden[m], units["norm"]["weight"]], [grad_normed])
        grad_hidden.append(grad_h)
        head_grad = grad_head if head_grad is None else head_grad + grad_head
        norm_grad = grad_norm if norm_grad is None else norm_grad + grad_norm
    for layer in reversed(range(config.n_layers)):
        params = units[block_unit(layer)]
        names = mm.trainable_names(params, lora)
        for m in range(len(batches)):
            key = mm.dropout_key(seed, step, m, layer) if training else None
            grad_hidden[m], block_grads = mm.block_backward(params, stash.pop((layer, m)), grad_hidden[m], config,
                                                            cos, sin, trainable=names, key=key, **options)
            for name, grad in block_grads.items():
                grads[block_unit(layer)][name] = grads[block_unit(layer)].get(name, 0) + grad
            mx.eval(grad_hidden[m], *grads[block_unit(layer)].values())
    if not lora:
        grads["norm"]["weight"] = norm_grad
        embed_grad = mx.zeros_like(units["embed"]["weight"])
        for (ids, _), grad_h in zip(batches, grad_hidden):
            embed_grad = embed_grad.at[ids.reshape(-1)].add(grad_h.reshape(-1, config.dim))
        if config.tie_embeddings:
            embed_grad = embed_grad + head_grad
        else:
            grads["head"]["weight"] = head_grad
        grads["embed"]["weight"] = embed_grad
    return loss, {unit: g for unit, g in grads.items() if g}


@pytest.mark.parametrize("arch,tie,mode", [("llama", True, "full"), ("bitnet", False, "qat"),
                                           ("bitnet", True, "lora")])
def test_streamed_step_with_dropout_matches_the_mlx_reference(arch, tie, mode):
    """Issue 15's dropout-on check in miniature: the backend functions composed as the streamed step composes
    them (stashed inputs, chunked cross-entropy, replay with the saved keys) give the in-memory ``mx.grad``
    gradients with dropout on."""
    config = config_of(arch, tie=tie)
    units = {unit: tree_to_mx(tensors) for unit, tensors in model_units(config).items()}
    lora = mode == "lora"
    if lora:
        for layer in range(config.n_layers):
            for name, (lora_a, lora_b) in lora_mats(config, ("q_proj", "o_proj", "up_proj"), seed=20 + layer).items():
                units[block_unit(layer)][f"{name}.lora_a"] = to_mx(lora_a)
                units[block_unit(layer)][f"{name}.lora_b"] = to_mx(lora_b)
    batches = [(to_mx(ids), to_mx(labels)) for ids, labels in micro_batches(config)]
    quantize = 0.0 if mode == "full" else 1.0
    options = dict(quantize=quantize, weight_quantize=1.0 if mode == "qat" else 0.0, dropout_p=0.1,
                   lora_dropout=0.2 if lora else 0.0, seed=5, step=3)
    ref_loss, ref_grads = mr.loss_and_grads(units, batches, config, lora=lora, lora_scaling=0.5, **options)
    loss, grads = _streamed_step(units, batches, config, chunk_tokens=7, lora=lora, **options)
    no_dropout_loss, _ = mr.loss_and_grads(units, batches, config, lora=lora, lora_scaling=0.5,
                                           **{**options, "dropout_p": 0.0, "lora_dropout": 0.0})
    assert abs(ref_loss.item() - no_dropout_loss.item()) > 1e-4  # dropout really is on
    assert abs(loss - ref_loss.item()) <= TOLERANCE * abs(ref_loss.item())
    assert set(grads) == set(ref_grads) and all(set(grads[u]) == set(ref_grads[u]) for u in grads)
    worst = 0.0
    for unit in ref_grads:
        for name in ref_grads[unit]:
            want = torch.from_numpy(np.array(to_numpy(ref_grads[unit][name])))
            worst = max(worst, check(f"streamed vs reference {arch} {mode} d{unit}.{name}", grads[unit][name], want))
    print(f"streamed vs MLX reference {arch} tie={tie} {mode} dropout on: worst max_rel_err {worst:.2e}")
