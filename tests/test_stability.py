import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from vits_ray.config import StabilityConfig
from vits_ray.errors import non_retryable_cause
from vits_ray.stability import (AmpScaleMonitor, CheckpointCadence, SpikeDetector, StabilityGuard,
                                TooManyRollbacksError, find_spikes, per_epoch_config)

_spec = importlib.util.spec_from_file_location("reference_curve", Path(__file__).parent / "data" / "reference_curve.py")
curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves)

PER_STEP = StabilityConfig(window=200, min_history=50)  # recommended for one value per step
EPOCH_CONFIGS = [pytest.param(StabilityConfig(), id="defaults"), pytest.param(per_epoch_config(), id="per_epoch")]


def confirmed_indices(values, cfg):
    detector = SpikeDetector.from_config(cfg)
    out = []
    for i, v in enumerate(values):
        verdict = detector.update(v)
        if verdict is not None and verdict.confirmed:
            out.append(i)
    return out


def metrics(loss_1=27.5, **kw):
    m = {"loss_1": loss_1, "loss_mel": 18.0, "loss_kl": 1.5, "loss_0": 2.6,
         "grad_norm_0": 5.0, "grad_norm_1": 50.0, "amp_scale": 1024.0}
    m.update(kw)
    return m


def noisy(i):  # deterministic plateau noise in [27, 28]
    return 27.5 + 0.5 * math.sin(i * 1.7)


# --- detector on recorded curves ------------------------------------------------------------

@pytest.mark.parametrize("cfg", EPOCH_CONFIGS)
def test_reference_curve_flagged_at_the_jump_and_nowhere_else(cfg):
    values = curves.generator_per_epoch()
    hits = confirmed_indices(values, cfg)
    assert hits, "the jump to 42 near epoch 85 must be flagged"
    assert 85 <= hits[0] <= 87
    assert all(85 <= i <= 95 for i in hits), hits


@pytest.mark.parametrize("cfg", EPOCH_CONFIGS)
def test_find_spikes_reference_curve_returns_the_one_spike(cfg):
    spikes = find_spikes(curves.generator_per_epoch(), cfg)
    assert len(spikes) == 1
    (spike,) = spikes
    assert 84 <= spike.start_index <= 85 and spike.peak_index == 85
    assert spike.peak_value == pytest.approx(42.0)
    assert spike.baseline == pytest.approx(27.5, abs=0.6)
    assert spike.size == pytest.approx(42.0 - 27.5, abs=0.75)
    assert spike.recovery_index is not None and 86 < spike.recovery_index < 100
    assert spike.threshold < 42.0


@pytest.mark.parametrize("cfg", [pytest.param(PER_STEP, id="window200"),
                                 pytest.param(StabilityConfig(window=100, min_history=30), id="window100")])
def test_find_spikes_per_step_curve_flags_the_climb_and_ignores_single_step_jumps(cfg):
    values = curves.generator_per_step(steps_per_epoch=40)
    spikes = find_spikes(values, cfg)
    assert len(spikes) == 1
    # Flagged during the 80-step climb, before the epoch-85 peak: the window must not follow it.
    assert 83 * 40 <= spikes[0].start_index < 85 * 40
    hits = confirmed_indices(values, cfg)
    assert hits and all(83 * 40 <= i <= 88 * 40 for i in hits)


def test_detector_ignores_nonfinite_values():
    detector = SpikeDetector.from_config(StabilityConfig(window=20, min_history=10))
    for i in range(30):
        detector.update(noisy(i))
    before = detector.state_dict()
    assert detector.update(math.nan) is None and detector.update(math.inf) is None
    assert detector.state_dict() == before
    assert detector.update(27.6) is None


def test_find_spikes_open_spike_has_no_recovery():
    spikes = find_spikes([10.0] * 30 + [20.0] * 5, StabilityConfig(window=20, min_history=10))
    assert len(spikes) == 1 and spikes[0].start_index == 30 and spikes[0].recovery_index is None


@pytest.mark.parametrize("cfg", EPOCH_CONFIGS)
def test_discriminator_oscillation_never_flagged(cfg):
    values = curves.discriminator_per_epoch()
    assert len(values) == 140 and min(values) >= 1.4 and max(values) <= 4.5
    assert confirmed_indices(values, cfg) == []
    assert find_spikes(values, cfg) == []


def test_descent_is_never_suspicious():
    detector = SpikeDetector.from_config(StabilityConfig(window=20, min_history=5))
    assert all(detector.update(27.5 + 41.37 * math.exp(-0.25 * e)) is None for e in range(200))


