"""Datasets held in memory as uint8 tensors, batched augmentation, deterministic batching."""
from .dataset import ImageDataset
from .datasets import DATASETS, default_data_root, load_dataset
from .split import split_train_val, stratified_split
from .loader import TrainBatches, derive_seed, eval_batches
from .transforms import AUGMENTATIONS, augment, inception_crop, random_crop_flip, to_model_input

__all__ = ["ImageDataset", "DATASETS", "load_dataset", "default_data_root", "TrainBatches", "eval_batches",
           "derive_seed", "split_train_val", "stratified_split",
           "AUGMENTATIONS", "augment", "inception_crop", "random_crop_flip", "to_model_input"]
