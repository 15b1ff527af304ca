"""The distributed step (distributed/trainable.py) on 2 gloo ranks against one process, in qat, full and LoRA:
2 ranks x 1 micro-batch == 1 process x 2 micro-batches bit for bit; 2 x 2 against 1 x 4 within 1e-6; two runs
of 2 ranks bit-identical."""
import json
import os

import pytest

from rank_runs import launch
from train_runs import (adapter_tensors, assert_equal, gathered_tensors, make_model, make_rank_stores,
                        max_relative_difference, store_tensors, train, train_program)

STEPS = 3


def _single(tmp_path, mode, batch_size, grad_accum, steps=STEPS, exact=False):
    """One process: the model's own store trained in place (LoRA: adapters beside it)."""
    model = make_model(tmp_path / "single", mode)
    adapter_dir = str(tmp_path / "single" / "adapters") if mode == "lora" else None
    losses = train(model, mode, steps, batch_size, grad_accum, adapter_dir=adapter_dir, exact=exact)
    return losses, (adapter_tensors(adapter_dir) if adapter_dir else store_tensors(model))


def _distributed(tmp_path, name, mode, batch_size, grad_accum, steps=STEPS, exact=False):
    folder = tmp_path / name
    stores = make_rank_stores(make_model(folder, mode), folder, 2)
    adapter_dirs = [str(folder / f"adapters.rank{r}") for r in range(2)] if mode == "lora" else None
    results = launch(train_program, 2, str(folder / "results"), store_dirs=stores, mode=mode, steps=steps,
                     batch_size=batch_size, grad_accum=grad_accum, adapter_dirs=adapter_dirs, exact=exact)
    assert [r["exitcode"] for r in results] == [0, 0], [r.get("traceback") for r in results]
    assert results[0]["losses"] == results[1]["losses"]  # every rank reports the step's total loss
    if mode == "lora":
        tensors = [adapter_tensors(d) for d in adapter_dirs]
        assert_equal(tensors[0], tensors[1], "the ranks' adapters")
        return results[0]["losses"], tensors[0]
    return results[0]["losses"], gathered_tensors(stores)


@pytest.mark.parametrize("mode", ["qat", "full", "lora"])
def test_two_ranks_match_one_process_with_twice_the_micro_batches_bit_for_bit(tmp_path, mode):
    single_losses, single = _single(tmp_path, mode, batch_size=4, grad_accum=2)
    losses, tensors = _distributed(tmp_path, "two", mode, batch_size=4, grad_accum=1)
    assert losses == single_losses
    assert_equal(tensors, single, mode)
    # the step trained something: the weights moved away from the model's
    untrained = store_tensors(make_model(tmp_path / "untrained", "full" if mode == "lora" else mode))
    moved = [key for key in untrained if key[1] == "weights" and any(
        not untrained[key][n].equal(single[key][n]) for n in untrained[key])] if mode != "lora" else \
        [key for key, tensor in single.items() if "lora_B" in key and tensor.abs().max() > 0]
    assert moved, "nothing was trained"


@pytest.mark.parametrize("mode", ["qat", "full", "lora"])
def test_two_ranks_of_two_micro_batches_match_one_process_of_four_within_rounding(tmp_path, mode):
    """The sums group differently ((g0 + g1) + (g2 + g3)): the step's summed gradients (the first step's AdamW
    first moments, fp32; LoRA: the adapters after one step) agree within 1e-6 of each tensor's largest value,
    and the losses of STEPS steps within 1e-6. (The weights after several steps do not: AdamW's first update
    is lr * g / (|g| + eps), so where g0 + g1 + g2 + g3 nearly cancels, a rounding of the sum moves an element
    by up to lr; README "Data parallel" has the figures.)"""
    single_losses, single = _single(tmp_path, mode, batch_size=8, grad_accum=4, steps=1)
    losses, tensors = _distributed(tmp_path, "two", mode, batch_size=8, grad_accum=2, steps=1)
    if mode != "lora":
        single = {key: parts for key, parts in single.items() if key[1] == "optim"}
        tensors = {key: tensors[key] for key in single}
        single = {key: {n: t for n, t in parts.items() if n.endswith(".exp_avg")} for key, parts in single.items()}
        tensors = {key: {n: tensors[key][n] for n in names} for key, names in single.items()}
        assert len(single) == (4 if mode == "qat" else 5)  # every unit (qat: tied head): embed, blocks, norm, head
    assert max_relative_difference(single, tensors) <= 1e-6
    single_losses, _ = _single(tmp_path / "3", mode, batch_size=8, grad_accum=4)
    losses, _ = _distributed(tmp_path, "three", mode, batch_size=8, grad_accum=2)
    for a, b in zip(single_losses, losses, strict=True):
        assert abs(a - b) <= 1e-6 * abs(a)