def test_confirmation_needs_consecutive_suspicious_values():
    detector = SpikeDetector.from_config(StabilityConfig(window=20, min_history=10, confirm_steps=3))
    for i in range(30):
        assert detector.update(noisy(i)) is None
    first, second = detector.update(60.0), detector.update(61.0)
    assert first.run == 1 and not first.confirmed and second.run == 2 and not second.confirmed
    assert detector.update(27.4) is None  # one normal value ends the run
    assert not detector.update(60.0).confirmed
    assert not detector.update(60.0).confirmed
    third = detector.update(60.0)
    assert third.confirmed and third.value == 60.0 and third.median == pytest.approx(27.5, abs=0.5)
    assert third.threshold > third.median and third.mad > 0


def test_long_spike_does_not_become_the_new_normal():
    detector = SpikeDetector.from_config(StabilityConfig(window=20, min_history=10))
    for i in range(30):
        detector.update(noisy(i))
    verdicts = [detector.update(45.0 + 0.1 * (i % 3)) for i in range(100)]
    assert all(v is not None and v.median < 28.5 for v in verdicts)


# --- guard ----------------------------------------------------------------------------------

def make_guard(**kw):
    cfg = dataclasses.replace(StabilityConfig(window=20, min_history=10), **kw)
    return StabilityGuard(cfg, save_step=500)


def warm(guard, n=30, start=1):
    for step in range(start, start + n):
        d = guard.observe(step, metrics(noisy(step)))
        assert d.action == "continue"
    return start + n


def test_nan_gives_nonfinite_events_and_does_not_corrupt_the_windows():
    guard = make_guard(max_consecutive_nonfinite=5)
    step = warm(guard)
    for bad in (metrics(math.nan), metrics(grad_norm_1=math.inf), metrics(loss_kl=-math.inf)):
        d = guard.observe(step, bad)
        assert d.action == "continue"
        assert [e.kind for e in d.events if e.kind != "cadence_unstable"] == ["nonfinite"]
        json.dumps(d.events[0].to_dict(), allow_nan=False)  # events.jsonl stays strict JSON
        step += 1
    assert guard.observe(step, metrics(27.6)).events == []
    assert guard.monitor.detectors["loss_1"].band()[0] == pytest.approx(27.5, abs=0.5)


def test_grad_overflow_alone_does_not_make_cadence_unstable():
    guard = make_guard()
    step = warm(guard)
    d = guard.observe(step, metrics(grad_norm_0=math.inf, skipped_0=True))
    assert [e.kind for e in d.events] == ["nonfinite"]
    assert d.events[0].detail["losses_finite"] and d.events[0].detail["series"] == ["grad_norm_0", "skipped_0"]
    assert guard.cadence.interval == 500


def test_consecutive_nonfinite_escalates_to_rollback():
    guard = make_guard(max_consecutive_nonfinite=3)
    step = warm(guard)
    actions = [guard.observe(step + i, metrics(math.nan)).action for i in range(3)]
    assert actions == ["continue", "continue", "rollback"]


def test_spike_in_any_series_is_reported_with_its_series():
    guard = make_guard(confirm_steps=2)
    step = warm(guard)
    assert guard.observe(step, metrics(loss_kl=9.0)).action == "continue"
    d = guard.observe(step + 1, metrics(loss_kl=9.5))
    assert d.action == "rollback"
    spike = next(e for e in d.events if e.kind == "spike")
    assert spike.series == "loss_kl" and spike.value == 9.5 and spike.threshold < 9.5
    assert [e.kind for e in d.events] == ["spike", "rollback", "cadence_unstable"]
    assert d.events[1].detail["reasons"] == ["spike:loss_kl"]


def test_a_checkpoint_waits_while_a_suspicious_run_awaits_confirmation():
    guard = make_guard(confirm_steps=3)
    warm(guard, n=499)
    guard.observe(500, metrics(60.0))
    assert guard.save_due(500)
    verdict = guard.checkpoint_verdict()
    assert verdict.kind == "suspect" and not verdict.trusted and "loss_1 for 1 step(s)" in verdict.reason
    guard.observe(501, metrics(27.5))
    assert guard.checkpoint_verdict().kind == "clean"


def test_checkpoint_verdicts_unjudged_clean_and_elevated():
    guard = make_guard(min_history=10)
    warm(guard, n=5)
    verdict = guard.checkpoint_verdict()
    assert verdict.kind == "unjudged" and verdict.trusted and "fewer than 10 steps" in verdict.reason
    step = warm(guard, n=25, start=6)
    assert guard.checkpoint_verdict().kind == "clean"
    # Above the band's midpoint but not a spike: not judged within the band, so the save waits.
    median, _, threshold = guard.monitor.detectors["loss_1"].band()
    guard.observe(step, metrics((median + threshold) / 2 + 0.01))
    verdict = guard.checkpoint_verdict()
    assert verdict.kind == "suspect" and f"step {step}: loss_1" in verdict.reason
    guard.observe(step + 1, metrics(math.nan))
    assert "non-finite" in guard.checkpoint_verdict().reason


