"""Running a checked bundle on volumes: its own transforms, its own inferer, our geometry.

The bundle's file loader (``LoadImage(d)``) is replaced by the in-memory volumes as
:class:`monai.data.MetaTensor` objects carrying the DICOM geometry, and its writers (``Save*``) are
removed from the parsed transforms; everything else (preprocessing, inferer, postprocessing with
``Invertd``) runs as the bundle defines it, on the configured device
(:mod:`pacsai.inference._bundle_config`). MONAI works in RAS; DICOM patient coordinates are LPS.
The conversion happens here and only here: the volume's LPS affine is flipped on its first two
rows (``diag(-1, -1, 1, 1)``), which is exactly what MONAI's own ITK reader does with a DICOM or
NIfTI file.

Inputs. A model reads one series per input slot (:class:`~pacsai.inference.bundle.InputSlot`):
several input keys, or the named channels of one key (BraTS: T1c, T1, T2, FLAIR). Every series
after the first is resampled onto the first one's voxel grid in patient space (trilinear, zero
outside), so that channels line up voxel for voxel. A grey series is given as N equal channels
to a model that declares N input channels but names fewer (a greyscale image its author's loader
read as RGB). A 2D segmentation model on a 3D series runs slice by slice (its own
``SliceInferer`` when it has one, else pacsai feeds it one slice at a time).

Outputs. A softmax segmentation gives a label map; a multi-label (sigmoid) one gives one binary
mask per label, which may overlap: the masks are taken where the postprocessing has thresholded
them on the source grid, before it merges them into one label map, and the label values the
merge writes (BraTS: 1, 2, 4) are learnt by running the merge on one probe voxel per channel. A
classification gives probabilities: after the postprocessing's activation when it then
discretises (``AsDiscreted``), never the discrete output itself.

Errors keep their cause: :func:`describe_error` gives the innermost exception with the transform
it happened in (``Orientationd: No module named 'nibabel' (pip install nibabel)``); the full
traceback is logged at DEBUG.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.transform import apply_transform

from pacsai.errors import ModelError
from pacsai.inference._bundle_config import (
    bundle_parsing,
    follow_device,
    load_config,
    make_parser,
    without_transforms,
)
from pacsai.inference._monai_compat import without_empty_inversions
from pacsai.inference._packages import pip_hint
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.volume import Volume, allocate_ijk

__all__ = [
    "LoadedModel",
    "ModelOutput",
    "as_meta_tensor",
    "describe_error",
    "resolve_device",
    "synthetic_volume",
]

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LOADERS = ("LoadImage",)
_WRITERS = ("Save",)


def resolve_device(setting: str) -> torch.device:
    """``inference.device`` (auto, cpu, cuda, cuda:N) to a torch device that exists here."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"inference.device is {setting!r} but no CUDA device is visible to PyTorch: "
                "set inference.device to auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"inference.device is {setting!r} but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    return device


@dataclass(frozen=True)
class ModelOutput:
    """One model's result on one series (or one set of series, for several input channels).

    Attributes
    ----------
    label_map:
        Segmentation only, on the exact voxel grid of the (first) source volume, in its slice
        order: label values, shape ``(slices, rows, columns)``; or, for a multi-label model whose
        labels may overlap, one boolean mask per label of ``bundle.labels`` in that order, shape
        ``(labels, slices, rows, columns)``.
    probabilities:
        Classification only: probability per class name.
    timings:
        Seconds spent in ``preprocessing``, ``forward`` and ``postprocessing``.
    """

    bundle: BundleInfo
    label_map: np.ndarray | None = None
    probabilities: dict[str, float] | None = None
    timings: dict[str, float] = field(default_factory=dict)


# --- errors ------------------------------------------------------------------------------------

_TRANSFORM_REPR = re.compile(r"applying transform <(?:[\w.<>]*\.)?(\w+) object at 0x[0-9a-f]+>")
_COMPONENT = re.compile(r"Failed to instantiate component '[\w.]*?\.?(\w+)'")
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'|required package `([\w.]+)`")


