"""Tests for stn_pipeline.schedule: non-monotone decay, early stopping and config validation."""

import pytest

from stn_pipeline.schedule import Schedule, ScheduleConfig


def _run(schedule, losses, learning_rate):
    """Feeds the losses one epoch at a time; returns per-epoch (improved, lr, stop_reason)."""
    history = []
    for loss in losses:
        improved, learning_rate = schedule.end_epoch(loss, learning_rate)
        history.append((improved, learning_rate, schedule.stop_reason))
        if schedule.stop_reason:
            break
    return history


def _reference_decays(losses, nonmono):
    """Epochs (1-based) at which the rule fires: more than `nonmono` epochs logged, and the latest
    loss above the best of all epochs except the last `nonmono` (the latest included)."""
    fired = []
    for n in range(1, len(losses) + 1):
        if n > nonmono and losses[n - 1] > min(losses[:n - nonmono]):
            fired.append(n)
    return fired


def test_no_decay_before_nonmono_plus_one_epochs():
    config = ScheduleConfig(epochs=100, nonmono=3, patience=0, decay_factor=0.5, min_lr=0.0)
    schedule = Schedule(config)
    # Every epoch after the first is worse, yet the first three epochs never decay.
    history = _run(schedule, [1.0, 2.0, 2.0, 2.0], learning_rate=0.1)
    assert [lr for _, lr, _ in history[:3]] == [0.1, 0.1, 0.1]
    assert history[3][1] == pytest.approx(0.05)  # epoch nonmono + 1 = 4 fires
    assert _reference_decays([1.0, 2.0, 2.0, 2.0], 3) == [4]


def test_decay_follows_the_non_monotone_rule():
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.85, 0.6, 0.65, 0.9, 0.95, 0.5]
    nonmono = 2
    config = ScheduleConfig(epochs=100, nonmono=nonmono, patience=0, decay_factor=0.5, min_lr=0.0)
    history = _run(Schedule(config), losses, learning_rate=1.0)
    fired = _reference_decays(losses, nonmono)
    assert fired  # the sequence exercises the rule
    learning_rate = 1.0
    for epoch, (_, lr, _) in enumerate(history, start=1):
        if epoch in fired:
            learning_rate *= 0.5
        assert lr == pytest.approx(learning_rate), f"epoch {epoch}"


def test_a_tie_with_the_old_best_does_not_decay():
    config = ScheduleConfig(epochs=100, nonmono=2, patience=0, decay_factor=0.5, min_lr=0.0)
    history = _run(Schedule(config), [1.0, 0.8, 0.9, 0.8, 0.80001], learning_rate=1.0)
    # Epoch 4 equals the best of epochs 1-2 (0.8): no decay; epoch 5 exceeds it: decay.
    assert [lr for _, lr, _ in history] == [1.0, 1.0, 1.0, 1.0, 0.5]


def test_monotone_improvement_never_decays():
    config = ScheduleConfig(epochs=100, nonmono=1, patience=0, min_lr=0.0)
    history = _run(Schedule(config), [1.0 / k for k in range(1, 30)], learning_rate=0.01)
    assert all(lr == 0.01 for _, lr, _ in history)
    assert all(improved for improved, _, _ in history)


def test_nonmono_zero_disables_decay():
    config = ScheduleConfig(epochs=100, nonmono=0, patience=0, min_lr=0.0)
    history = _run(Schedule(config), [1.0, 2.0, 3.0, 4.0, 5.0], learning_rate=0.01)
    assert all(lr == 0.01 for _, lr, _ in history)


def test_improved_and_best_epoch_track_the_minimum():
    schedule = Schedule(ScheduleConfig(epochs=100, nonmono=0, patience=0))
    assert schedule.best_loss == float("inf") and schedule.best_epoch == -1
    losses = [3.0, 2.0, 2.5, 2.0, 1.0, 1.5]
    flags = [improved for improved, _, _ in _run(schedule, losses, learning_rate=0.1)]
    assert flags == [True, True, False, False, True, False]  # a tie is no improvement
    assert schedule.best_epoch == 4
    assert schedule.best_loss == 1.0
    assert schedule.val_losses == losses


def test_patience_stops_after_that_many_epochs_without_improvement():
    config = ScheduleConfig(epochs=100, nonmono=0, patience=3)
    schedule = Schedule(config)
    history = _run(schedule, [1.0, 0.5, 0.6, 0.7, 0.55, 0.8, 0.9], learning_rate=0.1)
    # Best at epoch 2; epochs 3, 4, 5 do not improve: stop after epoch 5, not earlier.
    assert len(history) == 5
    assert all(reason == "" for _, _, reason in history[:4])
    assert "no improvement for 3 epochs" in schedule.stop_reason


def test_patience_counter_resets_on_improvement():
    schedule = Schedule(ScheduleConfig(epochs=100, nonmono=0, patience=2))
    history = _run(schedule, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.86, 0.1], learning_rate=0.1)
    assert len(history) == 7  # best at epoch 5, then 2 epochs without improvement
    assert schedule.best_epoch == 4


def test_epochs_cap_stops():
    schedule = Schedule(ScheduleConfig(epochs=3, nonmono=0, patience=0))
    history = _run(schedule, [1.0, 0.9, 0.8, 0.7, 0.6], learning_rate=0.1)
    assert len(history) == 3
    assert [reason for _, _, reason in history[:2]] == ["", ""]
    assert "--epochs=3" in schedule.stop_reason


def test_min_lr_stops_once_the_rate_falls_below_it():
    config = ScheduleConfig(epochs=100, nonmono=1, patience=0, decay_factor=0.1, min_lr=1e-3)
    schedule = Schedule(config)
    history = _run(schedule, [1.0, 2.0, 2.0, 2.0], learning_rate=0.01)
    # Epoch 2 decays to 1e-3 (not below min_lr), epoch 3 decays to 1e-4 < 1e-3 and stops.
    assert history[1][1] == pytest.approx(1e-3) and history[1][2] == ""
    assert len(history) == 3
    assert history[2][1] == pytest.approx(1e-4)
    assert "learning rate" in schedule.stop_reason


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", -1), ("train_steps", 0),
    ("warmup_epochs", -1), ("hyper_steps", -1), ("nonmono", -2), ("patience", -1),
])
def test_invalid_counts_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be >= [01], received {value}"):
        ScheduleConfig(**{field: value})


@pytest.mark.parametrize("factor", [0.0, 1.0, 1.5, -0.1])
def test_decay_factor_must_lie_in_the_open_unit_interval(factor):
    with pytest.raises(ValueError, match=rf"decay_factor must be in \(0, 1\), received {factor}"):
        ScheduleConfig(decay_factor=factor)


def test_zero_is_allowed_where_documented():
    config = ScheduleConfig(warmup_epochs=0, hyper_steps=0, nonmono=0, patience=0)
    assert config.steps_of_cycle() == ["weight", "weight"]


def test_steps_of_cycle():
    assert ScheduleConfig(train_steps=3, hyper_steps=2).steps_of_cycle() == [
        "weight", "weight", "weight", "hyper", "hyper"]
