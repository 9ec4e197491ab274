"""Image-classification input pipelines for the STN experiments.

A dataset is named by a *spec string*:

* ``folder:<dir>`` -- an image folder laid out as ``<dir>/<split>/<class>/<image>.{jpg,jpeg,png}``,
  read with ``tfds.folder_dataset.ImageFolder``. The ``train`` split is required and the ``test``
  split is optional. This is the offline path (for example the shared CIFAR-10 JPEG copy).
* any other string -- a registered TFDS dataset (for example ``cifar10``) with ``image`` and
  ``label`` features. If it is not prepared yet, it is downloaded and prepared; when the download
  host cannot be reached this fails within seconds with a :class:`DataError`.

Modules, in data-flow order: ``folder`` and ``tfds_source`` (the two sources), ``source`` (what a
source provides, decoding), ``splitting`` (train / valid / test parts and their facts; the order
of the cut is explained there), ``statistics`` (normalisation, floored for constant channels) and
``pipelines`` (training and evaluation batches).

All datasets returned are unbatched ``(image, label)`` pairs: ``image`` is a ``uint8`` tensor of
shape ``(H, W, C)`` and ``label`` an ``int64`` scalar. Every function is deterministic: the same
arguments give the same examples in the same order, and :func:`train_batches` gives the same
batches for the same ``seed``.
"""

from stn_pipeline.data.errors import DataError
from stn_pipeline.data.folder import FOLDER_PREFIX, IMAGE_EXTENSIONS, folder_files
from stn_pipeline.data.pipelines import eval_batches, train_batches
from stn_pipeline.data.splitting import DatasetInfo, Splits, check_batch_size, load_splits
from stn_pipeline.data.statistics import STD_FLOOR, channel_stats

__all__ = [
    "DataError",
    "DatasetInfo",
    "Splits",
    "FOLDER_PREFIX",
    "IMAGE_EXTENSIONS",
    "STD_FLOOR",
    "load_splits",
    "train_batches",
    "eval_batches",
    "channel_stats",
    "check_batch_size",
    "folder_files",
]
