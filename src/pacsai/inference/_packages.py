"""Python packages a bundle needs: what is installed, and the ``pip install`` line that fixes it.

A Model Zoo bundle lists the packages it was made with in ``metadata.json``
(``optional_packages_version``). Some are needed to run it (einops for SwinUNETR, pandas when its
config imports it), others only for training or the author's scripts (tensorboard, itk). A listed
package that is missing refuses the bundle when its inference config or its ``scripts/`` import
it; otherwise it is a note. What MONAI imports on a bundle's behalf (nibabel for Orientationd,
scikit-image for KeepLargestConnectedComponentd) shows when the bundle first runs, at check time,
with :func:`pip_hint` naming the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PackageCheck", "check_packages", "pip_hint"]

#: Distribution name -> import name, where they differ.
_IMPORT_NAMES = {
    "pytorch-ignite": "ignite",
    "scikit-image": "skimage",
    "scikit-learn": "sklearn",
    "pyyaml": "yaml",
    "pillow": "PIL",
    "opencv-python": "cv2",
    "opencv-python-headless": "cv2",
    "simpleitk": "SimpleITK",
    "itk": "itk",
    "fire": "fire",
}
_DIST_NAMES = {v.lower(): k for k, v in _IMPORT_NAMES.items()}
_DIST_NAMES.update({"skimage": "scikit-image", "sklearn": "scikit-learn", "pil": "pillow"})
_DIST_NAMES.update({"cv2": "opencv-python-headless", "yaml": "pyyaml", "ignite": "pytorch-ignite"})

#: What ``pip install 'pacsai[zoo]'`` installs (keep in step with pyproject.toml).
ZOO_EXTRA = frozenset({"pytorch-ignite", "einops", "scikit-image", "scipy", "pandas", "fire"})


@dataclass(frozen=True)
class PackageCheck:
    """The outcome of checking a bundle's ``optional_packages_version``.

    Attributes
    ----------
    problems : list of str
        Missing packages the bundle's config or scripts import, each with its fix.
    notes : list of str
        Missing packages nothing in the inference path imports.
    """

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def import_name(dist: str) -> str:
    """The module a distribution is imported as (``scikit-image`` -> ``skimage``)."""
    return _IMPORT_NAMES.get(dist.lower(), dist.lower().replace("-", "_"))


def pip_hint(package: str) -> str:
    """The install line for a distribution or an import name (``skimage`` -> scikit-image)."""
    dist = _DIST_NAMES.get(package.lower(), package)
    if dist.lower() == "torchvision":
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "?"
        match = re.match(r"2\.(\d+)", torch_version)
        wanted = f"torchvision==0.{int(match.group(1)) + 15}.*" if match else "torchvision"
        return (
            f"pip install '{wanted}' built for the installed torch {torch_version}, from the "
            "package index that torch came from (a torchvision built for another torch fails "
            "to import)"
        )
    if dist.lower() in ZOO_EXTRA:
        return f"pip install 'pacsai[zoo]' (or pip install {dist})"
    return f"pip install {dist}"


def check_packages(meta: dict[str, Any], bundle_path: Path, config_text: str) -> PackageCheck:
    """Check the packages ``metadata.json`` lists against what is installed.

    Parameters
    ----------
    meta : dict
        The bundle's metadata.
    bundle_path : pathlib.Path
        The bundle directory (its ``scripts/`` are searched when the config uses them).
    config_text : str
        The text of the inference config.
    """
    declared = meta.get("optional_packages_version")
    result = PackageCheck()
    if not isinstance(declared, dict):
        return result
    texts = [("its inference config", config_text)]
    scripts = bundle_path / "scripts"
    if "scripts." in config_text and scripts.is_dir():
        texts.extend(
            (f"scripts/{p.name}", p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(scripts.glob("*.py"))
        )
    for dist, version in sorted(declared.items()):
        if _installed(str(dist)):
            continue
        name = re.escape(import_name(str(dist)))
        pattern = re.compile(rf"(?:^|[\s$;])(?:import|from)\s+{name}\b|\b{name}\.\w")
        users = [where for where, text in texts if pattern.search(text)]
        if users:
            result.problems.append(
                f"package {dist} (listed in optional_packages_version, imported by "
                f"{' and '.join(users)}) is not installed: {pip_hint(str(dist))}"
            )
        else:
            result.notes.append(
                f"lists {dist} {version} in optional_packages_version, not installed; its "
                "inference config does not import it"
            )
    return result
