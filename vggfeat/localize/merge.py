"""OverFeat's greedy box merge (Sermanet et al., 2014, Sect. 4.3), vectorised.

For each group of boxes (one class of one image): repeatedly take the closest pair and replace it
by its average, until no pair is closer than ``threshold``.  Closeness is the match score

    m(a, b) = ‖centre(a) − centre(b)‖ / mean size + (1 − IoU(a, b)),

with the mean size the average of the two boxes' (w + h) / 2: 0 for identical boxes, about 0.65
for equal boxes shifted by a quarter of their size, at least 2 for disjoint boxes.  A merged box
is the mean of every box merged into it (OverFeat's average of the pair, weighted by how many
boxes each side already holds, so the result does not depend on the merge order), and carries
the sum of their scores: the accumulated class score that rates it.

All groups merge at once: one step merges the closest pair of every group that still has one.
Only the closest partner of each box is kept up to date, so a step costs O(N) per changed box
instead of a scan of the N×N matrix.
"""

from __future__ import annotations

import numpy as np

from ..choices import MERGE_THRESHOLD as DEFAULT_THRESHOLD


def match_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Match score of corner boxes ``a`` (…×N×4) against ``b`` (…×M×4): …×N×M (lower = closer)."""
    ax0, ay0, ax1, ay1 = (a[..., :, None, k] for k in range(4))
    bx0, by0, bx1, by1 = (b[..., None, :, k] for k in range(4))
    size = (ax1 - ax0 + ay1 - ay0 + bx1 - bx0 + by1 - by0) / 4
    distance = np.hypot(ax0 + ax1 - bx0 - bx1, ay0 + ay1 - by0 - by1) / (2 * np.maximum(size, 1e-6))
    inter = (np.minimum(ax1, bx1) - np.maximum(ax0, bx0)).clip(0, None) * \
        (np.minimum(ay1, by1) - np.maximum(ay0, by0)).clip(0, None)
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    overlap = inter / np.maximum(union, 1e-6)
    return distance + 1.0 - overlap


def greedy_merge(boxes: np.ndarray, scores: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
                 valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge each group's boxes greedily.

    Args:
        boxes: G×N×4 corner boxes (G groups of N boxes; pad groups and mark padding in ``valid``).
        scores: G×N class scores of the boxes.
        threshold: pairs with a match score below it are merged.
        valid: G×N bool, False for padding.

    Returns:
        (boxes G×N×4, accumulated scores G×N, alive G×N): the merged boxes sit at the index of
        one of their members; ``alive`` marks them.
    """
    boxes = np.array(boxes, dtype=np.float64)
    scores = np.array(scores, dtype=np.float64)
    g, n = scores.shape
    alive = np.ones((g, n), bool) if valid is None else np.array(valid, bool)
    count = alive.astype(np.float64)
    # Match scores in float32 (half the memory traffic); boxes and scores add up in float64.
    boxes32 = boxes.astype(np.float32)
    match = match_scores(boxes32, boxes32)
    match[~(alive[:, :, None] & alive[:, None, :])] = np.inf
    match[:, np.arange(n), np.arange(n)] = np.inf
    best = match.min(2)  # closest partner of each box
    partner = match.argmin(2)
    rows = np.arange(g)
    while True:
        i = best.argmin(1)
        active = best[rows, i] < threshold
        if not active.any():
            break
        grp, i = rows[active], i[active]
        j = partner[grp, i]
        ci, cj = count[grp, i][:, None], count[grp, j][:, None]
        boxes[grp, i] = (boxes[grp, i] * ci + boxes[grp, j] * cj) / (ci + cj)
        scores[grp, i] += scores[grp, j]
        count[grp, i] += count[grp, j]
        alive[grp, j] = False
        # j leaves; i's box moved: refresh its row and column.
        match[grp, j, :] = np.inf
        match[grp, :, j] = np.inf
        boxes32[grp, i] = boxes[grp, i]
        row = match_scores(boxes32[grp, i][:, None], boxes32[grp])[:, 0]  # A×N
        row[~alive[grp]] = np.inf
        row[np.arange(len(grp)), i] = np.inf
        match[grp, i, :] = row
        match[grp, :, i] = row
        best[grp, j] = np.inf
        # Boxes whose closest partner was i or j need a fresh minimum; the others only compare
        # against i's new distance.
        stale = np.zeros((g, n), bool)
        stale[grp] = (partner[grp] == i[:, None]) | (partner[grp] == j[:, None])
        stale[grp, i] = True
        stale &= alive
        sg, sk = np.nonzero(stale)
        best[sg, sk] = match[sg, sk].min(1)
        partner[sg, sk] = match[sg, sk].argmin(1)
        closer = (row < best[grp]) & alive[grp]
        closer[np.arange(len(grp)), i] = False
        cg, ck = np.nonzero(closer)
        best[grp[cg], ck] = row[cg, ck]
        partner[grp[cg], ck] = i[cg]
    return boxes, scores, alive


def best_boxes(boxes: np.ndarray, scores: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
               valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each group's highest-rated merged box and its accumulated score: G×4, G."""
    merged, total, alive = greedy_merge(boxes, scores, threshold=threshold, valid=valid)
    total = np.where(alive, total, -np.inf)
    k = total.argmax(1)
    rows = np.arange(len(k))
    return merged[rows, k], total[rows, k]
