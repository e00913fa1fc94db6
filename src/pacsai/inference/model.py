"""Running a checked bundle on a volume: its own transforms, its own inferer, our geometry.

The bundle's file loader (``LoadImage(d)``) is replaced by the in-memory volume as a
:class:`monai.data.MetaTensor` carrying the DICOM geometry, and its writers (``Save*``) are dropped;
everything else (preprocessing, inferer, postprocessing with ``Invertd``) runs as the bundle
defines it. MONAI works in RAS; DICOM patient coordinates are LPS. The conversion happens here and
only here: the volume's LPS affine is flipped on its first two rows (``diag(-1, -1, 1, 1)``), which
is exactly what MONAI's own ITK reader does with a DICOM or NIfTI file.

Transforms run on the inference device: the volume is moved there before preprocessing, so that
resampling, the sliding window and inversion stay on the GPU when there is one.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor

from pacsai.errors import ModelError
from pacsai.inference.bundle import BundleInfo, load_config
from pacsai.inference.volume import Volume

__all__ = ["LoadedModel", "ModelOutput", "as_meta_tensor", "resolve_device"]

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
    """One model's result on one series.

    Attributes
    ----------
    label_map:
        Segmentation only: label values on the exact voxel grid of the source volume, shape
        ``(slices, rows, columns)``, in the volume's slice order.
    probabilities:
        Classification only: probability per class name.
    timings:
        Seconds spent in ``preprocessing``, ``forward`` and ``postprocessing``.
    """

    bundle: BundleInfo
    label_map: np.ndarray | None = None
    probabilities: dict[str, float] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class LoadedModel:
    """A bundle's network, transforms and inferer, loaded once for one device and kept.

    Calls to :meth:`predict` are serialised: one model instance runs one volume at a time.
    """

    def __init__(self, bundle: BundleInfo, device: torch.device, *, amp: bool = True) -> None:
        self.bundle = bundle
        self.device = device
        self.amp = amp and device.type == "cuda"
        self._lock = threading.Lock()
        self._adds_channel = False
        try:
            parser = self._parser()
            self.preprocessing: Callable[[Any], Any] = parser.get_parsed_content("preprocessing")
            self.postprocessing: Callable[[Any], Any] = parser.get_parsed_content("postprocessing")
            self.inferer: Callable[..., Any] = parser.get_parsed_content("inferer")
            self.network = self._network(parser)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"bundle {bundle.name!r} could not be loaded: {exc}") from exc

    def _parser(self) -> ConfigParser:
        config = load_config(self.bundle.config_file)
        config["preprocessing"] = _without(config.get("preprocessing"), ("LoadImage",))
        self._adds_channel = _mentions(config["preprocessing"], "EnsureChannelFirst")
        config["postprocessing"] = _without(config.get("postprocessing"), ("Save",))
        parser = ConfigParser()
        parser.read_meta(str(self.bundle.path / "configs" / "metadata.json"))
        parser.read_config(config)
        parser["bundle_root"] = str(self.bundle.path)
        parser["device"] = f"$torch.device('{self.device}')"
        return parser

    def _network(self, parser: ConfigParser) -> torch.nn.Module:
        weights = self.bundle.weights
        if weights.suffix == ".ts":
            network: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(weights), map_location=self.device
            )
        else:
            network = parser.get_parsed_content("network_def")
            checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
                checkpoint = checkpoint["model"]
            network.load_state_dict(checkpoint)
            network = network.to(self.device)
        return network.eval()

    def predict(self, volume: Volume) -> ModelOutput:
        """Run the bundle on ``volume``; the result is on the volume's own grid.

        Raises
        ------
        ModelError
            The volume does not fit the model (2D against 3D), or the bundle failed.
        """
        if volume.is_2d != (self.bundle.spatial_dims == 2):
            raise ModelError(
                f"model {self.bundle.name!r} takes {self.bundle.spatial_dims}D images but series "
                f"{volume.series_instance_uid} is {'2D' if volume.is_2d else '3D'}: check the "
                "route's series rules"
            )
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            try:
                with _timed(timings, "preprocessing"):
                    data = self.preprocessing({"image": self.to_meta_tensor(volume)})
                    image = data["image"]
                with _timed(timings, "forward"), self._autocast():
                    # A plain tensor through the sliding window: MetaTensor bookkeeping on every
                    # window costs time, and Invertd takes the geometry from data["image"].
                    inputs = image.as_tensor().unsqueeze(0).to(self.device)
                    pred = self.inferer(inputs, self.network)
                with _timed(timings, "postprocessing"):
                    data["pred"] = pred[0].float()
                    data = self.postprocessing(data)
                    output = data["pred"]
                    result = output.detach().cpu().numpy() if hasattr(output, "cpu") else output
            except Exception as exc:
                raise ModelError(
                    f"model {self.bundle.name!r} failed on series {volume.series_instance_uid}: "
                    f"{exc}"
                ) from exc
        if self.bundle.task == "classification":
            return ModelOutput(
                self.bundle, probabilities=self._probabilities(result), timings=timings
            )
        return ModelOutput(self.bundle, label_map=self._label_map(result, volume), timings=timings)

    def to_meta_tensor(self, volume: Volume) -> MetaTensor:
        """The volume as this bundle's (removed) loader would have given it."""
        return as_meta_tensor(volume, channel_first=not self._adds_channel, device=self.device)

    def _label_map(self, result: np.ndarray, volume: Volume) -> np.ndarray:
        array = np.asarray(result)
        if array.ndim == volume.array.ndim + (0 if volume.is_2d else 1) and array.shape[0] == 1:
            array = array[0]  # the channel of an argmax'ed prediction
        if array.ndim == 4:  # one channel per class, not discretised by the bundle
            array = array.argmax(axis=0)
        expected = volume.array.shape[::-1] if not volume.is_2d else volume.array.shape[:0:-1]
        if array.shape != tuple(expected):
            raise ModelError(
                f"model {self.bundle.name!r} returned shape {array.shape} for a volume of "
                f"{tuple(expected)} (i, j, k): its postprocessing must invert the preprocessing "
                "(Invertd) so the mask is on the source grid"
            )
        labels = np.rint(array).astype(np.uint16)
        out = labels.T if volume.is_2d else labels.transpose(2, 1, 0)
        return np.ascontiguousarray(out[None] if volume.is_2d else out)

    def _probabilities(self, result: np.ndarray) -> dict[str, float]:
        values = np.asarray(result, dtype=np.float64).reshape(-1)
        names = {label.value: label.name for label in self.bundle.labels}
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


