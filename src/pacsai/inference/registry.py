"""The models a node can run: every bundle under ``inference.models_dir``, checked at start.

A bundle that lacks something is refused with the list of what is missing and logged; the others
are available. Loaded models are kept, one per bundle and device, for the life of the process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pacsai.errors import BundleError, ModelError
from pacsai.inference.bundle import BundleInfo, inspect_bundle

if TYPE_CHECKING:
    from pacsai.config import InferenceSettings
    from pacsai.inference.model import LoadedModel

__all__ = ["ModelRegistry", "RegistryEntry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEntry:
    """One directory under the models directory: a usable bundle, or why it was refused."""

    name: str
    path: Path
    bundle: BundleInfo | None
    problems: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return "ready" if self.bundle is not None else "refused"


class ModelRegistry:
    """Bundles found in ``models_dir``, checked once, loaded on first use and kept."""

    def __init__(self, models_dir: Path, *, device: str = "auto", amp: bool = True) -> None:
        self.models_dir = models_dir
        self.device_setting = device
        self.amp = amp
        self.entries: dict[str, RegistryEntry] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()
        self.scan()

    @classmethod
    def from_settings(cls, inference: InferenceSettings) -> ModelRegistry:
        """The registry of the ``inference:`` settings (models_dir, device, amp)."""
        return cls(inference.models_dir, device=inference.device, amp=inference.amp)

    def scan(self) -> None:
        """(Re)check every bundle directory; refused ones are logged with what they lack."""
        entries: dict[str, RegistryEntry] = {}
        if self.models_dir.is_dir():
            for path in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
                if not (path / "configs").is_dir() and not (path / "models").is_dir():
                    continue  # not a bundle (a cache, a training folder...)
                try:
                    entries[path.name] = RegistryEntry(path.name, path, inspect_bundle(path))
                except BundleError as exc:
                    log.warning("model bundle refused: %s", exc, extra={"action": "bundle_refused"})
                    entries[path.name] = RegistryEntry(path.name, path, None, tuple(exc.missing))
        else:
            log.warning("models directory %s does not exist: no model can run", self.models_dir)
        self.entries = entries

    @property
    def bundles(self) -> list[BundleInfo]:
        """The bundles that passed the check."""
        return [e.bundle for e in self.entries.values() if e.bundle is not None]

    def get(self, name: str) -> BundleInfo:
        """The checked bundle called ``name``; ``ModelError`` if it is absent or refused."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelError(f"no model bundle named {name!r} in {self.models_dir}")
        if entry.bundle is None:
            raise ModelError(f"model bundle {name!r} was refused: {'; '.join(entry.problems)}")
        return entry.bundle

    def device_name(self) -> str:
        """The device models run on, as resolved from ``inference.device``."""
        from pacsai.inference.model import resolve_device

        return str(resolve_device(self.device_setting))

    def load(self, name: str) -> LoadedModel:
        """The loaded model for ``name`` on this registry's device (loaded once, then kept)."""
        from pacsai.inference.model import LoadedModel, resolve_device

        bundle = self.get(name)
        device = resolve_device(self.device_setting)
        key = (name, str(device))
        with self._lock:
            model = self._loaded.get(key)
            if model is None or model.bundle.weights_sha256 != bundle.weights_sha256:
                log.info("loading model %s %s on %s", name, bundle.display_version, device)
                model = LoadedModel(bundle, device, amp=self.amp)
                self._loaded[key] = model
            return model
