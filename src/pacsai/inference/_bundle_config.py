"""A bundle's inference config as pacsai parses it: the bundle's own choices, pacsai's device.

Model Zoo bundles are written for MONAI's own workflow: they read files, name ``cuda:0``, download
pretrained backbones, import their ``scripts/`` package relative to the working directory, and load
weights through a ``CheckpointLoader`` handler. Everything here keeps the bundle's choices and
changes only what pacsai must own:

- every ``device`` and ``map_location`` the config names (the inferer's, a transform's, a
  ``torch.load`` inside an expression) becomes the configured device;
- ``pretrained: true`` in ``network_def`` becomes false: weights come from the bundle, never from
  the internet (a node has no internet and must not run other weights than the checksummed ones);
- the bundle's ``scripts/`` package is importable while its config is parsed;
- weights are found where the config loads them (a ``CheckpointLoader``'s ``load_path`` with its
  ``modelname``/``highres`` switches resolved), else ``models/model.pt`` or ``models/model.ts``.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from monai.bundle.config_parser import ConfigParser

__all__ = [
    "CheckpointSpec",
    "bundle_imports",
    "bundle_parsing",
    "find_checkpoint",
    "follow_device",
    "load_config",
    "make_parser",
    "resolve_reference",
    "target_name",
    "without_transforms",
]

#: ``torch.device('cuda')``, ``torch.device("cuda:0")``, ``'cuda:0' if ... else 'cpu'`` inside
#: expressions: the literal devices a bundle names.
_LITERAL_DEVICE = re.compile(
    r"""torch\.device\(\s*(?:'cuda(?::\d+)?'|"cuda(?::\d+)?"|'cuda(?::\d+)?'\s+if\s+torch\.cuda"""
    r"""\.is_available\(\)\s+else\s+'cpu')\s*\)"""
)
_MAP_LOCATION = re.compile(r"map_location\s*=\s*(?:'[^']*'|\"[^\"]*\")")

# One bundle's scripts/ package at a time: every bundle names it `scripts`.
_IMPORT_LOCK = threading.RLock()


@dataclass(frozen=True)
class CheckpointSpec:
    """Where a bundle's config loads its weights from.

    Attributes
    ----------
    path : pathlib.Path or None
        The resolved ``load_path`` (None when the config has no checkpoint loader).
    key : str or None
        The ``load_dict`` key of the network (``model``): a checkpoint saved as
        ``{key: state_dict}`` is unwrapped.
    strict : bool
        The loader's ``strict`` setting.
    where : str
        Which config item named it (``checkpointloader``, ``handlers#0``), for messages.
    """

    path: Path | None
    key: str | None = None
    strict: bool = True
    where: str = ""


def load_config(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML bundle file into a dict (``ValueError`` if it is not a mapping)."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON/YAML object")
    return data


def target_name(item: Any) -> str:
    """The class name an instantiable config item targets (``Orientationd``), or ``""``."""
    if isinstance(item, dict) and isinstance(item.get("_target_"), str):
        return str(item["_target_"]).rsplit(".", 1)[-1]
    return ""


def resolve_reference(config: dict[str, Any], value: Any) -> Any:
    """``"@image_key"`` or ``"$@transforms"`` to the referenced raw config item, else ``value``.

    Only plain references are followed (no arithmetic); enough to read a bundle's structure
    without instantiating it.
    """
    for _ in range(8):
        if isinstance(value, str) and re.fullmatch(r"\$?@[\w#]+", value):
            node: Any = config
            for part in value.lstrip("$@").split("#"):
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    return value
            value = node
        else:
            return value
    return value


def without_transforms(
    config: dict[str, Any], component: str, prefixes: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Remove, in place, the transforms of ``component`` whose class name starts with a prefix.

    The transform list is found through ``$@`` references (``transforms: $@transforms``), so
    that a removed loader is never instantiated. Returns the removed transforms' configs.
    """
    item = resolve_reference(config, config.get(component))
    if not isinstance(item, dict):
        return []
    reference = item.get("transforms")
    transforms = resolve_reference(config, reference)
    if not isinstance(transforms, list):
        return []
    removed = [
        t for t in transforms if target_name(resolve_reference(config, t)).startswith(prefixes)
    ]
    transforms[:] = [t for t in transforms if t not in removed]
    return [resolve_reference(config, t) for t in removed]


def follow_device(config: dict[str, Any], device: str) -> dict[str, Any]:
    """A copy of ``config`` whose every device, map location and pretrained switch is pacsai's.

    Parameters
    ----------
    config : dict
        A bundle's inference config.
    device : str
        The configured device (``cpu``, ``cuda:1``).
    """
    expression = f"$torch.device('{device}')"

    def visit(node: Any, key: str | None = None, in_network: bool = False) -> Any:
        if isinstance(node, dict):
            return {k: visit(v, k, in_network or k == "network_def") for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v, key, in_network) for v in node]
        if key in ("device", "map_location") and (
            isinstance(node, str) or (node is None and key == "map_location")
        ):
            return expression
        if key == "pretrained" and in_network and node is True:
            return False
        if isinstance(node, str) and node.startswith("$"):
            node = _LITERAL_DEVICE.sub(f"torch.device('{device}')", node)
            return _MAP_LOCATION.sub(f"map_location='{device}'", node)
        return node

    result: dict[str, Any] = visit(copy.deepcopy(config))
    result["device"] = expression
    return result


