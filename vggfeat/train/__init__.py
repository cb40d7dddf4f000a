"""ImageNet training with the paper's recipes (Sect. 3.1): augmentation, SGD, checkpoints, DDP.

Other targets plug into the same loop through a :class:`Task`.
"""

from .augment import PCA_EIGVAL, PCA_EIGVEC, pca_lighting, train_transform
from .data import epoch_order, micro_batches, training_data
from .loop import TrainingError, TrainResult, train
from .model import build_model, make_optimizer, make_scheduler
from .recipe import Recipe, RecipeError, load_recipe, load_run_recipe
from .task import ImageClassification, Task

__all__ = ["PCA_EIGVAL", "PCA_EIGVEC", "ImageClassification", "Recipe", "RecipeError", "Task",
           "TrainResult", "TrainingError", "build_model", "epoch_order", "load_recipe",
           "load_run_recipe", "make_optimizer", "make_scheduler", "micro_batches", "pca_lighting",
           "train", "train_transform", "training_data"]
