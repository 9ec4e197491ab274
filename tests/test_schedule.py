"""Tests for stn_pipeline.schedule: the original non-monotone decay, early stopping, settings that
cannot act, and config validation. Expected decays are worked out by hand in the comments."""

import pytest

from stn_pipeline.schedule import Schedule, ScheduleConfig


def _decayed_epochs(losses, nonmono, patience=0):
    """Feeds tuning-epoch losses; returns the 1-based epochs after which the rate was halved."""
    schedule = Schedule(ScheduleConfig(epochs=100, nonmono=nonmono, patience=patience,
                                       decay_factor=0.5, min_lr=0.0))
    learning_rate, decayed = 1.0, []
    for epoch, loss in enumerate(losses, start=1):
        _, new_rate = schedule.end_epoch(loss, learning_rate)
        if new_rate != learning_rate:
            assert new_rate == learning_rate * 0.5
            decayed.append(epoch)
        learning_rate = new_rate
    return decayed


def test_first_decay_needs_more_than_nonmono_earlier_losses():
    # nonmono=1. Epoch 2: one earlier loss, not more than 1: no decay although 2.0 > 1.0.
    # Epoch 3: earlier [1, 2], all but the last one: [1]; 3 > 1: decay.
    assert _decayed_epochs([1.0, 2.0, 3.0], nonmono=1) == [3]


def test_the_window_excludes_the_last_nonmono_earlier_losses():
    # nonmono=2. Epoch 3: 2 earlier, not more than 2. Epoch 4: earlier [1, .5, .9], all but the
    # last two: [1]; 0.8 < 1: no decay (0.5 sits inside the window).
    assert _decayed_epochs([1.0, 0.5, 0.9, 0.8], nonmono=2) == []


def test_a_longer_sequence():
    # nonmono=2; min of the earlier losses but the last two, and the verdict:
    # e4 .7 vs min[1]=1 no; e5 .75 vs min[1,.8]=.8 no; e6 .85 vs .8 yes; e7 .6 vs .7 no;
    # e8 .65 vs .7 no; e9 .9 vs .7 yes; e10 .95 vs .6 yes; e11 .5 vs .6 no.
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.85, 0.6, 0.65, 0.9, 0.95, 0.5]
    assert _decayed_epochs(losses, nonmono=2) == [6, 9, 10]


def test_a_tie_with_the_old_best_does_not_decay():
    # nonmono=2. Epoch 4: earlier but last two: [1, .8] -> .8; 0.8 is not above it. Epoch 5:
    # earlier but last two [1, .8, .9] -> .8; 0.80001 > .8: decay.
    assert _decayed_epochs([1.0, 0.8, 0.9, 0.8, 0.80001], nonmono=2) == [5]


def test_monotone_improvement_never_decays_and_nonmono_zero_disables_it():
    assert _decayed_epochs([1.0 / k for k in range(1, 30)], nonmono=1) == []
    assert _decayed_epochs([1.0, 2.0, 3.0, 4.0, 5.0], nonmono=0) == []


def test_improved_and_best_epoch_track_the_minimum():
    schedule = Schedule(ScheduleConfig(epochs=100, nonmono=0, patience=0))
    assert schedule.best_loss == float("inf") and schedule.best_epoch == -1
    flags = [schedule.end_epoch(loss, 0.1)[0] for loss in [3.0, 2.0, 2.5, 2.0, 1.0, 1.5]]
    assert flags == [True, True, False, False, True, False]  # a tie is no improvement
    assert schedule.best_epoch == 4 and schedule.best_loss == 1.0


def _stopped_after(losses, **settings):
    schedule = Schedule(ScheduleConfig(epochs=100, **settings))
    for epoch, loss in enumerate(losses, start=1):
        schedule.end_epoch(loss, 0.01)
        if schedule.stop_reason:
            return epoch, schedule.stop_reason
    return None, ""


def test_patience_counts_tuning_epochs_without_improvement():
    # Best at epoch 2; epochs 3, 4, 5 do not improve: stop after epoch 5.
    epoch, reason = _stopped_after([1.0, 0.5, 0.6, 0.7, 0.55, 0.8, 0.9], nonmono=0, patience=3)
    assert epoch == 5 and "no improvement for 3 tuning epochs" in reason
    # Best at 3, then at 5: the count restarts; epochs 6 and 7 do not improve.
    epoch, _ = _stopped_after([1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.86, 0.1], nonmono=0, patience=2)
    assert epoch == 7


def test_min_lr_stops_once_the_rate_falls_below_it():
    schedule = Schedule(ScheduleConfig(epochs=100, nonmono=1, patience=0, min_lr=1e-3))
    rates = []
    for loss in [1.0, 2.0, 2.0, 2.0]:
        rates.append(schedule.end_epoch(loss, rates[-1] if rates else 0.1)[1])
        if schedule.stop_reason:
            break
    # Epoch 3 decays 0.1 -> 0.01, epoch 4 to 1e-3 (not below), no fifth epoch was fed.
    assert rates == pytest.approx([0.1, 0.1, 0.01, 1e-3]) and schedule.stop_reason == ""
    schedule.end_epoch(2.0, 1e-3)
    assert "learning rate 1.00e-04" in schedule.stop_reason


@pytest.mark.parametrize("settings, flags", [
    # 20 epochs, 1 warm-up: 19 tuning epochs. The first decay comes at tuning epoch nonmono + 2,
    # the first patience stop at tuning epoch patience + 1.
    (dict(epochs=20, warmup_epochs=1, nonmono=60, patience=75), ["--nonmono=60", "--patience=75"]),
    (dict(epochs=20, warmup_epochs=1, nonmono=17, patience=18), []),
    (dict(epochs=20, warmup_epochs=1, nonmono=18, patience=19), ["--nonmono=18", "--patience=19"]),
    (dict(epochs=20, warmup_epochs=1, nonmono=0, patience=0), []),
    (dict(epochs=20, warmup_epochs=5, nonmono=5, patience=10), []),
    (dict(epochs=3, warmup_epochs=3, nonmono=0, patience=0), ["--warmup_epochs=3"]),
])
def test_inactive_settings_are_named(settings, flags):
    messages = ScheduleConfig(**settings).inactive_settings()
    assert len(messages) == len(flags)
    for message, flag in zip(messages, flags):
        assert message.startswith(flag)


def test_defaults_act_within_the_default_budget():
    assert ScheduleConfig().inactive_settings() == []


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
