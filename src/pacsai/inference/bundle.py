"""MONAI bundles in the Model Zoo layout, checked for what pacsai needs before they are used.

A bundle is a directory::

    <name>/configs/metadata.json     version, network_data_format (inputs, outputs, channel_def)
    <name>/configs/inference.json    network_def, preprocessing, inferer, postprocessing (or .yaml)
    <name>/configs/pacsai.yaml       optional: label codes and colours, modality (see labels.py)
    <name>/models/model.pt           a state dict for network_def (or models/model.ts, TorchScript)

:func:`inspect_bundle` reads a bundle offline with :class:`monai.bundle.ConfigParser` and lists
everything that is missing or wrong, all at once, without loading weights; a bundle with
problems is refused with that list (:class:`~pacsai.errors.BundleError`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pacsai.errors import BundleError
from pacsai.inference.labels import LabelSemantics, normalise_name, semantics_for

__all__ = ["BundleInfo", "inspect_bundle", "load_config"]

Task = Literal["segmentation", "classification"]

_REQUIRED_KEYS = ("network_def", "preprocessing", "inferer", "postprocessing")
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_WEIGHT_NAMES = ("model.pt", "model.ts")


@dataclass(frozen=True)
class BundleInfo:
    """What pacsai knows about a bundle after checking it (no weights loaded).

    Attributes
    ----------
    name, version:
        The directory name and ``metadata.json`` ``version``.
    modalities:
        DICOM Modality values the model is meant for (``CT``, ``MR``, ``CR``, ``DX``...).
    task:
        ``segmentation`` (output ``pred`` of type ``image``) or ``classification``
        (``probabilities``).
    spatial_dims:
        2 or 3, from the input's ``spatial_shape``.
    labels:
        One entry per non-background output channel.
    weights:
        Path of ``models/model.pt`` or ``models/model.ts``.
    weights_sha256:
        SHA-256 of the weights file, recorded with every result and audit event.
    """

    name: str
    path: Path
    version: str
    description: str
    modalities: tuple[str, ...]
    task: Task
    spatial_dims: int
    labels: tuple[LabelSemantics, ...]
    config_file: Path
    weights: Path
    weights_sha256: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def display_version(self) -> str:
        """``version`` plus the first 12 hex digits of the weights checksum."""
        return f"{self.version}+{self.weights_sha256[:12]}"


def load_config(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML bundle file into a dict (``ValueError`` if it is not a mapping)."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON/YAML object")
    return data


def inspect_bundle(path: Path) -> BundleInfo:
    """Check the bundle at ``path`` and describe it.

    Raises
    ------
    BundleError
        Listing every missing file and key, and every label without a coded meaning.
    """
    missing: list[str] = []
    name = path.name
    meta_path = path / "configs" / "metadata.json"
    config_path = next(
        (path / "configs" / n for n in _CONFIG_NAMES if (path / "configs" / n).is_file()), None
    )
    weights = next(
        (path / "models" / n for n in _WEIGHT_NAMES if (path / "models" / n).is_file()), None
    )
    if not meta_path.is_file():
        missing.append("file configs/metadata.json")
    if config_path is None:
        missing.append("file configs/inference.json (or inference.yaml)")
    if weights is None:
        missing.append("file models/model.pt (or models/model.ts)")

    meta: dict[str, Any] = {}
    config: dict[str, Any] = {}
    read: set[str] = set()
    for kind, file, target in (("meta", meta_path, meta), ("config", config_path, config)):
        if file is not None and file.is_file():
            try:
                target.update(load_config(file))
                read.add(kind)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                missing.append(f"readable {file.relative_to(path)} ({exc})")
    has_meta = "meta" in read
    if "config" in read:
        for key in _REQUIRED_KEYS:
            if key not in config and not (key == "network_def" and _is_torchscript(weights)):
                missing.append(f"key {key!r} in {config_path.name if config_path else ''}")

    pacsai_file = path / "configs" / "pacsai.yaml"
    extra: dict[str, Any] = {}
    if isinstance(meta.get("pacsai"), dict):
        extra.update(meta["pacsai"])
    if pacsai_file.is_file():
        try:
            extra.update(load_config(pacsai_file))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            missing.append(f"readable configs/pacsai.yaml ({exc})")

    version = meta.get("version")
    if has_meta and not isinstance(version, str | int | float):
        missing.append("key 'version' in metadata.json")
    data_format = meta.get("network_data_format")
    inputs = data_format.get("inputs", {}) if isinstance(data_format, dict) else {}
    outputs = data_format.get("outputs", {}) if isinstance(data_format, dict) else {}
    image_in = inputs.get("image") if isinstance(inputs, dict) else None
    pred_out = outputs.get("pred") if isinstance(outputs, dict) else None
    if has_meta and not isinstance(image_in, dict):
        missing.append("key 'network_data_format.inputs.image' in metadata.json")
        image_in = {}
    if has_meta and not isinstance(pred_out, dict):
        missing.append("key 'network_data_format.outputs.pred' in metadata.json")
        pred_out = {}
    image_in = image_in or {}
    pred_out = pred_out or {}

    modalities = _modalities(extra.get("modality", image_in.get("modality")))
    if has_meta and not modalities:
        missing.append(
            "the input modality ('network_data_format.inputs.image.modality' in metadata.json "
            "or 'modality' in configs/pacsai.yaml)"
        )
    spatial_shape = image_in.get("spatial_shape")
    spatial_dims = len(spatial_shape) if isinstance(spatial_shape, list) else 0
    if has_meta and spatial_dims not in (2, 3):
        missing.append("a 2D or 3D 'spatial_shape' in network_data_format.inputs.image")
    out_type = pred_out.get("type")
    task: Task = "classification" if out_type == "probabilities" else "segmentation"
    if has_meta and out_type not in ("image", "probabilities"):
        missing.append("'type' image or probabilities in network_data_format.outputs.pred")

    labels: list[LabelSemantics] = []
    channel_def = pred_out.get("channel_def")
    overrides: dict[str, Any] = extra["labels"] if isinstance(extra.get("labels"), dict) else {}
    if has_meta and not (isinstance(channel_def, dict) and channel_def):
        missing.append("label names ('channel_def' in network_data_format.outputs.pred)")
    elif isinstance(channel_def, dict):
        numbered: list[tuple[int, Any]] = []
        for key, label_name in channel_def.items():
            try:
                numbered.append((int(key), label_name))
            except (TypeError, ValueError):
                missing.append(f"an integer channel index instead of {key!r} in 'channel_def'")
        for value, label_name in sorted(numbered, key=lambda item: item[0]):
            if task == "segmentation" and (value == 0 or str(label_name).lower() == "background"):
                continue
            try:
                override = overrides.get(label_name, overrides.get(normalise_name(str(label_name))))
                labels.append(semantics_for(value, str(label_name), override))
            except ValueError as exc:
                missing.append(str(exc))

    if missing:
        raise BundleError(name, missing)
    assert config_path is not None and weights is not None
    return BundleInfo(
        name=name,
        path=path,
        version=str(version),
        description=str(meta.get("description") or meta.get("name") or name),
        modalities=modalities,
        task=task,
        spatial_dims=spatial_dims,
        labels=tuple(labels),
        config_file=config_path,
        weights=weights,
        weights_sha256=_sha256(weights),
        extra=extra,
    )


def _modalities(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        parts = value.replace("/", ",").replace(" ", ",").split(",")
    elif isinstance(value, list):
        parts = [str(v) for v in value]
    else:
        return ()
    return tuple(p.strip().upper() for p in parts if p.strip())


def _is_torchscript(weights: Path | None) -> bool:
    return weights is not None and weights.suffix == ".ts"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
