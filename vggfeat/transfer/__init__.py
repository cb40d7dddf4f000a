"""Linear classifiers on cached descriptors: the paper's VOC and Caltech protocols (Table 11)."""

from .classifiers import C_GRIDS, CLASSIFIERS
from .metrics import mean_class_recall, voc_ap
from .protocols import (
    PROTOCOLS,
    Dataset,
    TransferResult,
    dataset_from_features,
    load_dataset,
    run_protocol,
)
from .report import markdown_report, write_report
from .run import run_transfer
from .splits import fraction_split, holdout, per_class_split
from .transforms import PowerNormalizer, ScaleAggregator

__all__ = ["C_GRIDS", "CLASSIFIERS", "PROTOCOLS", "Dataset", "TransferResult", "PowerNormalizer",
           "ScaleAggregator", "dataset_from_features", "fraction_split", "holdout",
           "load_dataset", "markdown_report", "mean_class_recall", "per_class_split",
           "run_protocol", "run_transfer", "voc_ap", "write_report"]
