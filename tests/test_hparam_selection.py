"""Tests for stn_pipeline.hparam_selection: parsing --hparams=NAME[=INIT],..."""

import pytest

from stn_pipeline.hparam_selection import select_hparams
from stn_pipeline.hparams import DISCRETE, HParam

OWN = [HParam("dropout0", 0.0, 0.9, 0.05), HParam("cutout_holes", 0.0, 4.0, 2.7, kind=DISCRETE),
       HParam("dropout1", 0.0, 0.9, 0.1)]
OPTIONAL = [HParam("weight_decay", 0.0, None, 1e-4, kind="positive"),
            HParam("label_smoothing", 0.0, 0.5, 0.05)]


def _select(text):
    return select_hparams(text, OWN, OPTIONAL)


def test_empty_selection_tunes_the_experiments_own_hyperparameters():
    selection = _select(" ")
    assert [s.name for s in selection.tuned] == ["dropout0", "cutout_holes", "dropout1"]
    assert selection.fixed == ()


def test_selected_names_keep_declaration_order_and_take_inits():
    selection = _select("label_smoothing, weight_decay=0.001,dropout0")
    assert [s.name for s in selection.tuned] == ["dropout0", "weight_decay", "label_smoothing"]
    assert [s.init for s in selection.tuned] == [0.05, 0.001, 0.05]
    # Unselected own ones are fixed at their init (discrete: floored); optional ones vanish.
    assert selection.fixed_values() == {"cutout_holes": 2.0, "dropout1": 0.1}


@pytest.mark.parametrize("text, match", [
    ("dropout9", r"--hparams: unknown hyperparameter 'dropout9'; available: dropout0, "
                 r"cutout_holes, dropout1, weight_decay, label_smoothing\.$"),
    ("dropout0,dropout0=0.1", r"'dropout0' is given twice"),
    ("dropout0=abc", r"'dropout0=abc' is not NAME or NAME=number"),
    ("label_smoothing=0.7", r"--hparams: .*label_smoothing.*init must lie strictly inside"),
])
def test_bad_selections_get_one_line_errors(text, match):
    with pytest.raises(ValueError, match=match) as error:
        _select(text)
    assert "\n" not in str(error.value)