def test_a_value_taken_in_before_the_baseline_existed_is_found_by_the_walk_back():
    # The tiny recipe's run that looped: a spike drill on step 8 with min_history 8. Step 8's loss
    # enters the window as normal (no band yet), so the step-8 checkpoint looked clean; the walk
    # back from the confirmed spike finds where the trouble began.
    guard = make_guard(window=20, min_history=8, confirm_steps=3)
    losses = [128.7, 110.2, 99.7, 107.0, 123.8, 111.5, 109.0, 1_157_065.0, 3018.2, 44876.6, 65284.7]
    decisions = [guard.observe(step, metrics(loss)) for step, loss in enumerate(losses, start=1)]
    assert [d.action for d in decisions] == ["continue"] * 10 + ["rollback"]
    assert decisions[-1].first_anomalous == 8
    rollback = next(e for e in decisions[-1].events if e.kind == "rollback")
    assert rollback.detail["first_anomalous"] == 8
    assert guard.recent_outliers(3)[0].startswith("step 9: loss_1 3018")
    assert not guard.settled(6)  # no step after 6 was judged within its band


def test_first_anomalous_step_per_reason():
    guard = make_guard(max_consecutive_nonfinite=3)
    step = warm(guard)
    assert guard.settled(step - 2)
    d = [guard.observe(step + i, metrics(math.nan)) for i in range(3)][-1]
    assert d.rollback and d.first_anomalous == step  # the first of the non-finite run
    guard = make_guard()
    step = warm(guard)
    d = guard.observe(step, {**metrics(math.nan), "failed": 1})  # a training step that raised
    assert d.rollback and d.first_anomalous == step - 1  # its weights came out of the step before
    guard = make_guard()
    step = warm(guard)
    guard.observe(step, metrics(noisy(step)))
    assert guard.blowup(step, "validation", 1).first_anomalous == step  # after step's update


# --- AMP ------------------------------------------------------------------------------------

def test_amp_scale_halving_repeatedly_collapses_and_rolls_back():
    guard = make_guard(amp_max_halvings=6, amp_halving_window_steps=100)
    step = warm(guard)
    scale, decisions = 1024.0, []
    for i in range(6):
        scale /= 2
        decisions.append(guard.observe(step + i, metrics(noisy(i), amp_scale=scale)))
    assert [d.action for d in decisions] == ["continue"] * 5 + ["rollback"]
    kinds = [e.kind for e in decisions[-1].events]
    assert "amp_collapse" in kinds and "rollback" in kinds
    assert decisions[-1].events[0].detail["reason"] == "repeated_halving"


def test_amp_scale_below_minimum_collapses():
    monitor = AmpScaleMonitor(min_scale=1.0, max_halvings=10, window_steps=1000)
    assert monitor.update(1, 2.0) is None
    assert monitor.update(2, 0.5)["reason"] == "below_min"
    assert monitor.update(3, math.nan)["reason"] == "below_min"


def test_amp_startup_calibration_and_growth_do_not_collapse():
    monitor = AmpScaleMonitor.from_config(StabilityConfig())
    scale, step = 65536.0, 0
    for _ in range(7):  # a fresh GradScaler backing off to a workable scale
        scale /= 2
        step += 1
        assert monitor.update(step, scale) is None
    for _ in range(5):  # growth, then occasional overflow: the halving count restarts
        scale *= 2
        step += 2000
        assert monitor.update(step, scale) is None
        scale /= 2
        assert monitor.update(step + 1, scale) is None
    for _ in range(9):  # halvings spread beyond the window do not add up
        scale /= 2
        step += 1000
        assert monitor.update(step, scale) is None


# --- rollbacks, LR and cadence ------------------------------------------------------------

def test_guard_after_rollback_backs_off_lr_and_enforces_the_budget():
    guard = make_guard(max_rollbacks=2, rollback_window_steps=1000, lr_backoff=0.5, confirm_steps=2)
    step = warm(guard)
    guard.observe(step, metrics(60.0))
    assert guard.observe(step + 1, metrics(61.0)).action == "rollback"
    assert guard.monitor.detectors["loss_1"].suspicious_run == 2
    assert guard.after_rollback(step + 1, restored_step=20) == 0.5
    assert guard.monitor.detectors["loss_1"].suspicious_run == 0
    d = guard.observe(21, metrics(27.5))
    assert [e.kind for e in d.events] == ["lr_backoff"] and d.events[0].value == 0.5
    assert d.events[0].detail["restored_step"] == 20
    assert guard.after_rollback(40, restored_step=20) == 0.25
    with pytest.raises(TooManyRollbacksError, match="3 rollbacks within 1000 steps") as err:
        guard.after_rollback(45, restored_step=20)
    assert non_retryable_cause(err.value) is err.value
    assert guard.ledger.total == 2 and guard.lr_multiplier(46) == 0.25


