"""A transfer run as ``vggfeat transfer`` makes it: extract what is missing, then score.

:func:`run_transfer` reads the protocol's dataset, extracts a feature file that does not exist
yet from it (at the paper's scales for that dataset, see :func:`.protocols.descriptor_spec`), and
runs the protocol once per asked scale aggregation and, for VOC-2012 action, per description of
a person (Table 12's two rows).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, InputError
from .protocols import (
    ACTION_SETTINGS,
    Dataset,
    Protocol,
    TransferResult,
    dataset_from_features,
    descriptor_spec,
    extraction_inputs,
    get_protocol,
    load_dataset,
    run_protocol,
)
from .transforms import AGGREGATES

BOTH = "both"  # ``aggregate``/``setting``: one result for each value


def run_transfer(protocol: str, features: list[str | os.PathLike], *,
                 data: str | os.PathLike | None = None, crops: str | os.PathLike | None = None,
                 setting: str | None = None, aggregate: str | None = None,
                 layer: str = "fc7", scales: tuple[int, ...] | None = None,
                 arch: str | None = None, weights: str | None = "torchvision",
                 extract_options: dict | None = None, progress: bool = True,
                 **protocol_options) -> list[TransferResult]:
    """Score ``protocol`` on the descriptors in ``features``, extracting a missing file first.

    Args:
        protocol: a name of :data:`vggfeat.transfer.PROTOCOLS`.
        features: feature files, stacked when several (the paper's "Net-D & Net-E").  One of
            them may not exist yet: it is then extracted from ``data``.
        data: the dataset root in its official layout; needed for protocols whose labels come
            from annotations (VOC) and to extract a missing file.  Without it, the labels are
            the class folders the first feature file records.
        crops, setting: VOC-2012 action only: the folder of person-box images, and ``image``,
            ``image+box`` or ``both`` (the default: Table 12's two rows).
        aggregate: ``mean``, ``stack`` or ``both`` (default: the paper's choice for the
            dataset where the files allow).
        layer, scales, arch, weights: the descriptor of a file to extract (``scales`` default:
            the paper's for the dataset) and the net (:func:`vggfeat.vgg`).
        extract_options: :func:`vggfeat.extract` run options (``batch_size``, ``workers``,
            ``device``, ``amp``, ``backend`` …).
        protocol_options: :func:`run_protocol`'s (``classifier``, ``splits``,
            ``train_per_class``, ``test_per_class``, ``C_grid``, ``seed``).

    Returns:
        One :class:`TransferResult` per setting and aggregation, settings first.
    """
    spec = get_protocol(protocol)
    _check_request(spec, data, setting, crops, aggregate)
    missing = _missing_features(features, data)
    dataset = (load_dataset(protocol, data, crops=crops, progress=progress) if data is not None
               else dataset_from_features(features[0]))
    for output in missing:
        _extract(dataset, output, descriptor_spec(protocol, layer=layer, scales=scales), arch,
                 weights, extract_options or {}, progress)
    settings = ACTION_SETTINGS if spec.person_boxes and setting in (None, BOTH) else (setting,)
    aggregates = ("mean", "stack") if aggregate == BOTH else (aggregate,)
    return [run_protocol(protocol, dataset, list(features), aggregate=agg, setting=person,
                         **protocol_options)
            for person in settings for agg in aggregates]


def _check_request(spec: Protocol, data, setting: str | None, crops, aggregate: str | None
                   ) -> None:
    """What the protocol needs and allows, before anything is read."""
    if data is None and spec.sets is not None:
        raise InputError(f"{spec.title} labels come from the annotations: pass --data with the "
                         "dataset root")
    if (setting is not None or crops is not None) and not spec.person_boxes:
        raise ConfigError(f"--setting and --crops describe annotated people: they apply to "
                          f"--protocol voc2012-action only, not {spec.name}")
    if setting not in (None, BOTH, *ACTION_SETTINGS):
        raise ConfigError(f"setting must be one of {', '.join((*ACTION_SETTINGS, BOTH))}, got "
                          f"{setting!r}")
    if aggregate not in (None, BOTH, *AGGREGATES):
        raise ConfigError(f"aggregate must be one of {', '.join((*AGGREGATES, BOTH))}, got "
                          f"{aggregate!r}")


def _missing_features(features: list[str | os.PathLike], data) -> list[str | os.PathLike]:
    """The feature files to extract first: at most one, and only from a dataset root."""
    missing = [f for f in features if not Path(f).exists()]
    if missing and data is None:
        raise InputError(f"{missing[0]} does not exist; pass --data DATASET_ROOT to extract it "
                         "first")
    if len(missing) > 1:
        raise InputError(f"{len(missing)} FEATURES files do not exist "
                         f"({', '.join(map(str, missing))}); one can be extracted per run (with "
                         "--arch/--weights)")
    return missing


def _extract(dataset: Dataset, output: str | os.PathLike, spec, arch: str | None, weights,
             options: dict, progress: bool) -> None:
    from ..descriptors import extract  # the network code, loaded only when something is extracted

    extract(extraction_inputs(dataset), output, spec=spec, arch=arch, weights=weights,
            progress=progress, **options)