def as_meta_tensor(
    volume: Volume, *, channel_first: bool = False, device: torch.device | str = "cpu"
) -> MetaTensor:
    """The volume as MONAI's image loaders give a file: (i, j, k) indexing and a RAS affine.

    ``channel_first`` adds the channel dimension (for bundles whose loader did it itself).
    """
    ras = LPS_TO_RAS @ volume.affine
    if volume.is_2d:
        array = volume.array[0].T  # (columns, rows)
        affine = ras[np.ix_([0, 1, 3], [0, 1, 3])]
    else:
        array = volume.array.transpose(2, 1, 0)  # (columns, rows, slices)
        affine = ras
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    meta: dict[str, Any] = {
        "filename_or_obj": volume.series_instance_uid,
        "original_affine": torch.as_tensor(affine, dtype=torch.float64),
        "spatial_shape": np.asarray(array.shape),
        "space": "RAS",
        "original_channel_dim": "no_channel",
    }
    if channel_first:
        tensor = tensor.unsqueeze(0)
        meta["original_channel_dim"] = 0
    return MetaTensor(
        tensor.to(device), affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta
    )


def _without(component: Any, prefixes: tuple[str, ...]) -> Any:
    """A ``Compose`` config without the transforms whose ``_target_`` starts with a prefix."""
    if not (isinstance(component, dict) and isinstance(component.get("transforms"), list)):
        return component
    kept = [
        t
        for t in component["transforms"]
        if not (
            isinstance(t, dict)
            and str(t.get("_target_", "")).rsplit(".", 1)[-1].startswith(prefixes)
        )
    ]
    result = copy.deepcopy(component)
    result["transforms"] = kept
    return result


def _mentions(component: Any, name: str) -> bool:
    return name in repr(component)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
