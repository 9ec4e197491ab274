"""The run schedule: warm-up, weight/hyper cycles, learning-rate decay and early stopping.

Plain Python state (no TensorFlow), so the training loop stays readable and the state is easy to
save. The decay rule is the original STN's non-monotone one: once more than `nonmono` epochs are
logged, decay when the latest validation loss exceeds the best of all but the last `nonmono`.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Schedule", "ScheduleConfig"]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """When to take which step, and when to stop.

    Attributes:
      epochs: maximum number of epochs (weight-step passes over the training split).
      warmup_epochs: epochs of weight steps only before the first hyper step.
      train_steps: weight steps per cycle.
      hyper_steps: hyper steps per cycle (0 turns tuning off).
      nonmono: window of the non-monotone decay rule, in epochs (0 disables decay).
      decay_factor: learning-rate multiplier at each decay.
      patience: stop after this many epochs without a better validation loss (0 disables).
      min_lr: stop once the weight learning rate falls below this.
    """

    epochs: int = 10
    warmup_epochs: int = 1
    train_steps: int = 2
    hyper_steps: int = 1
    nonmono: int = 60
    decay_factor: float = 0.1
    patience: int = 75
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

    def steps_of_cycle(self) -> list[str]:
        """The order of steps in one cycle: "weight" and "hyper" names."""
        return ["weight"] * self.train_steps + ["hyper"] * self.hyper_steps


@dataclasses.dataclass
class Schedule:
    """Per-epoch bookkeeping of validation losses, decay and early stopping."""

    config: ScheduleConfig
    val_losses: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = -1
    stop_reason: str = ""

    @property
    def best_loss(self) -> float:
        return self.val_losses[self.best_epoch] if self.best_epoch >= 0 else float("inf")

    def end_epoch(self, val_loss: float, learning_rate: float) -> tuple[bool, float]:
        """Records an epoch's validation loss.

        Returns:
          (improved, new learning rate). `stop_reason` is set once training should stop.
        """
        improved = val_loss < self.best_loss
        self.val_losses.append(val_loss)
        if improved:
            self.best_epoch = len(self.val_losses) - 1
        window = self.config.nonmono
        if window and len(self.val_losses) > window and val_loss > min(self.val_losses[:-window]):
            learning_rate *= self.config.decay_factor
        epochs_done = len(self.val_losses)
        if epochs_done >= self.config.epochs:
            self.stop_reason = f"reached --epochs={self.config.epochs}"
        elif self.config.patience and epochs_done - 1 - self.best_epoch >= self.config.patience:
            self.stop_reason = f"no improvement for {self.config.patience} epochs"
        elif learning_rate < self.config.min_lr:
            self.stop_reason = f"learning rate {learning_rate:.2e} < {self.config.min_lr:.0e}"
        return improved, learning_rate
