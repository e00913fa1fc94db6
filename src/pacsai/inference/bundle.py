"""MONAI bundles in the Model Zoo layout, checked for what pacsai needs before they are used.

A bundle is a directory::

    <name>/configs/metadata.json     version, network_data_format (inputs, outputs, channel_def)
    <name>/configs/inference.json    network_def, preprocessing, inferer, postprocessing (or .yaml)
    <name>/configs/pacsai.yaml       optional: label codes and colours, modality (see labels.py)
    <name>/models/model.pt           weights where the config's CheckpointLoader loads them
                                     (or models/model.ts, TorchScript)
    <name>/scripts/                  optional: the bundle's own Python package

:func:`inspect_bundle` reads a bundle offline and lists everything that is missing or wrong, all at
once, without loading weights; a bundle with problems is refused with that list
(:class:`~pacsai.errors.BundleError`). What it reads, and how it reads what others wrote:

- the input modality, normalised to a DICOM Modality (``MRI`` -> ``MR``, ``Mammogram`` -> ``MG``);
  one that is not a DICOM modality is refused with the list of valid values;
- the inputs: one series per input key the bundle's loader reads, or per named input channel
  (BraTS: T1c, T1, T2, FLAIR); colour (RGB) and mask inputs are refused;
- the labels: ``channel_def`` (or ``label_def``); channel 0 is background only when named so;
- the task: classification when the output is a vector of class scores (``type: probabilities``,
  or a ``[1, N]`` output shape), else segmentation; the network's real output is checked against
  it when the model first runs (:mod:`pacsai.inference.model`);
- multi-label output (a sigmoid activation in the postprocessing): labels may overlap;
- the packages in ``optional_packages_version`` (:mod:`pacsai.inference._packages`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pacsai.errors import BundleError
from pacsai.inference._bundle_config import (
    find_checkpoint,
    load_config,
    resolve_reference,
    target_name,
)
from pacsai.inference._packages import check_packages
from pacsai.inference.labels import LabelSemantics, normalise_name, semantics_for

__all__ = [
    "DICOM_MODALITIES",
    "BundleInfo",
    "InputSlot",
    "codes_stub",
    "inspect_bundle",
    "load_config",
]

Task = Literal["segmentation", "classification"]

_REQUIRED_KEYS = ("network_def", "preprocessing", "inferer", "postprocessing")
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_WEIGHT_NAMES = ("model.pt", "model.ts")

#: Image modalities (PS3.3 C.7.3.1.1.1 defined terms) a bundle may declare.
DICOM_MODALITIES = (
    "CR", "CT", "DX", "ES", "GM", "IO", "MG", "MR", "NM", "OCT", "OP", "OT", "PT", "PX", "RF",
    "RG", "SC", "SM", "US", "XA", "XC",
)  # fmt: skip
_MODALITY_NAMES = {
    "MRI": "MR", "MAGNETIC_RESONANCE": "MR", "CAT": "CT", "COMPUTED_TOMOGRAPHY": "CT",
    "MAMMOGRAM": "MG", "MAMMOGRAPHY": "MG", "MAMMO": "MG", "PET": "PT", "SPECT": "NM",
    "ULTRASOUND": "US", "XRAY": "DX", "X_RAY": "DX", "CXR": "DX", "ENDOSCOPY": "ES",
    "FUNDUS": "OP", "OCT": "OCT", "PATHOLOGY": "SM", "WSI": "SM", "ANGIOGRAPHY": "XA",
}  # fmt: skip
_COLOUR_CHANNELS = {"r", "g", "b", "red", "green", "blue", "rgb"}
_MASK_CHANNELS = {"mask", "label", "seg", "segmentation", "roi"}


@dataclass(frozen=True)
class InputSlot:
    """One series a model reads: an input key of the bundle's loader, or one of its channels.

    Attributes
    ----------
    name : str
        What a route calls it: the channel name (``FLAIR``) or the input key (``artery``).
    key : str
        The data key the bundle's transforms read (``image``).
    channel : int or None
        The channel of ``key`` this series fills, None when it fills the key alone.
    """

    name: str
    key: str
    channel: int | None = None


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
        ``segmentation`` or ``classification``.
    spatial_dims:
        2 or 3, from the input's ``spatial_shape``.
    labels:
        One entry per output channel that is not named background.
    weights:
        The weights file: where the config's CheckpointLoader loads it, else ``models/model.pt``
        or ``models/model.ts``.
    weights_sha256:
        SHA-256 of the weights file, recorded with every result and audit event.
    inputs:
        The series the model reads, one per input key or named input channel.
    input_channels:
        ``num_channels`` of the input: a grey series is given as that many equal channels when
        the bundle names fewer (a greyscale image read as RGB by the author's loader).
    multi_label:
        The output channels are independent (sigmoid): labels may overlap.
    checkpoint_key:
        The ``load_dict`` key of the network in a checkpoint (``model``), if any.
    notes:
        What is worth knowing but does not refuse the bundle (an unused missing package).
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
    inputs: tuple[InputSlot, ...] = (InputSlot("image", "image"),)
    input_channels: int = 1
    multi_label: bool = False
    checkpoint_key: str | None = None
    checkpoint_strict: bool = True
    notes: tuple[str, ...] = ()

    @property
    def display_version(self) -> str:
        """``version`` plus the first 12 hex digits of the weights checksum."""
        return f"{self.version}+{self.weights_sha256[:12]}"


def inspect_bundle(path: Path) -> BundleInfo:
    """Check the bundle at ``path`` and describe it.

    Raises
    ------
    BundleError
        Listing every missing file and key, every label without a coded meaning, every input
        pacsai cannot give, and every missing package the bundle imports.
    """
    missing: list[str] = []
    notes: list[str] = []
    name = path.name
    meta_path = path / "configs" / "metadata.json"
    config_path = next(
        (path / "configs" / n for n in _CONFIG_NAMES if (path / "configs" / n).is_file()), None
    )
    if not meta_path.is_file():
        missing.append("file configs/metadata.json")
    if config_path is None:
        missing.append("file configs/inference.json (or inference.yaml)")

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

    weights, checkpoint_key, strict = _weights(path, config, missing)
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

    declared = extra.get("modality", image_in.get("modality"))
    modalities = _modalities(declared, missing) if has_meta else ()
    if has_meta and not modalities and declared in (None, "", []):
        missing.append(
            "the input modality ('network_data_format.inputs.image.modality' in metadata.json "
            "or 'modality' in configs/pacsai.yaml)"
        )
    spatial_shape = image_in.get("spatial_shape")
    spatial_dims = len(spatial_shape) if isinstance(spatial_shape, list) else 0
    if has_meta and spatial_dims not in (2, 3):
        missing.append("a 2D or 3D 'spatial_shape' in network_data_format.inputs.image")
    out_type = pred_out.get("type")
    task = _task(pred_out)
    if has_meta and out_type not in ("image", "probabilities"):
        missing.append("'type' image or probabilities in network_data_format.outputs.pred")

    slots, channels = _inputs(config, image_in, missing) if has_meta else ((), 1)
    multi_label = _mentions_sigmoid(config)

    labels: list[LabelSemantics] = []
    channel_def = pred_out.get("channel_def", pred_out.get("label_def"))
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
            if normalise_name(str(label_name)) == "background":
                continue
            try:
                override = overrides.get(label_name, overrides.get(normalise_name(str(label_name))))
                labels.append(semantics_for(value, str(label_name), override))
            except ValueError as exc:
                missing.append(str(exc))

    if "config" in read and config_path is not None:
        packages = check_packages(meta, path, config_path.read_text(encoding="utf-8"))
        missing.extend(packages.problems)
        notes.extend(packages.notes)

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
        inputs=slots,
        input_channels=channels,
        multi_label=multi_label,
        checkpoint_key=checkpoint_key,
        checkpoint_strict=strict,
        notes=tuple(notes),
    )


def codes_stub(path: Path) -> dict[str, Any] | None:
    """A ``pacsai.yaml`` stub for the bundle at ``path``: what still needs codes, or None.

    Lists exactly the labels that neither the bundle's ``pacsai.yaml`` nor the built-in table
    knows, each with empty codes to fill in (an empty code is refused until it is filled), and
    the modality when the bundle declares none that is a DICOM one.
    """
    try:
        inspect_bundle(path)
    except BundleError as exc:
        problems = exc.missing
    else:
        return None
    meta = load_config(path / "configs" / "metadata.json")
    pred_out = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    channel_def = pred_out.get("channel_def", pred_out.get("label_def")) or {}
    labels: dict[str, Any] = {}
    for _, label_name in sorted(channel_def.items(), key=lambda kv: int(kv[0])):
        if any(p.startswith(f"label {str(label_name)!r} has no coded") for p in problems):
            empty = {"value": "", "scheme": "SCT", "meaning": ""}
            labels[str(label_name)] = {"category": dict(empty), "type": dict(empty)}
    stub: dict[str, Any] = {}
    if any(
        p.startswith("a DICOM modality") or p.startswith("the input modality") for p in problems
    ):
        stub["modality"] = []
    if labels:
        stub["labels"] = labels
    return stub or None


def _weights(
    path: Path, config: dict[str, Any], missing: list[str]
) -> tuple[Path | None, str | None, bool]:
    """The weights file the config loads, with its checkpoint key and strictness."""
    spec = None
    if config:
        try:
            spec = find_checkpoint(path, config)
        except ValueError as exc:
            missing.append(str(exc))
    if spec is not None and spec.path is not None:
        if spec.path.is_file():
            return spec.path, spec.key, spec.strict
        script = path / "models" / "model.ts"
        if script.is_file():
            return script, None, True
        try:
            shown = spec.path.relative_to(path)
        except ValueError:
            shown = spec.path
        missing.append(f"file {shown} (the load_path of {spec.where} in the inference config)")
        return None, None, True
    weights = next(
        (path / "models" / n for n in _WEIGHT_NAMES if (path / "models" / n).is_file()), None
    )
    if weights is None:
        missing.append("file models/model.pt (or models/model.ts)")
    return weights, None, True


def _modalities(value: Any, missing: list[str]) -> tuple[str, ...]:
    """DICOM Modality values from what the bundle declares (``MRI``, ``Mammogram``, ``ct/pt``)."""
    if isinstance(value, str):
        parts = value.replace("/", ",").replace(" ", ",").split(",")
    elif isinstance(value, list):
        parts = [str(v) for v in value]
    else:
        return ()
    result: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        key = normalise_name(part).upper()
        modality = key if key in DICOM_MODALITIES else _MODALITY_NAMES.get(key)
        if modality is None:
            missing.append(
                f"a DICOM modality instead of {part!r} (network_data_format.inputs.image."
                f"modality; valid: {', '.join(DICOM_MODALITIES)}): set 'modality' in "
                "configs/pacsai.yaml"
            )
        elif modality not in result:
            result.append(modality)
    return tuple(result)


def _task(pred_out: dict[str, Any]) -> Task:
    """Classification when the output is a vector of class scores, else segmentation."""
    if pred_out.get("type") == "probabilities":
        return "classification"
    shape = pred_out.get("spatial_shape")
    if isinstance(shape, list) and len(shape) == 2 and shape[0] == 1:
        return "classification"
    if str(pred_out.get("format", "")).lower() in ("classes", "classification"):
        return "classification"
    return "segmentation"


def _transforms(config: dict[str, Any], component: str) -> list[Any]:
    """The raw transform list of ``preprocessing``/``postprocessing`` (references followed)."""
    item = resolve_reference(config, config.get(component))
    transforms = resolve_reference(config, item.get("transforms")) if isinstance(item, dict) else []
    return (
        [resolve_reference(config, t) for t in transforms] if isinstance(transforms, list) else []
    )


def _keys(config: dict[str, Any], transform: Any) -> list[str]:
    keys = resolve_reference(config, transform.get("keys")) if isinstance(transform, dict) else []
    if isinstance(keys, str):
        keys = [keys]
    return [str(resolve_reference(config, k)) for k in keys] if isinstance(keys, list) else []


def _inputs(
    config: dict[str, Any], image_in: dict[str, Any], missing: list[str]
) -> tuple[tuple[InputSlot, ...], int]:
    """The series the model reads, from its loader's keys and the declared input channels."""
    transforms = _transforms(config, "preprocessing")
    loader = next((t for t in transforms if target_name(t).startswith("LoadImage")), None)
    keys = _keys(config, loader) if loader is not None else []
    later = {k for t in transforms if t is not loader for k in _keys(config, t)}
    keys = [k for k in keys if k in later] or keys[:1] or ["image"]
    channels = image_in.get("num_channels", 1)
    channels = channels if isinstance(channels, int) and channels > 0 else 1
    channel_def = image_in.get("channel_def")
    names = (
        [str(v) for _, v in sorted(channel_def.items(), key=lambda kv: str(kv[0]))]
        if isinstance(channel_def, dict)
        else []
    )
    lowered = {normalise_name(n) for n in names}
    colour = str(image_in.get("format", "")).upper() in ("RGB", "RGBA") or bool(
        lowered & _COLOUR_CHANNELS
    )
    if colour:
        mask = lowered & _MASK_CHANNELS
        missing.append(
            "an input of grey images: the model takes colour (RGB) images"
            + (" and a mask channel" if mask else "")
            + f" ({channels} channels: {', '.join(names) or 'unnamed'}), and pacsai feeds "
            "models the grey images of DICOM series"
        )
    if len(keys) > 1:
        return tuple(InputSlot(k, k) for k in keys), channels
    if channels > 1 and len(names) == channels and not colour:
        return tuple(InputSlot(n, keys[0], i) for i, n in enumerate(names)), channels
    return (InputSlot(keys[0], keys[0]),), channels


def _mentions_sigmoid(config: dict[str, Any]) -> bool:
    """The postprocessing applies a sigmoid to the prediction: independent (overlapping) labels."""
    for transform in _transforms(config, "postprocessing"):
        if target_name(transform).startswith("Activations") and transform.get("sigmoid") is True:
            return True
    return False


def _is_torchscript(weights: Path | None) -> bool:
    return weights is not None and weights.suffix == ".ts"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
