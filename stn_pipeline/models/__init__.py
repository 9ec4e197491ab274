"""Models trained by `StnTrainer`: the `StnModel` contract and the paper's networks."""

from stn_pipeline.models.alexnet import CifarAlexNet
from stn_pipeline.models.alexnet import alexnet_hparams
from stn_pipeline.models.base import StnClassifier
from stn_pipeline.models.base import StnModel
from stn_pipeline.models.base import StnRegressor
from stn_pipeline.models.cifar_cnn import CifarCnn
from stn_pipeline.models.cifar_cnn import cifar_cnn_hparams
from stn_pipeline.models.image import StnImageClassifier
from stn_pipeline.models.relu_toy import ReluToy

__all__ = ["CifarAlexNet", "CifarCnn", "ReluToy", "StnClassifier", "StnImageClassifier", "StnModel",
           "StnRegressor", "alexnet_hparams", "cifar_cnn_hparams"]
