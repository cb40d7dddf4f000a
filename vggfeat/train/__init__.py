"""ImageNet training with the paper's recipes (Sect. 3.1): augmentation, SGD, checkpoints, DDP."""

from .augment import PCA_EIGVAL, PCA_EIGVEC, pca_lighting, train_transform
from .data import epoch_order, micro_batches, training_data
from .loop import TrainingError, TrainResult, build_model, train
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["PCA_EIGVAL", "PCA_EIGVEC", "Recipe", "RecipeError", "TrainResult", "TrainingError",
           "build_model", "epoch_order", "load_recipe", "micro_batches", "pca_lighting", "train",
           "train_transform", "training_data"]
