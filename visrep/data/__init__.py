"""Data layer: datasets, transforms (per-sample and batched) and loaders.

Datasets live in :mod:`~visrep.data.fashion_mnist`, :mod:`~visrep.data.folders`,
:mod:`~visrep.data.procedural`, :mod:`~visrep.data.captions` and (shared pieces, CIFAR)
:mod:`~visrep.data.datasets`; :mod:`~visrep.data.registry` names them all (:func:`build_dataset`);
:mod:`~visrep.data.splits` assembles a run's splits. Masking collators live in :mod:`visrep.data.masks`.
"""
from .captions import CaptionFiles, TarCaptions, TemplateCaptions, caption_csv, coco_captions
from .datasets import (
    DEBIAN_FASHION_MNIST_DIR,
    DatasetNotFoundError,
    InMemory,
    TensorImageDataset,
    in_memory,
    load_cifar,
)
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, IDXFormatError, load_fashion_mnist, read_idx
from .folders import SafeImageFolder, UnreadableImageWarning
from .loaders import (
    InMemoryBatches,
    ResumableSampler,
    build_loader,
    dist_info,
    epoch_permutation,
    set_epoch,
    shard_indices,
)
from .procedural import ProceduralShapes
from .registry import DATASET_NAMES, DATASETS, DatasetEntry, build_dataset, dataset_key
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASET_STATS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_normalize,
    batch_random_resized_crop,
    batch_resize_center_crop,
    dataset_stats,
    eval_transform,
    sample_rrc_boxes,
    train_transform,
)

__all__ = [
    "CaptionFiles", "TarCaptions", "TemplateCaptions", "caption_csv", "coco_captions",
    "DATASET_NAMES", "DATASETS", "DatasetEntry", "InMemory", "dataset_key", "in_memory",
    "DEBIAN_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "DatasetNotFoundError", "FashionMNIST",
    "IDXFormatError", "ProceduralShapes", "SafeImageFolder", "TensorImageDataset", "UnreadableImageWarning",
    "build_dataset", "load_cifar", "load_fashion_mnist", "read_idx",
    "InMemoryBatches", "ResumableSampler", "build_loader", "dist_info", "epoch_permutation", "set_epoch",
    "shard_indices",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DATASET_STATS", "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "batch_normalize", "batch_random_resized_crop", "batch_resize_center_crop", "dataset_stats",
    "eval_transform", "sample_rrc_boxes", "train_transform",
]