def describe_error(error: BaseException) -> str:
    """The innermost cause of ``error``, with the transform or component it happened in.

    MONAI wraps a transform's exception in ``RuntimeError("applying transform <...>")`` (and a
    config item's in "Failed to instantiate component"), which alone hides the cause. This
    walks the chain to the innermost exception and prefixes the last transform name seen:
    ``Orientationd: No module named 'nibabel' (pip install nibabel)``.
    """
    where = ""
    current: BaseException | None = error
    innermost = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        found = _TRANSFORM_REPR.search(text) or _COMPONENT.search(text)
        if found:
            where = found.group(1)
        innermost = current
        current = current.__cause__ or current.__context__
    message = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
    message = message or type(innermost).__name__
    if isinstance(innermost, ModuleNotFoundError) and innermost.name:
        missing: str | None = innermost.name.split(".")[0]
    else:
        match = _MISSING_MODULE.search(str(innermost))
        missing = next((g for g in match.groups() if g), None) if match else None
        missing = missing.split(".")[0] if missing else None
    if isinstance(innermost, KeyError | IndexError | TypeError | AttributeError):
        message = f"{type(innermost).__name__}: {message}"
    hint = f" ({pip_hint(missing)})" if missing else ""
    return f"{where}: {message}{hint}" if where else f"{message}{hint}"


# --- the model ---------------------------------------------------------------------------------


