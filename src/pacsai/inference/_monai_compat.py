"""Workarounds for MONAI API changes that break bundles written for an older MONAI (one place).

Each rule changes a parsed bundle config only where the change keeps the bundle's meaning, and
says since when and why. Nothing else in pacsai edits a bundle's config for MONAI's sake.
"""

from __future__ import annotations

from typing import Any

__all__ = ["adapt_to_installed_monai", "without_empty_inversions"]

#: network class -> constructor arguments MONAI removed after they had stopped doing anything.
_REMOVED_NO_OP_ARGUMENTS = {
    # SwinUNETR's img_size was deprecated in MONAI 1.3 ("not required anymore: the input size is
    # checked in forward()") and removed in 1.5; bundles made for MONAI 1.x still pass it.
    "SwinUNETR": ("img_size",),
}


def adapt_to_installed_monai(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the arguments the installed MONAI no longer takes removed, in place."""
    import inspect

    from monai.utils.module import optional_import

    network = config.get("network_def")
    if not isinstance(network, dict) or not isinstance(network.get("_target_"), str):
        return config
    name = network["_target_"].rsplit(".", 1)[-1]
    for argument in _REMOVED_NO_OP_ARGUMENTS.get(name, ()):
        cls, found = optional_import("monai.networks.nets", name=name)
        if argument in network and found and argument not in inspect.signature(cls).parameters:
            del network[argument]
    return config


def without_empty_inversions(postprocessing: Any) -> None:
    """Remove, in place, ``Invertd`` transforms that have nothing to invert.

    Older MONAI let ``Invertd`` pass the data through when its preprocessing held no invertible
    transform (ventricular_short_axis_3label: channel, intensity and type only); MONAI 1.5+
    raises "inverse has been called but no invertible transforms have been supplied". Such an
    Invertd is a no-op by its author's intent, and removing it keeps the bundle's meaning.
    """
    from monai.transforms.inverse import InvertibleTransform

    transforms = getattr(postprocessing, "transforms", None)
    if not isinstance(transforms, list | tuple):
        return

    def empty(transform: Any) -> bool:
        if type(transform).__name__ != "Invertd":
            return False
        source = getattr(transform, "transform", None)
        flatten = getattr(source, "flatten", None)
        inner = flatten().transforms if callable(flatten) else [source]
        return not any(isinstance(t, InvertibleTransform) for t in inner)

    postprocessing.transforms = type(transforms)(t for t in transforms if not empty(t))