def test_the_ledger_is_not_part_of_the_guards_state():
    # Restoring a checkpoint's guard state must not restore an older budget or backoff.
    guard = make_guard(lr_backoff=0.5)
    warm(guard)
    saved = guard.state_dict()
    guard.after_rollback(31, restored_step=20)
    guard.load_state_dict(saved)
    assert guard.ledger.total == 1 and guard.lr_multiplier(21) == 0.5


def test_lr_multiplier_warms_back_linearly():
    guard = make_guard(lr_backoff=0.5, warmup_steps_after_rollback=100)
    assert guard.lr_multiplier(10) == 1.0
    guard.after_rollback(300, restored_step=200)
    assert guard.lr_multiplier(200) == pytest.approx(0.05)
    assert guard.lr_multiplier(250) == pytest.approx(0.5 * 0.55)
    assert guard.lr_multiplier(300) == guard.lr_multiplier(10_000) == pytest.approx(0.5)
    assert make_guard(lr_backoff=0.5).lr_multiplier(5) == 1.0


def test_cadence_unstable_after_an_event_normal_after_calm_steps():
    cadence = CheckpointCadence(save_step=500, unstable_save_step=100, calm_steps=300)
    assert cadence.should_save(500) and not cadence.should_save(600) and cadence.interval == 500
    assert cadence.mark_unstable(620)
    assert not cadence.mark_unstable(650)  # already unstable
    assert cadence.should_save(700) and cadence.interval == 100
    assert cadence.should_save(900)
    assert cadence.advance(950)  # 300 steps since the last event at 650
    assert not cadence.should_save(1100) and cadence.should_save(1500)
    cadence.mark_unstable(2000)
    assert cadence.unstable_at(1900)  # steps before the event (after a rollback) stay unstable


def test_guard_reports_cadence_transitions():
    guard = make_guard(confirm_steps=1, calm_steps=50, unstable_save_step=10)
    step = warm(guard)
    assert [e.kind for e in guard.observe(step, metrics(60.0)).events] == ["spike", "rollback", "cadence_unstable"]
    guard.after_rollback(step, restored_step=step - 5)
    kinds = []
    for s in range(step - 4, step + 60):
        kinds += [e.kind for e in guard.observe(s, metrics(noisy(s))).events]
        if s == step:
            assert guard.save_due(step + 10 - step % 10)
    assert kinds == ["lr_backoff", "cadence_calm"]
    assert guard.cadence.interval == 500


def test_disabled_guard_continues_but_still_reports_nonfinite():
    guard = make_guard(enabled=False, max_consecutive_nonfinite=1, confirm_steps=1)
    step = warm(guard)
    assert guard.observe(step, metrics(500.0)).events == []
    d = guard.observe(step + 1, metrics(math.nan, amp_scale=0.0))
    assert d.action == "continue" and [e.kind for e in d.events] == ["nonfinite"]
    assert guard.save_due(500) and not guard.save_due(100)
    assert guard.checkpoint_verdict().kind == "unjudged"


# --- resume ---------------------------------------------------------------------------------

def test_state_dict_round_trip_gives_identical_decisions():
    cfg = StabilityConfig(window=20, min_history=10, confirm_steps=2, max_consecutive_nonfinite=3,
                          warmup_steps_after_rollback=10, unstable_save_step=7, calm_steps=40, max_rollbacks=100)
    values = curves.generator_per_step(steps_per_epoch=4)

    def feed(guard, step):
        v = values[step]
        m = metrics(v, loss_mel=0.6 * v, loss_kl=1.5 + 0.05 * (step % 5), amp_scale=2.0 ** (10 - step % 3))
        if step % 37 == 0:
            m["loss_1"] = math.nan
        d = guard.observe(step, m)
        if d.action == "rollback":
            guard.after_rollback(step, restored_step=step - 3, first_anomalous=d.first_anomalous)
        return ([e.to_dict() for e in d.events], d.action, d.first_anomalous, guard.save_due(step),
                guard.checkpoint_verdict(), guard.settled(step - 5), guard.lr_multiplier(step))

    original = StabilityGuard(cfg, save_step=50)
    for step in range(340):
        feed(original, step)
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    resumed = StabilityGuard(cfg, save_step=50)
    resumed.load_state_dict(state)
    resumed.ledger.load_state_dict(json.loads(json.dumps(original.ledger.state_dict(), allow_nan=False)))
    a = [feed(original, s) for s in range(340, 560)]
    b = [feed(resumed, s) for s in range(340, 560)]
    assert a == b
    assert any(action == "rollback" for _, action, *_ in a)  # the comparison covers a rollback