class LoadedModel:
    """A bundle's network, transforms and inferer, loaded once for one device and kept.

    Calls to :meth:`predict` are serialised: one model instance runs one input at a time.
    """

    def __init__(self, bundle: BundleInfo, device: torch.device, *, amp: bool = True) -> None:
        self.bundle = bundle
        self.device = device
        self.amp = amp and device.type == "cuda"
        self._lock = threading.Lock()
        self.warm = False
        self._learned = False
        try:
            config = follow_device(load_config(bundle.config_file), str(device))
            loaders = without_transforms(config, "preprocessing", _LOADERS)
            without_transforms(config, "postprocessing", _WRITERS)
            parser = make_parser(bundle.path, config)
            with bundle_parsing(bundle.path):
                self.preprocessing: Any = parser.get_parsed_content("preprocessing")
                self.postprocessing: Any = parser.get_parsed_content("postprocessing")
                self.inferer: Callable[..., Any] = parser.get_parsed_content("inferer")
                self.network = self._network(parser)
        except ModelError:
            raise
        except Exception as exc:
            log.debug("bundle %s could not be loaded", bundle.name, exc_info=True)
            raise ModelError(
                f"bundle {bundle.name!r} could not be loaded: {describe_error(exc)}"
            ) from exc
        # A loader with image_only false also gave "<key>_meta_dict" entries, which some
        # bundles' own transforms read (renalStructures' ConcatImages).
        self._meta_dicts = any(
            str(loader.get("image_only", True)).lower() in ("false", "0") for loader in loaders
        )
        _remove(self.preprocessing, _LOADERS)
        _remove(self.postprocessing, _WRITERS)
        without_empty_inversions(self.postprocessing)
        self._adds_channel = False
        for transform in _flatten(self.preprocessing) + _flatten(self.postprocessing):
            if hasattr(transform, "allow_missing_keys"):
                # A bundle's transforms may name keys only its own dataset had ("label").
                transform.allow_missing_keys = True
            if type(transform).__name__.startswith("EnsureChannelFirst"):
                self._adds_channel = True
                # The channel position is the removed loader's (an RGB PNG is H, W, C); pacsai's
                # volumes say where their channel is in their metadata.
                adjuster = getattr(transform, "adjuster", transform)
                if hasattr(adjuster, "input_channel_dim"):
                    adjuster.input_channel_dim = None
        self._slice_inferer = type(self.inferer).__name__ == "SliceInferer"

    def _network(self, parser: Any) -> torch.nn.Module:
        weights = self.bundle.weights
        if weights.suffix == ".ts":
            network: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(weights), map_location=self.device
            )
        else:
            network = parser.get_parsed_content("network_def")
            checkpoint = torch.load(weights, map_location=self.device, weights_only=True)
            key = self.bundle.checkpoint_key or "model"
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
            network.load_state_dict(checkpoint, strict=self.bundle.checkpoint_strict)
            network = network.to(self.device)
        return network.eval()

    # --- running --------------------------------------------------------------------------------

    def allocate_volume(self, shape: tuple[int, int, int]) -> np.ndarray:
        """A volume buffer for this model's device (an :data:`~pacsai.inference.volume.Allocator`
        for :func:`~pacsai.inference.volume.load_datasets`): page-locked host memory when the
        model runs on a GPU, so that the decoded pixels go to the device in one direct,
        asynchronous copy; ordinary memory otherwise."""
        if self.device.type != "cuda":
            return allocate_ijk(shape)
        return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()

    def predict(self, volumes: Volume | Sequence[Volume]) -> ModelOutput:
        """Run the bundle; the result is on the (first) volume's own grid.

        Parameters
        ----------
        volumes : Volume or sequence of Volume
            One volume per input slot of the bundle, in ``bundle.inputs`` order.

        Raises
        ------
        ModelError
            The volumes do not fit the model (2D against 3D, wrong count), or the bundle failed;
            the message names the innermost cause.
        """
        given = [volumes] if isinstance(volumes, Volume) else list(volumes)
        self._check_inputs(given)
        reference = given[0]
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            try:
                if (
                    self.bundle.spatial_dims == 2
                    and not reference.is_2d
                    and not (self._slice_inferer)
                ):
                    results = [
                        self._run([_slice(v, k) for v in given], timings)
                        for k in range(reference.array.shape[0])
                    ]
                    self._learn_once(results[0])
                    return self._stack_slices(results, reference, timings)
                result = self._run(given, timings)
                self._learn_once(result)
            except ModelError:
                raise
            except Exception as exc:
                log.debug("model %s failed", self.bundle.name, exc_info=True)
                raise ModelError(
                    f"model {self.bundle.name!r} failed on series "
                    f"{reference.series_instance_uid}: {describe_error(exc)}"
                ) from exc
        return self._output(result, reference, timings)

    def _check_inputs(self, volumes: list[Volume]) -> None:
        slots = self.bundle.inputs
        if len(volumes) != len(slots):
            raise ModelError(
                f"model {self.bundle.name!r} reads {len(slots)} series "
                f"({', '.join(s.name for s in slots)}), {len(volumes)} were given: name one "
                "series per input in the route's channels"
            )
        reference = volumes[0]
        if (self.bundle.task == "classification" or reference.is_2d) and (
            reference.is_2d != (self.bundle.spatial_dims == 2)
        ):
            raise ModelError(
                f"model {self.bundle.name!r} takes {self.bundle.spatial_dims}D images but "
                f"series {reference.series_instance_uid} is "
                f"{'2D' if reference.is_2d else '3D'}: check the route's series rules"
            )

    def _run(self, volumes: list[Volume], timings: dict[str, float]) -> _RawResult:
        with _timed(timings, "preprocessing"):
            data = self.preprocessing(self._data(volumes))
            image = data["image"]
        with _timed(timings, "forward"), self._autocast():
            # A plain tensor through the sliding window: MetaTensor bookkeeping on every window
            # costs time, and Invertd takes the geometry from data["image"].
            tensor = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            pred = self.inferer(tensor.unsqueeze(0).to(self.device), self.network)
            if isinstance(pred, list | tuple):
                pred = pred[0]
            raw_shape = tuple(pred.shape)
        with _timed(timings, "postprocessing"):
            # A MetaTensor, as the network's output is in MONAI's own workflow: Invertd skips a
            # plain tensor (with only a warning) when it comes first in the postprocessing.
            data["pred"] = MetaTensor(pred[0].float())
            return self._postprocess(data, raw_shape)

    def _data(self, volumes: list[Volume]) -> dict[str, Any]:
        """The data dict the bundle's removed loader would have given: one entry per key."""
        slots = self.bundle.inputs
        reference = volumes[0]
        arrays = [reference.array] + [_resample(v, reference) for v in volumes[1:]]
        data: dict[str, Any] = {}
        keys = list(dict.fromkeys(slot.key for slot in slots))
        for key in keys:
            members = [(s, a) for s, a in zip(slots, arrays, strict=True) if s.key == key]
            if len(members) == 1 and members[0][0].channel is None:
                channels = self.bundle.input_channels if len(slots) == 1 else 1
                stack = [members[0][1]] * channels if channels > 1 else None
            else:
                stack = [a for _, a in sorted(members, key=lambda m: m[0].channel or 0)]
            if stack is None:
                data[key] = as_meta_tensor(
                    reference,
                    channel_first=not self._adds_channel,
                    device=self.device,
                    array=members[0][1],
                )
            else:
                data[key] = as_meta_tensor(reference, device=self.device, channels=stack)
        if self._meta_dicts:
            for key in keys:
                data[f"{key}_meta_dict"] = dict(data[key].meta)
        return data

    def _postprocess(self, data: dict[str, Any], raw_shape: tuple[int, ...]) -> _RawResult:
        """Run the postprocessing one transform at a time, keeping what pacsai reports."""
        transforms = _flatten(self.postprocessing)
        grid = (
            tuple(data["image"].meta.get("spatial_shape", ()))
            if isinstance(data["image"], MetaTensor)
            else ()
        )
        activated: torch.Tensor | None = None
        masks: torch.Tensor | None = None
        masks_after = -1
        discretised = False
        for index, transform in enumerate(transforms):
            data = dict(apply_transform(transform, data))
            pred = data["pred"]
            name = type(transform).__name__
            if name.startswith("Activations"):
                activated = torch.as_tensor(pred).detach().clone()
            if name.startswith("AsDiscrete"):
                discretised = True
            if (
                self.bundle.multi_label
                and self.bundle.task == "segmentation"
                and pred.ndim >= 3
                and pred.shape[0] == raw_shape[1]
                and pred.shape[0] > 1
                and (not grid or tuple(pred.shape[1:]) == tuple(int(s) for s in grid))
                and _binary(pred)
            ):
                masks, masks_after = torch.as_tensor(pred).detach().clone(), index
        output = data["pred"]
        final = output.detach().cpu() if isinstance(output, torch.Tensor) else output
        return _RawResult(
            final=np.asarray(final),
            raw_shape=raw_shape,
            activated=None if activated is None else activated.cpu().numpy(),
            discretised=discretised,
            masks=None if masks is None else masks.cpu().numpy() > 0,
            merge=transforms[masks_after + 1 :] if masks is not None else [],
        )

    # --- outputs --------------------------------------------------------------------------------

    def _output(self, result: _RawResult, volume: Volume, timings: dict[str, float]) -> ModelOutput:
        if self.bundle.task == "classification":
            return ModelOutput(
                self.bundle, probabilities=self._probabilities(result), timings=timings
            )
        if result.masks is not None:
            return ModelOutput(
                self.bundle, label_map=self._masks(result.masks, volume), timings=timings
            )
        return ModelOutput(
            self.bundle, label_map=self._label_map(result.final, volume), timings=timings
        )

    def _stack_slices(
        self, results: list[_RawResult], volume: Volume, timings: dict[str, float]
    ) -> ModelOutput:
        """A 2D model's per-slice results as one result on the 3D volume."""
        maps = []
        for k, result in enumerate(results):
            plane = _slice(volume, k)
            output = self._output(result, plane, {})
            assert output.label_map is not None
            maps.append(
                output.label_map[..., 0, :, :]
                if output.label_map.ndim == 4
                else output.label_map[0]
            )
        axis = 1 if maps and maps[0].ndim == 3 else 0
        return ModelOutput(self.bundle, label_map=np.stack(maps, axis=axis), timings=timings)

    def _grid(self, volume: Volume) -> tuple[int, ...]:
        return tuple(volume.array.shape[::-1] if not volume.is_2d else volume.array.shape[:0:-1])

    def _label_map(self, result: np.ndarray, volume: Volume) -> np.ndarray:
        array = np.asarray(result)
        if array.ndim == volume.array.ndim + (0 if volume.is_2d else 1) and array.shape[0] == 1:
            array = array[0]  # the channel of an argmax'ed prediction
        if array.ndim == (3 if volume.is_2d else 4):  # one channel per class, not discretised
            array = array.argmax(axis=0)
        expected = self._grid(volume)
        if array.shape != expected:
            raise ModelError(
                f"model {self.bundle.name!r} returned shape {array.shape} for a volume of "
                f"{expected} (i, j, k): its postprocessing must invert the preprocessing "
                "(Invertd) so the mask is on the source grid"
            )
        labels = np.rint(array).astype(np.uint16)
        out = labels.T if volume.is_2d else labels.transpose(2, 1, 0)
        return np.ascontiguousarray(out[None] if volume.is_2d else out)

    def _masks(self, masks: np.ndarray, volume: Volume) -> np.ndarray:
        """One (slices, rows, columns) mask per label, in ``bundle.labels`` order."""
        expected = self._grid(volume)
        if tuple(masks.shape[1:]) != expected:
            raise ModelError(
                f"model {self.bundle.name!r} returned masks of shape {masks.shape[1:]} for a "
                f"volume of {expected} (i, j, k): its postprocessing must invert the "
                "preprocessing (Invertd) so the masks are on the source grid"
            )
        chosen = [masks[label.output_channel] for label in self.bundle.labels]
        if volume.is_2d:
            return np.ascontiguousarray(np.stack([m.T[None] for m in chosen]))
        return np.ascontiguousarray(np.stack([m.transpose(2, 1, 0) for m in chosen]))

    def _probabilities(self, result: _RawResult) -> dict[str, float]:
        final = np.asarray(result.final, dtype=np.float64).reshape(-1)
        values = final
        if result.discretised and np.isin(final, (0.0, 1.0)).all():
            if result.activated is None:
                raise ModelError(
                    f"model {self.bundle.name!r} gives discrete classes (AsDiscreted) and no "
                    "probability before them: pacsai reports each class's probability, so the "
                    "postprocessing needs an Activationsd (softmax or sigmoid) first"
                )
            values = np.asarray(result.activated, dtype=np.float64).reshape(-1)
        if values.size and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
            raise ModelError(
                f"model {self.bundle.name!r} returned class scores outside 0..1 "
                f"({values.min():.3g}..{values.max():.3g}): they are not probabilities; the "
                "postprocessing needs an Activationsd (softmax or sigmoid)"
            )
        names = {label.output_channel: label.name for label in self.bundle.labels}
        if len(values) < max(names, default=-1) + 1:
            raise ModelError(
                f"model {self.bundle.name!r} returned {len(values)} probabilities for "
                f"{len(names)} classes"
            )
        return {name: float(values[value]) for value, name in sorted(names.items())}

    def _autocast(self) -> Any:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return nullcontext()

    # --- warm-up ------------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Run the model once on a synthetic volume of its declared input; the seconds it took.

        This is where a bundle that loads but cannot run is found (a missing package MONAI
        imports on its behalf, a postprocessing that does not invert): before the first patient.
        It also checks the declared output type against what the network returns, learns the
        label values of a multi-label output's merge, and on CUDA makes cuDNN pick its
        algorithms for the declared input size (``torch.backends.cudnn.benchmark``).

        Raises
        ------
        ModelError
            The model failed on the synthetic input; the message names the innermost cause.
        """
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        spacing = next(
            (
                tuple(float(v) for v in np.ravel(t.spacing_transform.pixdim))
                for t in _flatten(self.preprocessing)
                if hasattr(getattr(t, "spacing_transform", None), "pixdim")
            ),
            None,
        )
        volumes = [
            synthetic_volume(self.bundle, seed=index, spacing=spacing)
            for index in range(len(self.bundle.inputs))
        ]
        start = time.perf_counter()
        raw: list[_RawResult] = []
        with self._lock, torch.inference_mode():
            try:
                raw.append(self._run(volumes, {}))
            except Exception as exc:
                log.debug("model %s failed its warm-up", self.bundle.name, exc_info=True)
                raise ModelError(
                    f"model {self.bundle.name!r} failed on a synthetic "
                    f"{'x'.join(str(s) for s in volumes[0].array.shape[::-1])} input: "
                    f"{describe_error(exc)}"
                ) from exc
        self._learn_once(raw[0])
        self._output(raw[0], volumes[0], {})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warm = True
        return time.perf_counter() - start

    def _learn_once(self, result: _RawResult) -> None:
        if not self._learned:
            self._learn(result)
            self._learned = True

    def _learn(self, result: _RawResult) -> None:
        """Check the task against the network's output; learn a merge's label values."""
        bundle = self.bundle
        spatial = len(result.raw_shape) - 2
        task = "classification" if spatial == 0 else "segmentation"
        notes = list(bundle.notes)
        changes: dict[str, Any] = {}
        if task != bundle.task:
            notes.append(
                f"metadata suggests {bundle.task}, but the network returns "
                f"{'class scores' if task == 'classification' else 'an image'} of shape "
                f"{result.raw_shape}: run as {task}"
            )
            changes["task"] = task
        declared = "probabilities" if task == "classification" else "image"
        if task == "classification" and bundle.task == "classification":
            declared_type = _declared_type(bundle)
            if declared_type not in (None, declared):
                notes.append(
                    f"outputs.pred.type is declared {declared_type!r}, the network returns class "
                    "scores: reported as probabilities"
                )
        if result.masks is not None and result.merge:
            values = _probe_values(result.merge, result.masks.shape[0], len(result.masks.shape) - 1)
            if values is not None:
                changes["labels"] = tuple(
                    dataclasses.replace(
                        label, value=values[label.output_channel], channel=label.output_channel
                    )
                    for label in bundle.labels
                    if values[label.output_channel] != 0
                )
        if notes != list(bundle.notes):
            changes["notes"] = tuple(dict.fromkeys(notes))
        if changes:
            self.bundle = dataclasses.replace(bundle, **changes)


@dataclass
class _RawResult:
    final: np.ndarray
    raw_shape: tuple[int, ...]
    activated: np.ndarray | None
    discretised: bool
    masks: np.ndarray | None
    merge: list[Any]


def _declared_type(bundle: BundleInfo) -> str | None:
    try:
        meta = load_config(bundle.path / "configs" / "metadata.json")
        value = meta["network_data_format"]["outputs"]["pred"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(value)


def _probe_values(merge: list[Any], channels: int, spatial_dims: int) -> dict[int, int] | None:
    """The label value the ``merge`` transforms write for each channel (one voxel per channel)."""
    shape = (channels, channels + 1) + (2,) * (spatial_dims - 1)
    probe = torch.zeros(shape)
    for channel in range(channels):
        probe[(channel, channel) + (slice(None),) * (spatial_dims - 1)] = 1
    data: dict[str, Any] = {"pred": MetaTensor(probe)}
    try:
        for transform in merge:
            data = dict(apply_transform(transform, data))
    except Exception:  # a merge that needs real geometry: keep the channel indices
        log.debug("could not probe the label values of a merge", exc_info=True)
        return None
    out = torch.as_tensor(data["pred"]).cpu()
    if out.ndim != spatial_dims + 1 or out.shape[0] != 1:
        return None
    corner = (0,) * (spatial_dims - 1)
    values = {c: round(float(out[(0, c, *corner)])) for c in range(channels)}
    if round(float(out[(0, channels, *corner)])) != 0:
        return None
    return values


def synthetic_volume(
    bundle: BundleInfo, *, seed: int = 0, spacing: Sequence[float] | None = None
) -> Volume:
    """A volume of the bundle's declared input size, with smooth random content.

    Its voxels have the bundle's target ``spacing`` (its Spacingd ``pixdim``), else 1 mm, so
    that after the bundle's resampling it still has the declared size (one sliding window).

    The values lie in the range of the bundle's modality (Hounsfield units for CT, arbitrary
    positive intensities otherwise), so that intensity windows and normalisations do real work.
    """
    meta = load_config(bundle.path / "configs" / "metadata.json")
    try:
        shape = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    except (KeyError, TypeError):
        shape = []
    sizes = [_size(s) for s in shape] or [64] * bundle.spatial_dims
    if len(sizes) == 2:  # a 2D segmentation model also reads 3D series, slice by slice
        sizes = [*sizes, 4 if bundle.task == "segmentation" else 1]
    columns, rows, slices = (min(s, 256) for s in sizes[:3])
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, slices // 8), max(2, rows // 8), max(2, columns // 8)))
    zoom = [slices / coarse.shape[0], rows / coarse.shape[1], columns / coarse.shape[2]]
    index = [
        np.minimum((np.arange(n) / z).astype(int), c - 1)
        for n, z, c in zip((slices, rows, columns), zoom, coarse.shape, strict=True)
    ]
    smooth = coarse[np.ix_(*index)]
    low, high = (-1000.0, 1000.0) if "CT" in bundle.modalities else (0.0, 1000.0)
    array = (low + (high - low) * smooth).astype(np.float32)
    affine = np.eye(4)
    if spacing is not None and len(spacing) >= 2 and all(s > 0 for s in spacing):
        steps = [*spacing, 1.0][:3] if len(spacing) == 2 else list(spacing)[:3]
        affine[:3, :3] = np.diag(steps)
    return Volume(
        array=array,
        affine=affine,
        sources=tuple((f"2.25.{seed}{k + 1}", None) for k in range(slices)),
        modality=bundle.modalities[0] if bundle.modalities else "OT",
        series_instance_uid=f"2.25.{seed + 1}",
        frame_of_reference_uid="2.25.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
    )


def _size(value: Any) -> int:
    """A declared size: an int, or an expression of ``n`` (``"8*n"``) made about 64."""
    if isinstance(value, int) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(value))
    if match:
        step = int(match.group(1))
        return max(step, 64 // step * step)
    return 64


def as_meta_tensor(
    volume: Volume,
    *,
    channel_first: bool = False,
    device: torch.device | str = "cpu",
    array: np.ndarray | None = None,
    channels: Sequence[np.ndarray] | None = None,
) -> MetaTensor:
    """The volume as MONAI's image loaders give a file: (i, j, k) indexing and a RAS affine.

    ``channel_first`` adds the channel dimension (for bundles whose loader did it itself).
    ``array`` replaces the volume's pixels (same grid); ``channels`` gives several arrays on the
    volume's grid as the channels of one image (channel first).
    """
    ras = LPS_TO_RAS @ volume.affine
    affine = ras[np.ix_([0, 1, 3], [0, 1, 3])] if volume.is_2d else ras

    def ijk(pixels: np.ndarray) -> np.ndarray:
        return pixels[0].T if volume.is_2d else pixels.transpose(2, 1, 0)

    if channels is not None:
        tensor = torch.from_numpy(
            np.ascontiguousarray(np.stack([ijk(c) for c in channels]), dtype=np.float32)
        )
        spatial = tensor.shape[1:]
    else:
        tensor = torch.from_numpy(
            np.ascontiguousarray(ijk(volume.array if array is None else array), dtype=np.float32)
        )
        spatial = tensor.shape
    meta: dict[str, Any] = {
        "filename_or_obj": volume.series_instance_uid,
        "original_affine": torch.as_tensor(affine, dtype=torch.float64),
        "spatial_shape": np.asarray(spatial),
        "space": "RAS",
        "original_channel_dim": 0 if channels is not None else "no_channel",
    }
    if channel_first and channels is None:
        tensor = tensor.unsqueeze(0)
        meta["original_channel_dim"] = 0
    if torch.device(device).type == "cpu":
        # The volume's (i, j, k) buffer is handed over as it is; some transforms write into
        # their input (NormalizeIntensity), and the reports still read the source pixels.
        if np.may_share_memory(tensor.numpy(), volume.array):
            tensor = tensor.clone()
    else:
        tensor = tensor.to(device, non_blocking=tensor.is_pinned())
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def _resample(volume: Volume, reference: Volume) -> np.ndarray:
    """``volume``'s pixels on ``reference``'s voxel grid, by position in patient space.

    Trilinear interpolation; zero where ``volume`` does not reach. Volumes on the same grid are
    returned as they are.
    """
    if volume.array.shape == reference.array.shape and np.allclose(
        volume.affine, reference.affine, atol=1e-4
    ):
        return volume.array
    from monai.transforms.spatial.array import SpatialResample

    source = as_meta_tensor(volume, channel_first=True)
    target = LPS_TO_RAS @ reference.affine
    shape = reference.array.shape[::-1]
    if reference.is_2d or volume.is_2d:
        raise ModelError(
            f"series {volume.series_instance_uid} and {reference.series_instance_uid} cannot be "
            "combined as channels: channels from several series need 3D series"
        )
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros")(
        source, dst_affine=torch.as_tensor(target), spatial_size=shape
    )
    array = torch.as_tensor(resampled)[0].cpu().numpy()
    return np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)


def _slice(volume: Volume, k: int) -> Volume:
    """Slice ``k`` of a 3D volume as a one-slice volume at its own position."""
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + volume.affine[:3, 3]
    return dataclasses.replace(
        volume, array=volume.array[k : k + 1], affine=affine, sources=(volume.sources[k],)
    )


def _flatten(compose: Any) -> list[Any]:
    """The transforms of a (nested) MONAI ``Compose``, in order; a callable alone otherwise."""
    transforms = getattr(compose, "transforms", None)
    if transforms is None:
        return [compose]
    return [t for item in transforms for t in _flatten(item)]


def _remove(compose: Any, prefixes: tuple[str, ...]) -> None:
    """Remove, in place, the transforms whose class name starts with a prefix (nested too)."""
    transforms = getattr(compose, "transforms", None)
    if not isinstance(transforms, list | tuple):
        return
    kept = [t for t in transforms if not type(t).__name__.startswith(prefixes)]
    compose.transforms = type(transforms)(kept)
    for transform in kept:
        _remove(transform, prefixes)


def _binary(tensor: Any) -> bool:
    values = torch.as_tensor(tensor)
    return bool(((values == 0) | (values == 1)).all())


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
