"""The models a node can run: every bundle under ``inference.models_dir``, checked at start.

A bundle that lacks something is refused with the list of what is missing and logged; the others
are available. Loaded models are kept, one per bundle and device, for the life of the process.

:meth:`ModelRegistry.warm_up` loads each ready bundle and runs it once on a synthetic volume of
its declared input on the configured device, so that a bundle that loads but cannot run is refused
before the first patient, and the first study is as fast as the second (CUDA context, cuDNN
autotuning). ``pacsai models check`` and ``pacsai serve`` (``inference.warm_up``) call it; so does
a worker process at start::

    registry = ModelRegistry.from_settings(settings.inference)
    for result in registry.warm_up():        # list[WarmUpResult], one per bundle tried
        print(result.name, result.status, result.seconds, result.reason)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pacsai.errors import BundleError, ModelError
from pacsai.inference.bundle import BundleInfo, inspect_bundle

if TYPE_CHECKING:
    from pacsai.config import InferenceSettings
    from pacsai.inference.model import LoadedModel

__all__ = ["ModelRegistry", "RegistryEntry", "WarmUpResult"]

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


@dataclass(frozen=True)
class WarmUpResult:
    """How one bundle's warm-up went.

    Attributes
    ----------
    name : str
        The bundle.
    status : {"ready", "refused"}
        ``refused``: the bundle was refused before (``reason`` says why) or failed now.
    seconds : float
        Loading plus the synthetic run (0 for a bundle refused before).
    load_seconds, run_seconds : float
        The two parts of ``seconds``.
    device : str
        Where it ran.
    reason : str or None
        Why it is refused.
    notes : tuple of str
        What is worth knowing about a ready bundle (an unused missing package, an output type
        declared otherwise than the network returns it).
    """

    name: str
    status: Literal["ready", "refused"]
    seconds: float
    load_seconds: float
    run_seconds: float
    device: str
    reason: str | None = None
    notes: tuple[str, ...] = ()


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

    @property
    def warm(self) -> bool:
        """True when every ready bundle is loaded and has run once on this registry's device."""
        device = self.device_name()
        with self._lock:
            return all(
                (name, device) in self._loaded and self._loaded[(name, device)].warm
                for name, entry in self.entries.items()
                if entry.bundle is not None
            )

    def warm_up(self, names: Iterable[str] | None = None) -> list[WarmUpResult]:
        """Load each ready bundle (or those in ``names``) and run it once on a synthetic volume.

        A bundle that fails is refused from then on (its entry says why; jobs routed to it fail
        with that reason, default routes leave it out) and its model is dropped. Bundles already
        warm are not run again. Safe to call from any thread; never raises for a bundle.

        Parameters
        ----------
        names : iterable of str, optional
            Bundle names; all bundles (ready and refused) when omitted. An unknown name gives a
            refused result saying so.

        Returns
        -------
        list of WarmUpResult
            One per bundle, in name order (the order of ``names`` when given).
        """
        from pacsai.inference.model import resolve_device

        wanted = list(names) if names is not None else list(self.entries)
        try:
            device = str(resolve_device(self.device_setting))
        except ModelError as exc:
            return [
                WarmUpResult(n, "refused", 0.0, 0.0, 0.0, self.device_setting, str(exc))
                for n in wanted
            ]
        results = []
        for name in wanted:
            entry = self.entries.get(name)
            if entry is None:
                results.append(
                    WarmUpResult(
                        name,
                        "refused",
                        0.0,
                        0.0,
                        0.0,
                        device,
                        f"no model bundle named {name!r} in {self.models_dir}",
                    )
                )
                continue
            if entry.bundle is None:
                results.append(
                    WarmUpResult(name, "refused", 0.0, 0.0, 0.0, device, "; ".join(entry.problems))
                )
                continue
            start = time.perf_counter()
            run_seconds = 0.0
            try:
                model = self.load(name)
                loaded = time.perf_counter() - start
                if not model.warm:
                    run_seconds = model.warm_up()
                    log.info(
                        "model %s warmed up on %s in %.1f s",
                        name,
                        device,
                        run_seconds,
                        extra={"action": "model_warm"},
                    )
            except ModelError as exc:
                self._refuse(name, str(exc))
                results.append(
                    WarmUpResult(
                        name,
                        "refused",
                        time.perf_counter() - start,
                        time.perf_counter() - start,
                        0.0,
                        device,
                        str(exc),
                    )
                )
                continue
            with self._lock:
                current = self.entries.get(name)
                if current is not None and current.bundle is not model.bundle:
                    self.entries[name] = RegistryEntry(name, entry.path, model.bundle)
            results.append(
                WarmUpResult(
                    name,
                    "ready",
                    loaded + run_seconds,
                    loaded,
                    run_seconds,
                    device,
                    notes=model.bundle.notes,
                )
            )
        return results

    def _refuse(self, name: str, reason: str) -> None:
        """Refuse a bundle that failed to load or run, and drop its model."""
        log.warning("model bundle refused: %s", reason, extra={"action": "bundle_refused"})
        with self._lock:
            entry = self.entries.get(name)
            if entry is not None:
                self.entries[name] = RegistryEntry(name, entry.path, None, (reason,))
            for key in [k for k in self._loaded if k[0] == name]:
                del self._loaded[key]

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
