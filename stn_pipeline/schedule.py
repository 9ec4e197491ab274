"""The run schedule: warm-up, weight/hyper cycles, learning-rate decay and early stopping.

Plain Python state (no TensorFlow), so the training loop stays readable and the state is easy to
save. As in the original STN, whose warm-up loop is separate from its main loop, warm-up epochs
stay outside the schedule: only tuning epochs (those after `warmup_epochs`) are recorded here, can
be the best state, enter the decay window and count towards patience.

The decay rule is the original's non-monotone one: at the end of a tuning epoch with validation
loss v, decay when more than `nonmono` earlier tuning-epoch losses are recorded and v exceeds the
best of all of them but the last `nonmono`; only then is v recorded.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Schedule", "ScheduleConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """When to take which step, and when to stop.

    Attributes:
      epochs: maximum number of epochs (weight-step passes over the training split), warm-up
        included.
      warmup_epochs: epochs of weight steps only before the first hyper step; outside the
        schedule (never best, no decay, no patience).
      train_steps: weight steps per cycle.
      hyper_steps: hyper steps per cycle (0 turns tuning off).
      nonmono: window of the non-monotone decay rule, in tuning epochs (0 disables decay).
      decay_factor: learning-rate multiplier at each decay.
      patience: stop after this many tuning epochs without a better validation loss (0
        disables).
      min_lr: stop once the weight learning rate falls below this.
    """

    epochs: int = 20
    warmup_epochs: int = 1
    train_steps: int = 2
    hyper_steps: int = 1
    nonmono: int = 5
    decay_factor: float = 0.1
    patience: int = 10
    min_lr: float = 1e-5

    def __post_init__(self):
        for name in ("epochs", "train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScheduleConfig: {name} must be >= 1, received "
                                 f"{getattr(self, name)}.")
        for name in ("warmup_epochs", "hyper_steps", "nonmono", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"ScheduleConfig: {name} must be >= 0, received "
                                 f"{getattr(self, name)}.")
        if not 0 < self.decay_factor < 1:
            raise ValueError(f"ScheduleConfig: decay_factor must be in (0, 1), received "
                             f"{self.decay_factor}.")

    def inactive_settings(self) -> list[str]:
        """One message per setting that cannot take effect within `epochs`.

        The first decay can come at the end of tuning epoch nonmono + 2 (nonmono + 1 earlier
        losses must be recorded); the first patience stop at tuning epoch patience + 1.
        """
        tuning_epochs = self.epochs - self.warmup_epochs
        if tuning_epochs < 1:
            return [f"--warmup_epochs={self.warmup_epochs} leaves no tuning epoch within "
                    f"--epochs={self.epochs}: no epoch can be the best state"]
        messages = []
        if self.nonmono and tuning_epochs < self.nonmono + 2:
            messages.append(f"--nonmono={self.nonmono} cannot decay the learning rate: it needs "
                            f"{self.nonmono + 2} tuning epochs, --epochs={self.epochs} minus "
                            f"--warmup_epochs={self.warmup_epochs} gives {tuning_epochs}")
        if self.patience and tuning_epochs < self.patience + 1:
            messages.append(f"--patience={self.patience} cannot stop the run: it needs "
                            f"{self.patience + 1} tuning epochs, --epochs={self.epochs} minus "
                            f"--warmup_epochs={self.warmup_epochs} gives {tuning_epochs}")
        return messages


@dataclasses.dataclass
class Schedule:
    """Bookkeeping of the tuning epochs: validation losses, best epoch, decay, early stopping.

    Attributes:
      config: the settings.
      val_losses: validation loss of every tuning epoch so far, in order.
      best_epoch: index into `val_losses` of the best one (-1: none yet).
      stop_reason: set once training should stop (patience or minimum learning rate).
      lifted_at: the number of tuning epochs recorded when `lift` last lifted a stop (-1: never).
    """

    config: ScheduleConfig
    val_losses: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = -1
    stop_reason: str = ""
    lifted_at: int = -1

    def state(self) -> dict:
        """Everything but the config, as JSON values: `Schedule(config, **state)` carries on."""
        return {"val_losses": list(self.val_losses), "best_epoch": self.best_epoch,
                "stop_reason": self.stop_reason, "lifted_at": self.lifted_at}

    def lift(self) -> None:
        """Trains on past an early stop (`stn-train --extend`): patience counts tuning epochs
        without improvement from here (or from a later best), and a rate already below
        `min_lr` stops the run again only when it decays once more."""
        self.stop_reason = ""
        self.lifted_at = len(self.val_losses)

    @property
    def best_loss(self) -> float:
        return self.val_losses[self.best_epoch] if self.best_epoch >= 0 else float("inf")

    def end_epoch(self, val_loss: float, learning_rate: float) -> tuple[bool, float]:
        """Records a tuning epoch's validation loss.

        Returns:
          (improved, learning rate for the next epoch).
        """
        improved = val_loss < self.best_loss
        window = self.config.nonmono
        earlier = self.val_losses
        decayed = bool(window and len(earlier) > window and val_loss > min(earlier[:-window]))
        if decayed:
            learning_rate *= self.config.decay_factor
        earlier.append(val_loss)
        if improved:
            self.best_epoch = len(earlier) - 1
        patience = self.config.patience
        counted_from = max(self.best_epoch, self.lifted_at - 1)
        if patience and len(earlier) - 1 - counted_from >= patience:
            self.stop_reason = f"no improvement for {patience} tuning epochs"
        elif learning_rate < self.config.min_lr and (decayed or self.lifted_at < 0):
            self.stop_reason = f"learning rate {learning_rate:.2e} < {self.config.min_lr:.0e}"
        return improved, learning_rate
