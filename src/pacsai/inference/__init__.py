"""Routing studies to MONAI bundles, series to volumes, and running the bundles.

Importing this package does not import PyTorch or MONAI: :mod:`pacsai.inference.model` (which
does) is loaded when a model is first used, so the receiver and the CLI stay light.
"""

from __future__ import annotations

from pacsai.inference.bundle import BundleInfo, inspect_bundle
from pacsai.inference.labels import Code, LabelSemantics
from pacsai.inference.registry import ModelRegistry, RegistryEntry
from pacsai.inference.routing import Plan, PlannedRun, plan_study, scan_folder
from pacsai.inference.volume import Volume, load_datasets, load_series

__all__ = [
    "BundleInfo",
    "Code",
    "LabelSemantics",
    "ModelRegistry",
    "Plan",
    "PlannedRun",
    "RegistryEntry",
    "Volume",
    "inspect_bundle",
    "load_datasets",
    "load_series",
    "plan_study",
    "scan_folder",
]
