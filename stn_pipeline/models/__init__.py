"""Models trained by `StnTrainer`: the `StnModel` contract and the paper's networks."""

from stn_pipeline.models.base import StnClassifier
from stn_pipeline.models.base import StnModel
from stn_pipeline.models.base import StnRegressor
from stn_pipeline.models.relu_toy import ReluToy

__all__ = ["ReluToy", "StnClassifier", "StnModel", "StnRegressor"]
