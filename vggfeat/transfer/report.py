"""Transfer reports laid out like the paper's Tables 11 and 12, in Markdown and JSON."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..fileio import write_json_atomic, write_text_atomic
from .protocols import PROTOCOLS, TransferResult

TABLE11 = ("voc2007", "voc2012", "caltech101", "caltech256")
TABLE12 = "voc2012-action"
CLASSIFIER_NAMES = {"svm": "linear SVM", "logreg": "logistic regression"}
# Fewer held-out samples than this cannot tell the values of C apart: one sample more or less
# right moves the held-out score by more than the values of C usually differ.
MIN_HELD_OUT = 20


def _cell(mean: float, std: float | None = None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _ours(r: TransferResult) -> str:
    return _cell(r.mean, r.std if len(r.scores) > 1 else None)


def markdown_report(results: list[TransferResult]) -> str:
    """Our rows beside the paper's, one column per protocol (Table 11) or one row per setting
    (Table 12), then per-class scores."""
    others = [r for r in results if r.protocol != TABLE12]
    actions = [r for r in results if r.protocol == TABLE12]
    lines = (_table11(others) if others else []) + (_table12(actions) if actions else [])
    for r in results:
        spec = PROTOCOLS[r.protocol]
        setting = f", {r.setting}" if r.setting else ""
        lines += [f"## {spec.title}{setting}, {CLASSIFIER_NAMES[r.classifier]}, aggregation "
                  f"{r.aggregate}",
                  "", f"- protocol: {spec.note}",
                  f"- {spec.metric}: {_ours(r)}"
                  + (f" over {len(r.scores)} splits (" + ", ".join(f"{s:.1f}" for s in r.scores)
                     + ")" if len(r.scores) > 1 else "")]
        lines += [f"- {k}: {v:.1f}" for k, v in r.extra.items()]
        lines += [f"- {_samples(r)}: {r.sizes['train']} train ({r.sizes['val']} of them held out "
                  f"to choose C), {r.sizes['test']} test, {r.sizes['classes']} classes",
                  f"- {_chosen_C(r)}"]
        warning = held_out_warning(r)
        if warning:
            lines.append(f"- **warning**: {warning}")
        if r.dropped:
            lines.append(f"- {len(r.dropped)} unreadable image(s) left out, e.g. {r.dropped[0]}")
        lines += ["", "| class | score (%) |", "|---|---|"]
        lines += [f"| {name} | {score:.1f} |" for name, score in r.per_class.items()]
        lines.append("")
    return "\n".join(lines)


def _samples(r: TransferResult) -> str:
    return "people" if r.protocol == TABLE12 else "images"


def _chosen_C(r: TransferResult) -> str:
    """Which C each split (multi-class) or each class (VOC, one classifier per class) chose."""
    if PROTOCOLS[r.protocol].multilabel:
        return "C chosen per class: " + ", ".join(
            f"{name} {c:g}" for name, c in zip(r.per_class, r.chosen_C))
    return "C chosen per split: " + ", ".join(
        f"split {s + 1}: {c:g}" for s, c in enumerate(r.chosen_C))


def held_out_warning(r: TransferResult) -> str | None:
    """A line for the user when C was chosen on too few held-out samples to mean much."""
    held_out = r.sizes.get("val", 0)
    if held_out >= MIN_HELD_OUT or len(r.C_grid) == 1:
        return None
    samples = _samples(r)
    return (f"C was chosen on only {held_out} held-out {samples} ({PROTOCOLS[r.protocol].title}"
            f"{', ' + r.setting if r.setting else ''}), too few to tell the values of C apart; "
            f"add {samples}, or fix C (--C 1)")


def _table12(results: list[TransferResult]) -> list[str]:
    """VOC-2012 action classification: mAP and AP per action, ours beside the paper's mAP."""
    actions = list(results[0].per_class)
    lines = ["# VOC-2012 action classification (the paper's Table 12)", "",
             "| descriptor | setting | classifier | mAP (%) | " + " | ".join(actions) + " |",
             "|---|---|---|---|" + "---|" * len(actions)]
    for r in results:
        lines.append(f"| ours: {' & '.join(r.features)} | {r.setting} | "
                     f"{CLASSIFIER_NAMES[r.classifier]} | {_ours(r)} | "
                     + " | ".join(f"{r.per_class[a]:.1f}" for a in actions) + " |")
    for name, (mean, _) in PROTOCOLS[TABLE12].paper.items():
        net, setting = name.split(", ")
        lines.append(f"| paper: {net} | {setting} | linear SVM | {mean:.1f} | "
                     + " | ".join("–" for _ in actions) + " |")
    return lines + ["", "The paper reports only the mAP of each setting.", ""]


def _table11(results: list[TransferResult]) -> list[str]:
    """Our results beside the paper's, in the columns of the protocols that were run."""
    ran = {r.protocol for r in results}
    columns = [c for c in TABLE11 if c in ran] + sorted(ran - set(TABLE11))
    lines = ["# Transfer of VGG descriptors (the paper's Table 11)", ""]
    lines += ["| descriptor | classifier | " + " | ".join(
        f"{PROTOCOLS[c].title}: {PROTOCOLS[c].metric}" for c in columns) + " |",
        "|---|---|" + "---|" * len(columns)]
    for r in results:
        cells = [_ours(r) if c == r.protocol else "–" for c in columns]
        lines.append(f"| ours: {' & '.join(r.features)} | {CLASSIFIER_NAMES[r.classifier]} | "
                     + " | ".join(cells) + " |")
    for net in ("Net-D", "Net-E", "Net-D & Net-E"):
        if not any(net in PROTOCOLS[c].paper for c in columns):
            continue  # e.g. your own folders: the paper has no figure to compare with
        cells = [_cell(*PROTOCOLS[c].paper[net]) if net in PROTOCOLS[c].paper
                 else "–" for c in columns]
        lines.append(f"| paper: {net} | linear SVM | " + " | ".join(cells) + " |")
    return lines + [""]


def report_json(results: list[TransferResult]) -> dict:
    rows = []
    for r in results:
        row = asdict(r)
        row.pop("splits")
        row.update(mean=r.mean, std=r.std, paper=PROTOCOLS[r.protocol].paper)
        rows.append(row)
    return {"vggfeat_version": __version__, "results": rows}


def write_report(results: list[TransferResult], path: str | os.PathLike) -> list[Path]:
    """``path`` (.md), the same name with .json, and .splits.json (the exact images of every
    split: ``fit`` and ``val`` choose C, the classifier is then trained on both, ``test`` scores
    it).  Each file is written atomically."""
    path = Path(path)
    json_path, splits_path = path.with_suffix(".json"), path.with_suffix(".splits.json")
    write_text_atomic(path, markdown_report(results))
    write_json_atomic(json_path, report_json(results))
    write_json_atomic(splits_path, {"results": [
        {"protocol": r.protocol, "aggregate": r.aggregate, "splits": r.splits} for r in results]})
    return [path, json_path, splits_path]

