"""How pacsai reads bundles others wrote: label names, devices, errors, decode limits."""

from __future__ import annotations

import pytest
from monai.transforms.transform import apply_transform

from pacsai.errors import UnusableSeriesError
from pacsai.inference._bundle_config import follow_device, without_transforms
from pacsai.inference.labels import semantics_for
from pacsai.inference.model import describe_error
from pacsai.inference.volume import load_datasets
from tests.support import make_ct_series


@pytest.mark.parametrize(
    ("name", "type_value", "side"),
    [
        ("kidney_right", "64033007", "Right"),
        ("Right Kidney", "64033007", "Right"),
        ("adrenal_gland_left", "23451007", "Left"),
        ("rib_left_3", "25888004", "Left"),
        ("vertebrae_L5", "49668003", None),
        ("heart_atrium_left", "82471001", None),  # Left atrium is its own concept
        ("IVC", "64131007", None),
        ("Portal and Splenic Veins", "110765007", None),
        ("peripheral zone", "279706003", None),
        ("pancreatic tumour", "108369006", None),
    ],
)
def test_names_others_write_are_coded_with_laterality(
    name: str, type_value: str, side: str | None
) -> None:
    label = semantics_for(1, name, None)

    assert label.type.value == type_value
    assert (label.modifier.meaning if label.modifier else None) == side


def test_a_misspelt_name_stays_unknown_and_the_message_says_so() -> None:
    with pytest.raises(ValueError, match=r"'Left Kideny'.*resembles the known name 'kidney'"):
        semantics_for(3, "Left Kideny", None)


def test_every_device_in_a_config_follows_the_setting() -> None:
    config = {
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "arch": "$torch.load(@path, map_location=torch.device('cuda'))",
        "inferer": {"_target_": "SlidingWindowInferer", "device": "$torch.device('cuda')"},
        "network_def": {"_target_": "TorchVisionFCModel", "pretrained": True},
    }

    adapted = follow_device(config, "cpu")

    assert "cuda" not in repr(adapted)
    assert adapted["inferer"]["device"] == "$torch.device('cpu')"
    assert adapted["network_def"]["pretrained"] is False
    assert config["network_def"]["pretrained"] is True  # the bundle's own dict is left alone


def test_loaders_are_removed_through_references() -> None:
    config = {
        "transforms": [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "Spacingd"}],
        "preprocessing": {"_target_": "Compose", "transforms": "$@transforms"},
    }

    removed = without_transforms(config, "preprocessing", ("LoadImage",))

    assert [t["_target_"] for t in config["transforms"]] == ["Spacingd"]
    assert removed == [{"_target_": "LoadImaged", "keys": "image"}]


def test_an_error_keeps_its_innermost_cause_and_transform() -> None:
    class Orientationd:
        def __call__(self, data: object) -> object:
            raise ModuleNotFoundError("No module named 'nibabel'", name="nibabel")

    with pytest.raises(RuntimeError) as caught:
        apply_transform(Orientationd(), {"image": 1})

    assert describe_error(caught.value) == (
        "Orientationd: No module named 'nibabel' (pip install nibabel)"
    )


def test_a_series_over_max_voxels_is_refused_before_decoding() -> None:
    datasets = make_ct_series(10, rows=64, columns=64)

    with pytest.raises(UnusableSeriesError, match=r"40,960 voxels.*inference.max_voxels"):
        load_datasets(datasets, max_voxels=40_959)
    assert load_datasets(datasets, max_voxels=40_960).array.shape == (10, 64, 64)