@pytest.mark.parametrize("mode", ["qat", "full", "lora"])
def test_with_exact_sums_two_ranks_of_two_micro_batches_train_what_one_process_of_four_trains(tmp_path, mode):
    """Float64 sums of the micro-batches' gradients (--exact-grad-sums) are the same in any order: after 3 steps
    the weights (LoRA: adapters) are bit for bit those of one process with 4 micro-batches, and so are the
    losses; and the exact sums are not a different training: the losses of rounded sums agree within 1e-6."""
    single_losses, single = _single(tmp_path, mode, batch_size=8, grad_accum=4, exact=True)
    losses, tensors = _distributed(tmp_path, "two", mode, batch_size=8, grad_accum=2, exact=True)
    assert losses == single_losses
    assert_equal(tensors, single, mode)
    rounded_losses, _ = _single(tmp_path / "rounded", mode, batch_size=8, grad_accum=4)
    for a, b in zip(rounded_losses, losses, strict=True):
        assert abs(a - b) <= 1e-6 * abs(a)


@pytest.mark.parametrize("mode", ["qat", "full", "lora"])
def test_the_same_two_rank_run_twice_is_bit_identical(tmp_path, mode):
    first_losses, first = _distributed(tmp_path, "first", mode, batch_size=8, grad_accum=2)
    second_losses, second = _distributed(tmp_path, "second", mode, batch_size=8, grad_accum=2)
    assert first_losses == second_losses
    assert_equal(first, second, "two runs of 2 ranks")


def test_the_quantization_warm_up_is_refused_across_ranks_on_every_rank(tmp_path):
    from train_runs import warmup_program
    stores = make_rank_stores(make_model(tmp_path, "qat"), tmp_path, 2)
    results = launch(warmup_program, 2, str(tmp_path / "results"), store_dirs=stores)
    for rank, result in enumerate(results):
        assert result["exitcode"] == 1
        assert result["error"].startswith(f"rank {rank} of 2: the quantization warm-up (--quant-warmup, "
                                          "quant_mix < 1) is not supported across ranks yet"), result
    assert [json.load(open(os.path.join(p, "manifest.json")))["step"] for p in stores] == [0, 0]


@pytest.mark.parametrize("mode", ["qat", "full"])
def test_a_non_finite_update_on_an_owner_skips_the_step_on_every_rank(tmp_path, mode):
    # Each unit's update runs on its owner only; the others learn of the overflow before its broadcast, and
    # every rank discards the step as one process does: nothing committed, then the next step trains.
    from train_runs import huge_lr_program
    stores = make_rank_stores(make_model(tmp_path, mode), tmp_path, 2)
    results = launch(huge_lr_program, 2, str(tmp_path / "results"), store_dirs=stores, mode=mode)
    assert [r["exitcode"] for r in results] == [0, 0], [r.get("traceback") for r in results]
    for rank, result in enumerate(results):
        skipped = result["huge"]["skipped"]
        assert skipped and result["huge"]["step"] == 0, result
        assert "non-finite" in skipped and ("on its owner, rank" in skipped or "after the update" in skipped)
        assert result["configured"] == {"skipped": None, "step": 1}, result
    assert [json.load(open(os.path.join(p, "manifest.json")))["step"] for p in stores] == [1, 1]
    # The skipped step left no trace: the same model as 2 ranks that only ran the configured step.
    _, plain = _distributed(tmp_path, "plain", mode, batch_size=4, grad_accum=1, steps=1)
    assert_equal(gathered_tensors(stores), plain, "after a skipped step")
