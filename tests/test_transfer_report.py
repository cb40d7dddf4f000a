"""The transfer report: which C each split chose, only the columns that were run, and a warning
when C was chosen on a handful of held-out images."""

from __future__ import annotations

from vggfeat.transfer import markdown_report
from vggfeat.transfer.protocols import TransferResult
from vggfeat.transfer.report import held_out_warning


def _result(protocol: str, *, chosen, val: int, per_class=None, grid=(0.01, 0.1, 1, 10, 100),
            scores=None) -> TransferResult:
    per_class = per_class or {"cat": 80.0, "dog": 70.0}
    return TransferResult(protocol=protocol, classifier="svm", aggregate="mean",
                          features=["D fc7"], metric="mean class recall (%)",
                          scores=scores or [75.0] * len(chosen), per_class=per_class,
                          chosen_C=list(chosen), C_grid=grid,
                          sizes={"classes": len(per_class), "train": 5 * val, "val": val,
                                 "test": 10})


def test_folder_report_names_each_splits_C_has_no_paper_columns_and_warns():
    report = markdown_report([_result("folder", chosen=[0.01, 100, 1, 1, 0.01], val=2)])
    assert "C chosen per split: split 1: 0.01, split 2: 100, split 3: 1, split 4: 1, " \
           "split 5: 0.01" in report
    header = next(line for line in report.splitlines() if line.startswith("| descriptor"))
    assert header == "| descriptor | classifier | folder: mean class recall (%) |"
    assert "paper:" not in report and "VOC" not in report and "Caltech" not in report
    assert "**warning**: C was chosen on only 2 held-out images" in report
    assert "--C 1" in held_out_warning(_result("folder", chosen=[1], val=2))


def test_paper_rows_keep_only_the_protocols_that_ran():
    report = markdown_report([_result("caltech101", chosen=[1, 10, 1], val=612)])
    assert "| paper: Net-D | linear SVM | 91.8 ± 1.0 |" in report
    assert "VOC" not in report and "warning" not in report


def test_voc_names_the_C_of_each_class_and_no_warning_without_a_choice():
    voc = _result("voc2007", chosen=[1, 0.1], val=2510, scores=[90.0],
                  per_class={"aeroplane": 95.0, "bicycle": 85.0})
    assert "C chosen per class: aeroplane 1, bicycle 0.1" in markdown_report([voc])
    assert held_out_warning(_result("folder", chosen=[1.0], val=2, grid=(1.0,))) is None


def test_transfer_command_warns_when_C_was_chosen_on_a_few_images(image_folder, tiny_weights,
                                                                   tmp_path):
    from conftest import run_cli

    proc = run_cli("transfer", tmp_path / "f.h5", "--protocol", "folder", "--data", image_folder,
                   "--weights", tiny_weights, "--scales", "224", "--workers", "0", "--splits",
                   "2", "--quiet")
    assert "C chosen per split: split 1: " in proc.stdout and "split 2: " in proc.stdout
    assert "Warning: C was chosen on only 2 held-out images" in proc.stderr, proc.stderr