def make_parser(bundle_path: Path, config: dict[str, Any]) -> ConfigParser:
    """A MONAI ConfigParser of ``config`` with the bundle's metadata and ``bundle_root``."""
    from monai.bundle.config_parser import ConfigParser

    from pacsai.inference._monai_compat import adapt_to_installed_monai

    config = adapt_to_installed_monai(copy.deepcopy(config))
    parser = ConfigParser()
    meta = bundle_path / "configs" / "metadata.json"
    if meta.is_file():
        with warnings.catch_warnings():
            # MONAI renames the zoo's optional_packages_version as it reads it, with a warning
            # to the bundle's author; pacsai checks those packages itself (_packages.py).
            warnings.filterwarnings("ignore", message="Detected deprecated name")
            parser.read_meta(str(meta))
    parser.read_config(config)
    parser["bundle_root"] = str(bundle_path)
    return parser


@contextmanager
def bundle_imports(bundle_path: Path) -> Iterator[None]:
    """Let the bundle's own ``scripts`` package be imported, as MONAI's workflow does from the
    bundle directory; another bundle's ``scripts`` modules are set aside meanwhile."""
    if not (bundle_path / "scripts").is_dir():
        yield
        return
    with _IMPORT_LOCK:
        saved = {
            name: sys.modules.pop(name)
            for name in list(sys.modules)
            if name == "scripts" or name.startswith("scripts.")
        }
        sys.path.insert(0, str(bundle_path))
        importlib.invalidate_caches()
        try:
            yield
        finally:
            sys.path.remove(str(bundle_path))
            for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
                del sys.modules[name]
            sys.modules.update(saved)


@contextmanager
def numpy_in_checkpoints() -> Iterator[None]:
    """Let ``torch.load`` read NumPy arrays in a checkpoint without unpickling anything else.

    PyTorch loads with ``weights_only=True`` by default; a DiNTS architecture checkpoint holds
    NumPy arrays, which that refuses. Allowing NumPy's array reconstruction and dtypes keeps
    arbitrary code out (``weights_only=False`` would not).
    """
    import numpy as np
    import torch

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct]
    allowed.extend(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType"))
    with torch.serialization.safe_globals(allowed):
        yield


@contextmanager
def bundle_parsing(bundle_path: Path) -> Iterator[None]:
    """What parsing a bundle's config needs: its ``scripts``, and NumPy in its checkpoints."""
    with bundle_imports(bundle_path), numpy_in_checkpoints():
        yield


def find_checkpoint(bundle_path: Path, config: dict[str, Any]) -> CheckpointSpec:
    """Where the config's ``CheckpointLoader`` loads the weights from (``path`` None if none).

    The loader is looked for at the top level of the config (``checkpointloader``) and in its
    handler lists (``handlers``, ``val_handlers``...); its ``load_path`` is evaluated as MONAI
    would, so ``modelname`` and ``highres`` switches pick the file.

    Raises
    ------
    ValueError
        The loader's ``load_path`` cannot be evaluated.
    """
    found: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.items():
        if target_name(value) == "CheckpointLoader":
            found.append((key, value))
        elif isinstance(value, list):
            found.extend(
                (f"{key}#{index}", item)
                for index, item in enumerate(value)
                if target_name(item) == "CheckpointLoader"
            )
    if not found:
        return CheckpointSpec(None)
    where, loader = found[0]
    parser = make_parser(bundle_path, follow_device(config, "cpu"))
    try:
        with bundle_parsing(bundle_path):
            load_path = parser.get_parsed_content(f"{where}#load_path")
    except Exception as exc:  # MONAI raises what the expression raises
        raise ValueError(
            f"the load_path of {where} ({loader.get('load_path')!r}) cannot be evaluated: {exc}"
        ) from exc
    load_dict = loader.get("load_dict")
    network_key = (
        str(next(iter(load_dict))) if isinstance(load_dict, dict) and len(load_dict) == 1 else None
    )
    strict = loader.get("strict", True)
    return CheckpointSpec(
        Path(str(load_path)),
        key=network_key,
        strict=str(strict).strip().lower() not in ("false", "0"),
        where=where,
    )
