"""Localisation as in the paper's Appendix A: box-regression nets, dense boxes, greedy merge."""

from .geometry import BoxAugment, decode, encode, iou
from .merge import best_boxes, greedy_merge, match_scores
from .metric import gt_class_errors, localized, score_guesses, score_submission
from .net import HEADS, BoxHead, box_head, euclidean_loss, load_localizer, localization_net
from .predict import METHODS, Classifier, Guess, Localizer, localize, parse_classifier

__all__ = ["BoxAugment", "decode", "encode", "iou", "best_boxes", "greedy_merge", "match_scores",
           "gt_class_errors", "localized", "score_guesses", "score_submission", "HEADS",
           "BoxHead", "box_head", "euclidean_loss", "load_localizer", "localization_net",
           "METHODS", "Classifier", "Guess", "Localizer", "localize", "parse_classifier"]
