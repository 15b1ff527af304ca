import math

import pytest

from offload_bitnet.train.schedule import Schedule, cosine, make_schedule, quant_mix


def test_warmup_is_linear_to_the_peak():
    schedule = make_schedule("cosine", 1e-3, total_steps=100, warmup_fraction=0.1)
    assert schedule.warmup_steps == 10
    assert [schedule.lr(s) for s in (1, 5, 10)] == pytest.approx([1e-4, 5e-4, 1e-3])


def test_cosine_decays_from_peak_to_eta_min_after_the_last_step():
    schedule = make_schedule("cosine", 1e-3, total_steps=110, warmup_fraction=10 / 110, eta_min=1e-5)
    assert schedule.lr(10) == pytest.approx(1e-3) and schedule.lr(11) == pytest.approx(1e-3)
    assert schedule.lr(61) == pytest.approx((1e-3 + 1e-5) / 2)  # halfway through the 100 decay steps
    assert schedule.lr(110) > 1e-5 + 1e-9                        # the last step still trains...
    assert schedule.lr(111) == pytest.approx(1e-5)               # ...eta_min comes after it
    decay = [schedule.lr(s) for s in range(10, 112)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("kind", ["cosine", "constant", "two-stage"])
@pytest.mark.parametrize("total, warmup_fraction", [(1, 0.0), (2, 0.0), (7, 0.0), (7, 0.3), (100, 0.05)])
def test_first_and_last_lr_of_every_schedule(kind, total, warmup_fraction):
    peak, eta_min = 1e-3, 1e-5
    schedule = make_schedule(kind, peak, total, warmup_fraction, eta_min=eta_min, stage2_lr_fraction=0.1)
    lrs = [schedule.lr(s) for s in range(1, total + 1)]
    warmup = schedule.warmup_steps
    first = peak / warmup if warmup else (peak * 0.1 if kind == "two-stage" and total == 1 else peak)
    assert lrs[0] == pytest.approx(first)
    assert min(lrs) > eta_min  # no step is wasted at eta_min (or at 0)
    if kind == "constant":
        assert lrs[-1] == pytest.approx(peak)
    else:
        assert schedule.lr(total + 1) == pytest.approx(eta_min)  # reached one step after the last
        assert lrs[-1] < peak or total - warmup == 1


def test_a_single_step_run_trains_at_the_peak():
    assert make_schedule("cosine", 3e-3, 1).lr(1) == pytest.approx(3e-3)
    short = make_schedule("cosine", 2e-4, 7, warmup_fraction=0.05)  # the old quick start: 7 steps
    assert short.lr(7) > 0.04 * 2e-4


def test_constant_after_warmup():
    schedule = make_schedule("constant", 2e-4, total_steps=50, warmup_fraction=0.2)
    assert schedule.lr(5) == pytest.approx(1e-4)
    assert {schedule.lr(s) for s in range(10, 51)} == {2e-4}
    assert schedule.weight_decay_at(50) == 0.0


def test_two_stage_drops_sharply_at_the_midpoint_and_disables_weight_decay():
    schedule = make_schedule("two-stage", 1e-3, total_steps=100, warmup_fraction=0.0, weight_decay=0.1,
                             stage2_lr_fraction=0.1)
    assert schedule.stage2_start == 51
    before, after = schedule.lr(50), schedule.lr(51)
    assert schedule.lr(1) == pytest.approx(1e-3)
    assert before == pytest.approx(cosine(1e-3, 0.0, 49, 100))  # stage 1 follows the whole-run cosine
    assert after == pytest.approx(1e-4)                           # stage 2 starts at 10% of the peak
    assert before > 4 * after
    assert 0.0 < schedule.lr(100) < 1e-5 and schedule.lr(101) == pytest.approx(0.0)
    assert schedule.weight_decay_at(50) == 0.1
    assert schedule.weight_decay_at(51) == 0.0 and schedule.weight_decay_at(100) == 0.0


def test_cosine_helper_endpoints_and_clamping():
    assert cosine(1.0, 0.0, 0, 10) == 1.0
    assert cosine(1.0, 0.0, 10, 10) == pytest.approx(0.0)
    assert cosine(1.0, 0.0, 20, 10) == pytest.approx(0.0)
    assert cosine(1.0, 0.5, 5, 0) == 0.5
    assert cosine(2.0, 0.0, 5, 10) == pytest.approx(1.0)


def test_warmup_never_takes_every_step():
    schedule = make_schedule("cosine", 1e-3, total_steps=3, warmup_fraction=0.99)
    assert schedule.warmup_steps == 2
    assert math.isfinite(schedule.lr(3))


def test_schedule_is_a_pure_function_of_the_step():
    a = make_schedule("two-stage", 3e-3, 40, 0.1, 1e-5, 0.05)
    b = make_schedule("two-stage", 3e-3, 40, 0.1, 1e-5, 0.05)
    assert [a.lr(s) for s in range(1, 41)] == [b.lr(s) for s in reversed(range(1, 41))][::-1]


def test_invalid_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        Schedule("linear", 1e-3, 10)
    with pytest.raises(ValueError, match="at least 1 step"):
        Schedule("cosine", 1e-3, 0)


def test_quant_mix_rises_linearly_then_stays_ternary():
    assert [quant_mix(s, 4) for s in range(0, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert quant_mix(1, 3) == pytest.approx(1 / 3)
    assert quant_mix(1, 0) == 1.0 and quant_mix(0, 0) == 1.0  # no warmup: plain ternary training
