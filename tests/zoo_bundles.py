"""Real MONAI Model Zoo bundles for tests: copied from ../shared/zoo, given random weights.

The bundles are kept outside the repository (``../shared/zoo`` beside the checkout, or
``$PACSAI_TEST_ZOO``), as their authors ship them, without weights. :func:`prepare_bundle` copies
one into a test's folder and saves random weights made from the bundle's own ``network_def``
where the bundle's own config loads them (its CheckpointLoader's ``load_path``), as the zoo's
README says. Random weights test the path (loading, transforms, geometry, outputs, SEG/SR), not
accuracy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser

from pacsai.inference._bundle_config import (
    bundle_parsing,
    find_checkpoint,
    follow_device,
    load_config,
    make_parser,
)
from tests.support import REPO

__all__ = ["ZOO_BUNDLES", "prepare_bundle", "zoo_dir"]

ZOO_BUNDLES = (
    "spleen_ct_segmentation",
    "wholeBody_ct_segmentation",
    "swin_unetr_btcv_segmentation",
    "pancreas_ct_dints_segmentation",
    "brats_mri_segmentation",
    "prostate_mri_anatomy",
    "renalStructures_CECT_segmentation",
    "ventricular_short_axis_3label",
    "segmentation_template",
    "classification_template",
    "breast_density_classification",
    "pathology_nuclei_classification",
    "endoscopic_inbody_classification",
)


def zoo_dir() -> Path | None:
    """The zoo bundles: $PACSAI_TEST_ZOO, or ../shared/zoo beside the checkout."""
    for candidate in (os.environ.get("PACSAI_TEST_ZOO"), REPO.parent / "shared" / "zoo"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _config_file(bundle: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (bundle / "configs" / name).is_file():
            return bundle / "configs" / name
    raise FileNotFoundError(f"{bundle} has no inference config")


def _dints_architecture(path: Path, config: dict[str, object]) -> None:
    """A DiNTS architecture checkpoint as the bundle's search script saves it (NumPy arrays)."""
    from monai.networks.nets import TopologySearch

    space = config["dints_space"]
    assert isinstance(space, dict)
    search = TopologySearch(
        channel_mul=float(space.get("channel_mul", 1)),
        num_blocks=int(space["num_blocks"]),
        num_depths=int(space["num_depths"]),
        use_downsample=bool(space.get("use_downsample", True)),
        device="cpu",
    )
    node_a, arch_code_a, arch_code_c, arch_code_a_max = search.decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "node_a": np.asarray(node_a.cpu() if hasattr(node_a, "cpu") else node_a),
            "arch_code_a": np.asarray(arch_code_a),
            "arch_code_a_max": np.asarray(arch_code_a_max),
            "arch_code_c": np.asarray(arch_code_c),
            "iter_num": 0,
        },
        path,
    )


def prepare_bundle(name: str | Path, models_dir: Path, *, seed: int = 0) -> Path:
    """Copy a zoo bundle into ``models_dir`` and save random weights where it loads them.

    ``name`` is a bundle of the shared zoo, or the path of any bundle directory. A bundle whose
    ``network_def`` cannot be built here (a missing package) gets no weights: the check refuses
    it for the package, which is what the test wants to see.
    """
    if isinstance(name, Path):
        origin = name
    else:
        source = zoo_dir()
        assert source is not None, "no zoo bundles (../shared/zoo or PACSAI_TEST_ZOO)"
        origin = source / name
    bundle = models_dir / origin.name
    shutil.copytree(origin, bundle)
    config = load_config(_config_file(bundle))
    arch = config.get("arch_ckpt_path")
    if isinstance(arch, str):
        parser = make_parser(bundle, follow_device(config, "cpu"))
        _dints_architecture(Path(parser.get_parsed_content("arch_ckpt_path")), config)
    spec = find_checkpoint(bundle, config)
    target = spec.path or bundle / "models" / "model.pt"
    torch.manual_seed(seed)
    parser = make_parser(bundle, follow_device(config, "cpu"))
    try:
        with bundle_parsing(bundle):
            network = parser.get_parsed_content("network_def")
    except Exception as exc:  # a bundle needing a package that is not installed
        if "No module named" in str(exc) or "torchvision" in str(exc):
            return bundle
        raise
    target.parent.mkdir(parents=True, exist_ok=True)
    state = network.state_dict()
    torch.save({spec.key: state} if spec.key else state, target)
    return bundle


def network_of(bundle: Path) -> torch.nn.Module:
    """The bundle's network_def, built on the CPU (for comparisons)."""
    config = load_config(_config_file(bundle))
    parser: ConfigParser = make_parser(bundle, follow_device(config, "cpu"))
    with bundle_parsing(bundle):
        network: torch.nn.Module = parser.get_parsed_content("network_def")
    return network
