"""Image classifiers: uint8 input preparation and per-example augmentation hyperparameters.

`StnImageClassifier` normalises raw uint8 images inside the graph and, in weight steps, applies
whichever augmentation hyperparameters the model declares, each example at its own strength:

    uint8 -> [0, 1] -> colour jitter (brightness, contrast, saturation, hue) -> normalise
          -> cutout (cutout_length, cutout_holes) -> input_dropout -> input_scale -> pixel_drop

and the loss-term hyperparameters (`loss_terms.LOSS_TERM_HPARAMS`) in the weight-step loss only.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from stn_pipeline import augment
from stn_pipeline.hparams import BOUNDED, DISCRETE, HParam, HParamSample
from stn_pipeline.layers import StnConv2D, StnDense
from stn_pipeline.loss_terms import LOSS_TERM_HPARAMS, layers_l2_penalty, smoothed_cross_entropy
from stn_pipeline.models.base import StnClassifier
from stn_pipeline.plain_layers import LayerFactory, PlainConv2D, PlainDense

__all__ = ["AUGMENTATION_HPARAMS", "StnImageClassifier", "augmentation_hparams", "dropout_hparam",
           "max_cutout_holes"]

_JITTER = ("brightness", "contrast", "saturation", "hue")


def dropout_hparam(name: str, init: float = 0.05, maximum: float = 0.9) -> HParam:
    """A drop probability in (0, maximum); ORIG caps it at 0.9 for stability."""
    return HParam(name, 0.0, maximum, init, kind=BOUNDED)


# The augmentation hyperparameters of the STN paper's CIFAR AlexNet, ranges and inits of ORIG.
AUGMENTATION_HPARAMS = {
    "hue": HParam("hue", 0.0, 0.5, 0.05),
    "contrast": HParam("contrast", 0.0, 1.0, 0.05),
    "saturation": HParam("saturation", 0.0, 1.0, 0.05),
    "brightness": HParam("brightness", 0.0, 1.0, 0.05),
    "input_dropout": HParam("input_dropout", 0.0, 1.0, 0.05),
    "input_scale": HParam("input_scale", 0.0, 0.3, 0.05),
    "cutout_length": HParam("cutout_length", 0.0, 24.0, 4.0, kind=DISCRETE),
    "cutout_holes": HParam("cutout_holes", 0.0, 4.0, 1.0, kind=DISCRETE),
    "pixel_drop": HParam("pixel_drop", 0.0, 0.75, 0.05),
}


def augmentation_hparams(names: Sequence[str]) -> list[HParam]:
    """The declarations of the named augmentation hyperparameters."""
    unknown = [n for n in names if n not in AUGMENTATION_HPARAMS]
    if unknown:
        raise ValueError(f"Unknown augmentation hyperparameters {unknown}; known: "
                         f"{sorted(AUGMENTATION_HPARAMS)}.")
    return [AUGMENTATION_HPARAMS[n] for n in names]


class StnImageClassifier(StnClassifier):
    """Base of image classifiers: takes raw uint8 [B, H, W, C] images.

    Subclasses implement `__call__(normalised_images, sample, training, seed)`, build their
    layers through `self.layers` (STN or plain) and name the hyperparameters their network
    applies (`network_hparams`). `hparams` are all the hyperparameters that act, tuned and fixed;
    `layers` (default: STN layers gated by all of them) says how many are tuned. Every declared
    hyperparameter must act: on the network, on the data as one of `AUGMENTATION_HPARAMS`, or on
    the weight-step loss as one of `LOSS_TERM_HPARAMS`; construction fails otherwise, naming it.
    """

    def __init__(self, image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 hparams: Sequence[HParam], network_hparams: Sequence[str] = (),
                 layers: LayerFactory | None = None, name: str | None = None):
        super().__init__(name=name)
        self.layers = layers or LayerFactory(num_hparams=len(hparams))
        if len(image_shape) != 3 or len(mean) != image_shape[-1] or len(std) != image_shape[-1]:
            raise ValueError(f"{type(self).__name__}: image_shape must be (H, W, C) with C means "
                             f"and stds, received {tuple(image_shape)}, {mean}, {std}.")
        self.image_shape = tuple(int(d) for d in image_shape)
        self.mean = tf.constant(mean, tf.float32)
        self.std = tf.constant(std, tf.float32)
        self.hparam_names = tuple(spec.name for spec in hparams)
        _check_hparams(type(self).__name__, hparams, network_hparams, self.image_shape[-1])
        self.max_cutout_holes = max_cutout_holes(hparams)

    def preprocess(self, inputs: tf.Tensor) -> tf.Tensor:
        """uint8 images -> per-channel standardised float32."""
        return (tf.cast(inputs, tf.float32) - self.mean) / self.std

    def augment(self, inputs, targets, sample: HParamSample, seed):
        has = set(self.hparam_names).__contains__
        seeds = tf.random.experimental.stateless_split(seed, 5)
        images = tf.cast(inputs, tf.float32) / 255.0
        if any(has(n) for n in _JITTER):
            strength = lambda n: sample[n] if has(n) else tf.zeros_like(sample.values[:, 0])  # noqa: E731
            images = augment.color_jitter(images, *[strength(n) for n in _JITTER], seeds[0])
        images = (images * 255.0 - self.mean) / self.std
        if has("cutout_length"):  # cutout_holes too: the constructor checks it
            images = augment.cutout(images, sample["cutout_length"], sample["cutout_holes"],
                                    self.max_cutout_holes, seeds[1])
        if has("input_dropout"):
            images = augment.input_dropout(images, sample["input_dropout"], seeds[2])
        if has("input_scale"):
            images = augment.input_scale(images, sample["input_scale"], seeds[3])
        if has("pixel_drop"):
            images = augment.pixel_drop(images, 1.0 - sample["pixel_drop"], seeds[4])
        return images, targets

    def training_loss(self, targets, outputs, sample: HParamSample):
        """Cross entropy, label-smoothed and plus weight decay where those are declared."""
        if "label_smoothing" in self.hparam_names:
            loss = smoothed_cross_entropy(targets, outputs, sample["label_smoothing"])
        else:
            loss = self.loss(targets, outputs)
        if "weight_decay" in self.hparam_names:
            layers = [m for m in self.submodules
                      if isinstance(m, (StnDense, StnConv2D, PlainDense, PlainConv2D))]
            loss += layers_l2_penalty(sample["weight_decay"], layers, sample.hnet_input)
        return loss


def max_cutout_holes(specs: Sequence[HParam]) -> int:
    """The most cutout holes the declared range allows: floor of values < maximum."""
    for spec in specs:
        if spec.name == "cutout_holes":
            return math.ceil(spec.maximum) - 1
    return 0


def _check_hparams(model: str, specs: Sequence[HParam], network_hparams: Sequence[str],
                   channels: int) -> None:
    """Raises ValueError, naming it, for a hyperparameter that would silently act on nothing."""
    names = [spec.name for spec in specs]
    missing = [n for n in network_hparams if n not in names]
    if missing:
        raise ValueError(f"{model}: its network applies hyperparameters {missing}; declare them.")
    idle = [n for n in names if n not in network_hparams and n not in AUGMENTATION_HPARAMS
            and n not in LOSS_TERM_HPARAMS]
    if idle:
        raise ValueError(f"{model}: hyperparameters {idle} act on nothing: its network applies "
                         f"{list(network_hparams)}, the data {sorted(AUGMENTATION_HPARAMS)}, the "
                         f"loss {sorted(LOSS_TERM_HPARAMS)}.")
    cutout = [n for n in ("cutout_length", "cutout_holes") if n in names]
    if len(cutout) == 1:
        raise ValueError(f"{model}: {cutout[0]} needs cutout_length and cutout_holes declared "
                         "together (cutout cuts holes of a length).")
    if cutout and max_cutout_holes(specs) < 1:
        raise ValueError(f"{model}: cutout_holes needs a maximum above 1, or no hole is ever cut.")
    colour_only = [n for n in ("saturation", "hue") if n in names]
    if colour_only and channels != 3:
        raise ValueError(f"{model}: hyperparameters {colour_only} act on 3-channel (RGB) images "
                         f"only; these images have {channels} channel(s).")
