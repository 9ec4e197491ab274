"""`--hparams=NAME[=INIT],...`: which of an experiment's hyperparameters are tuned.

Selected hyperparameters are tuned (and are the hypernetwork's inputs), with the given initial
values where an entry has one; the experiment's other hyperparameters stay fixed at their declared
initial values. Optional ones (the loss terms weight_decay and label_smoothing) exist only when
selected: unselected, they are left out, not fixed at their init, so they change no default run.
An empty selection tunes the experiment's own hyperparameters. Columns keep the declaration order
(own, then optional), so a set gives the same network whatever order the flag lists it in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from stn_pipeline.hparams import DISCRETE, HParam

__all__ = ["HParamSelection", "select_hparams"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HParamSelection:
    """An experiment's hyperparameters split into tuned and fixed ones.

    Attributes:
      tuned: the tuned declarations (inits applied), in declaration order.
      fixed: the others, in declaration order.
    """

    tuned: tuple[HParam, ...]
    fixed: tuple[HParam, ...]

    def fixed_values(self) -> dict[str, float]:
        """The constant value of each fixed hyperparameter (its init; floored if discrete)."""
        return {spec.name: float(math.floor(spec.init)) if spec.kind == DISCRETE else spec.init
                for spec in self.fixed}


def select_hparams(text: str, own: Sequence[HParam], optional: Sequence[HParam] = (),
                   flag: str = "--hparams") -> HParamSelection:
    """Parses `text` ("name[=init],...") against an experiment's declarations.

    Args:
      text: the flag's value.
      own: the experiment's hyperparameters (fixed at their init unless selected).
      optional: hyperparameters that exist only when selected.
      flag: the flag named in errors.

    Raises:
      ValueError: one line naming `flag`, for an unknown or repeated name (listing the available
        ones), an init that is not a number, or an init outside the hyperparameter's range.
    """
    available = [*own, *optional]
    by_name = {spec.name: spec for spec in available}
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        return HParamSelection(tuned=tuple(own), fixed=())
    chosen: dict[str, HParam] = {}
    for entry in entries:
        name, has_init, value = (part.strip() for part in entry.partition("="))
        if name not in by_name:
            raise ValueError(f"{flag}: unknown hyperparameter {name!r}; available: "
                             f"{', '.join(by_name)}.")
        if name in chosen:
            raise ValueError(f"{flag}: {name!r} is given twice.")
        spec = by_name[name]
        if has_init:
            try:
                init = float(value)
            except ValueError:
                raise ValueError(f"{flag}: {entry!r} is not NAME or NAME=number.") from None
            try:
                spec = dataclasses.replace(spec, init=init)
            except ValueError as error:
                raise ValueError(f"{flag}: {error}") from None
        chosen[name] = spec
    return HParamSelection(tuned=tuple(chosen[s.name] for s in available if s.name in chosen),
                           fixed=tuple(s for s in own if s.name not in chosen))
