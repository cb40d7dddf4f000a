"""ImageNet evaluation as in Sect. 3.2: dense, multi-crop, multi-scale, fusion, score maps."""

from .methods import METHODS, Evaluator, crop_grid, topk_error
from .run import (
                  EvalResult,
                  default_test_scales,
                  evaluate,
                  fuse,
                  load_posteriors,
                  markdown_report,
                  save_posteriors,
)
from .scoremap import plot_score_map

__all__ = ["METHODS", "Evaluator", "crop_grid", "topk_error", "EvalResult", "default_test_scales",
           "evaluate", "fuse", "load_posteriors", "markdown_report", "save_posteriors",
           "plot_score_map"]
