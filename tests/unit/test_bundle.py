"""MONAI bundles: the check that lists everything missing at once, and the model registry."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml
from monai.bundle.config_parser import ConfigParser

from pacsai.errors import BundleError, ModelError
from pacsai.inference.bundle import inspect_bundle
from pacsai.inference.labels import Code
from pacsai.inference.registry import ModelRegistry
from tests.support import REPO

DEMO_MODELS = REPO / "models"
CT = "ct_abdomen_demo"
MR = "mr_brain_lesion_demo"
CXR = "cxr_findings_demo"


# --- a bundle factory -------------------------------------------------------------------------


@functools.cache
def _network(source: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(DEMO_MODELS / source / "configs" / "inference.json"))
    network: torch.nn.Module = parser.get_parsed_content("network_def")
    return network.eval()


def write_bundle(
    directory: Path,
    source: str = CT,
    *,
    weights: Literal["pt", "ts", None] = "pt",
    config_format: Literal["json", "yaml"] = "json",
) -> Path:
    """A bundle at ``directory``: a demo bundle's configs and freshly made weights.

    The demo bundles' weights may be missing or still training, so only their configs are used:
    ``pt`` writes the state dict of their ``network_def``, ``ts`` a TorchScript module (and the
    config loses ``network_def``, which a TorchScript bundle does not need).
    """
    shutil.copytree(DEMO_MODELS / source / "configs", directory / "configs")
    (directory / "models").mkdir()
    network = _network(source)
    if weights == "pt":
        torch.save(network.state_dict(), directory / "models" / "model.pt")
    elif weights == "ts":
        torch.jit.save(torch.jit.script(network), str(directory / "models" / "model.ts"))
        edit_config(directory, lambda config: config.pop("network_def"))
    if config_format == "yaml":
        json_path = directory / "configs" / "inference.json"
        config = json.loads(json_path.read_text(encoding="utf-8"))
        (directory / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
        json_path.unlink()
    return directory


def edit_metadata(bundle: Path, change: Callable[[dict[str, Any]], object]) -> None:
    path = bundle / "configs" / "metadata.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_config(bundle: Path, change: Callable[[dict[str, Any]], object]) -> None:
    path = bundle / "configs" / "inference.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def pred(meta: dict[str, Any]) -> dict[str, Any]:
    output: dict[str, Any] = meta["network_data_format"]["outputs"]["pred"]
    return output


def image(meta: dict[str, Any]) -> dict[str, Any]:
    inputs: dict[str, Any] = meta["network_data_format"]["inputs"]["image"]
    return inputs


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[..., Path]:
    """``make_bundle(name, source=CT, weights="pt")``: a bundle under ``tmp_path/models``."""

    def make(name: str = "bundle", source: str = CT, **kwargs: Any) -> Path:
        return write_bundle(tmp_path / "models" / name, source, **kwargs)

    return make


def refusal(path: Path) -> BundleError:
    with pytest.raises(BundleError) as caught:
        inspect_bundle(path)
    assert caught.value.bundle == path.name
    for problem in caught.value.missing:
        assert problem in str(caught.value)
    return caught.value


# --- a bundle that passes ---------------------------------------------------------------------


def test_a_complete_bundle_passes_and_is_described(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle("ct_organs", CT)

    info = inspect_bundle(path)

    assert info.name == "ct_organs"
    assert info.path == path
    assert info.version == "0.1.0"
    assert info.modalities == ("CT",)
    assert info.task == "segmentation"
    assert info.spatial_dims == 3
    assert [(label.value, label.name) for label in info.labels] == [
        (1, "liver"),
        (2, "spleen"),
        (3, "kidney"),
    ]
    assert info.labels[0].type == Code("10200004", "SCT", "Liver")
    assert info.config_file == path / "configs" / "inference.json"
    assert info.weights == path / "models" / "model.pt"
    expected = hashlib.sha256((path / "models" / "model.pt").read_bytes()).hexdigest()
    assert info.weights_sha256 == expected
    assert info.display_version == f"0.1.0+{expected[:12]}"
    assert "liver, spleen and kidneys" in info.description


@pytest.mark.parametrize(
    ("source", "modalities", "task", "dims", "labels"),
    [
        (CT, ("CT",), "segmentation", 3, [(1, "liver"), (2, "spleen"), (3, "kidney")]),
        (MR, ("MR",), "segmentation", 3, [(1, "lesion")]),
        (CXR, ("CR", "DX"), "classification", 2, [(0, "nodule"), (1, "effusion")]),
    ],
)
def test_each_demo_bundle_passes(
    make_bundle: Callable[..., Path],
    source: str,
    modalities: tuple[str, ...],
    task: str,
    dims: int,
    labels: list[tuple[int, str]],
) -> None:
    info = inspect_bundle(make_bundle(source, source))

    assert info.modalities == modalities
    assert info.task == task
    assert info.spatial_dims == dims
    assert [(label.value, label.name) for label in info.labels] == labels


def test_the_weights_checksum_follows_the_file(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    before = inspect_bundle(path).weights_sha256
    weights = path / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")

    after = inspect_bundle(path).weights_sha256

    assert after != before
    assert after == hashlib.sha256(weights.read_bytes()).hexdigest()


# --- what a bundle can lack -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "named"),
    [
        ("configs/metadata.json", "file configs/metadata.json"),
        ("configs/inference.json", "file configs/inference.json"),
        ("models/model.pt", "file models/model.pt"),
    ],
)
def test_a_missing_file_is_named(
    make_bundle: Callable[..., Path], relative: str, named: str
) -> None:
    path = make_bundle()
    (path / relative).unlink()

    error = refusal(path)

    assert len(error.missing) == 1
    assert error.missing[0].startswith(named)


@pytest.mark.parametrize("key", ["network_def", "preprocessing", "inferer", "postprocessing"])
def test_a_missing_config_key_is_named(make_bundle: Callable[..., Path], key: str) -> None:
    path = make_bundle()
    edit_config(path, lambda config: config.pop(key))

    error = refusal(path)

    assert error.missing == [f"key {key!r} in inference.json"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda meta: meta.pop("version"), "key 'version' in metadata.json"),
        (lambda meta: meta.update(version=None), "key 'version' in metadata.json"),
        (
            lambda meta: pred(meta).pop("channel_def"),
            "label names ('channel_def' in network_data_format.outputs.pred)",
        ),
        (
            lambda meta: pred(meta).update(channel_def={}),
            "label names ('channel_def' in network_data_format.outputs.pred)",
        ),
        (
            lambda meta: image(meta).pop("spatial_shape"),
            "a 2D or 3D 'spatial_shape' in network_data_format.inputs.image",
        ),
        (
            lambda meta: image(meta).update(spatial_shape=[96]),
            "a 2D or 3D 'spatial_shape' in network_data_format.inputs.image",
        ),
        (
            lambda meta: image(meta).pop("modality"),
            "the input modality ('network_data_format.inputs.image.modality' in metadata.json "
            "or 'modality' in configs/pacsai.yaml)",
        ),
        (
            lambda meta: pred(meta).update(type="tensor"),
            "'type' image or probabilities in network_data_format.outputs.pred",
        ),
    ],
    ids=[
        "no-version",
        "null-version",
        "no-channel_def",
        "empty-channel_def",
        "no-spatial_shape",
        "1d-spatial_shape",
        "no-modality",
        "bad-output-type",
    ],
)
def test_a_missing_metadata_key_is_named(
    make_bundle: Callable[..., Path], change: Callable[[dict[str, Any]], object], named: str
) -> None:
    path = make_bundle()
    edit_metadata(path, change)

    error = refusal(path)

    assert error.missing == [named]


def test_missing_input_and_output_descriptions_are_named(
    make_bundle: Callable[..., Path],
) -> None:
    path = make_bundle()
    edit_metadata(path, lambda meta: meta.pop("network_data_format"))

    error = refusal(path)

    assert "key 'network_data_format.inputs.image' in metadata.json" in error.missing
    assert "key 'network_data_format.outputs.pred' in metadata.json" in error.missing
    assert any("channel_def" in problem for problem in error.missing)


def test_a_label_without_coded_meaning_is_named(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    edit_metadata(path, lambda meta: pred(meta)["channel_def"].update({"4": "portal_vein"}))

    error = refusal(path)

    assert error.missing == [
        "label 'portal_vein' has no coded meaning: add category and type to pacsai.yaml "
        "(`pacsai models codes BUNDLE` writes a stub)"
    ]


def test_a_malformed_code_in_pacsai_yaml_is_named(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "configs" / "pacsai.yaml").write_text(
        "labels:\n  liver:\n    type: {value: '10200004', scheme: SCT}\n", encoding="utf-8"
    )

    error = refusal(path)

    assert error.missing == ["label 'liver': type must be a mapping with value, scheme and meaning"]


def test_an_unreadable_pacsai_yaml_is_named(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "configs" / "pacsai.yaml").write_text("labels: [liver\n", encoding="utf-8")

    error = refusal(path)

    assert len(error.missing) == 1
    assert error.missing[0].startswith("readable configs/pacsai.yaml")


@pytest.mark.parametrize("relative", ["configs/metadata.json", "configs/inference.json"])
def test_an_unparsable_config_file_is_named(
    make_bundle: Callable[..., Path], relative: str
) -> None:
    path = make_bundle()
    (path / relative).write_text("{not json", encoding="utf-8")

    error = refusal(path)

    assert any(problem.startswith(f"readable {relative}") for problem in error.missing)


def test_every_problem_is_listed_at_once(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "models" / "model.pt").unlink()
    edit_config(path, lambda config: (config.pop("inferer"), config.pop("postprocessing")))
    edit_metadata(path, lambda meta: meta.pop("version"))
    edit_metadata(path, lambda meta: pred(meta)["channel_def"].update({"4": "portal_vein"}))

    error = refusal(path)

    assert error.missing == [
        "file models/model.pt (the load_path of handlers#0 in the inference config)",
        "key 'inferer' in inference.json",
        "key 'postprocessing' in inference.json",
        "key 'version' in metadata.json",
        "label 'portal_vein' has no coded meaning: add category and type to pacsai.yaml "
        "(`pacsai models codes BUNDLE` writes a stub)",
    ]


def test_an_empty_directory_lacks_every_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()

    error = refusal(path)

    assert error.missing == [
        "file configs/metadata.json",
        "file configs/inference.json (or inference.yaml)",
        "file models/model.pt (or models/model.ts)",
    ]


def test_an_empty_metadata_object_is_refused(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "configs" / "metadata.json").write_text("{}", encoding="utf-8")

    error = refusal(path)

    assert "key 'version' in metadata.json" in error.missing


def test_an_empty_inference_object_is_refused(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "configs" / "inference.json").write_text("{}", encoding="utf-8")

    error = refusal(path)

    assert "key 'network_def' in inference.json" in error.missing


def test_a_non_integer_channel_key_is_refused(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    edit_metadata(path, lambda meta: pred(meta).update(channel_def={"bg": "background"}))

    error = refusal(path)

    assert any("channel_def" in problem for problem in error.missing)


# --- variants that are allowed ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_a_torchscript_bundle_needs_no_network_def(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle("scripted", CXR, weights="ts")
    assert "network_def" not in json.loads((path / "configs" / "inference.json").read_text())

    info = inspect_bundle(path)

    assert info.weights == path / "models" / "model.ts"
    assert info.weights_sha256 == hashlib.sha256(info.weights.read_bytes()).hexdigest()
    assert info.task == "classification"


def test_a_state_dict_bundle_without_network_def_is_refused(
    make_bundle: Callable[..., Path],
) -> None:
    path = make_bundle("plain", CXR)
    edit_config(path, lambda config: config.pop("network_def"))

    assert refusal(path).missing == ["key 'network_def' in inference.json"]


def test_inference_yaml_works_like_inference_json(make_bundle: Callable[..., Path]) -> None:
    from_json = inspect_bundle(make_bundle("as_json"))
    path = make_bundle("as_yaml", config_format="yaml")

    from_yaml = inspect_bundle(path)

    assert from_yaml.config_file == path / "configs" / "inference.yaml"
    assert from_yaml.labels == from_json.labels
    assert (from_yaml.modalities, from_yaml.task, from_yaml.spatial_dims) == (
        from_json.modalities,
        from_json.task,
        from_json.spatial_dims,
    )


def test_a_key_missing_from_inference_yaml_is_named(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle(config_format="yaml")
    config_path = path / "configs" / "inference.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    del config["inferer"]
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    assert refusal(path).missing == ["key 'inferer' in inference.yaml"]


def test_pacsai_yaml_sets_modality_colours_and_codes(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "configs" / "pacsai.yaml").write_text(
        yaml.safe_dump(
            {
                "modality": "ct/pt",
                "labels": {
                    "liver": {"color": [1, 2, 3]},
                    "kidney": {
                        "type": {"value": "9846003", "scheme": "SCT", "meaning": "Right kidney"}
                    },
                },
            }
        ),
        encoding="utf-8",
    )

    info = inspect_bundle(path)

    assert info.modalities == ("CT", "PT")
    liver, spleen, kidney = info.labels
    assert liver.color == (1, 2, 3)
    assert liver.type == Code("10200004", "SCT", "Liver")
    assert spleen.color == (157, 108, 162)
    assert kidney.type == Code("9846003", "SCT", "Right kidney")
    assert kidney.category == Code("91723000", "SCT", "Anatomical Structure")
    assert info.extra["modality"] == "ct/pt"


def test_pacsai_yaml_gives_codes_to_an_unknown_label(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    edit_metadata(path, lambda meta: pred(meta)["channel_def"].update({"4": "portal_vein"}))
    (path / "configs" / "pacsai.yaml").write_text(
        yaml.safe_dump(
            {
                "labels": {
                    "portal_vein": {
                        "category": {
                            "value": "91723000",
                            "scheme": "SCT",
                            "meaning": "Anatomical Structure",
                        },
                        "type": {"value": "32764006", "scheme": "SCT", "meaning": "Portal vein"},
                    }
                }
            }
        ),
        encoding="utf-8",
    )

    info = inspect_bundle(path)

    assert info.labels[-1].value == 4
    assert info.labels[-1].type == Code("32764006", "SCT", "Portal vein")


def test_a_pacsai_object_in_metadata_is_read_and_pacsai_yaml_wins(
    make_bundle: Callable[..., Path],
) -> None:
    path = make_bundle()
    edit_metadata(path, lambda meta: meta.update(pacsai={"modality": ["CT", "MR"]}))
    assert inspect_bundle(path).modalities == ("CT", "MR")

    (path / "configs" / "pacsai.yaml").write_text("modality: [PT]\n", encoding="utf-8")

    assert inspect_bundle(path).modalities == ("PT",)


def test_a_bad_colour_in_pacsai_yaml_is_named(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle()
    (path / "configs" / "pacsai.yaml").write_text(
        "labels:\n  spleen:\n    color: [300, 0, 0]\n", encoding="utf-8"
    )

    assert refusal(path).missing == ["label 'spleen': color must be three integers 0..255"]


# --- the registry -----------------------------------------------------------------------------


def test_the_registry_keeps_refused_bundles_with_their_problems(
    make_bundle: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_bundle("good", CT)
    broken = make_bundle("broken", CT)
    edit_config(broken, lambda config: config.pop("inferer"))

    with caplog.at_level(logging.WARNING, logger="pacsai.inference.registry"):
        registry = ModelRegistry(tmp_path / "models", device="cpu")

    assert {name: entry.status for name, entry in registry.entries.items()} == {
        "broken": "refused",
        "good": "ready",
    }
    assert registry.entries["broken"].problems == ("key 'inferer' in inference.json",)
    assert registry.entries["broken"].bundle is None
    assert [bundle.name for bundle in registry.bundles] == ["good"]
    assert registry.get("good").name == "good"
    refused = [r for r in caplog.records if getattr(r, "action", None) == "bundle_refused"]
    assert len(refused) == 1
    assert "'inferer'" in refused[0].getMessage()


def test_getting_a_refused_bundle_names_the_problem(
    make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    broken = make_bundle("broken", CT)
    (broken / "models" / "model.pt").unlink()
    registry = ModelRegistry(tmp_path / "models", device="cpu")

    with pytest.raises(ModelError, match=r"'broken' was refused: file models/model\.pt"):
        registry.get("broken")
    with pytest.raises(ModelError, match=r"'broken' was refused: file models/model\.pt"):
        registry.load("broken")


def test_getting_an_unknown_bundle_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    registry = ModelRegistry(tmp_path / "models")

    with pytest.raises(ModelError, match=r"no model bundle named 'nope'"):
        registry.get("nope")


def test_folders_that_are_not_bundles_are_ignored(
    make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    make_bundle("good", MR)
    (tmp_path / "models" / "__pycache__").mkdir()
    (tmp_path / "models" / "runs" / "2026-01-01").mkdir(parents=True)
    (tmp_path / "models" / "train.py").write_text("print('train')\n", encoding="utf-8")
    (tmp_path / "models" / "half").mkdir()
    (tmp_path / "models" / "half" / "models").mkdir()

    registry = ModelRegistry(tmp_path / "models")

    assert list(registry.entries) == ["good", "half"]  # a models/ folder alone is a bundle
    assert registry.entries["half"].status == "refused"


def test_a_missing_models_directory_gives_an_empty_registry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pacsai.inference.registry"):
        registry = ModelRegistry(tmp_path / "nowhere")

    assert registry.entries == {}
    assert registry.bundles == []
    assert "does not exist" in caplog.text


def test_a_rescan_sees_a_repaired_bundle(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    path = make_bundle("later", CXR)
    weights = path / "models" / "model.pt"
    kept = weights.read_bytes()
    weights.unlink()
    registry = ModelRegistry(tmp_path / "models", device="cpu")
    assert registry.entries["later"].status == "refused"

    weights.write_bytes(kept)
    registry.scan()

    assert registry.entries["later"].status == "ready"


def test_a_model_is_loaded_once_and_kept(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    make_bundle("cxr", CXR)
    registry = ModelRegistry(tmp_path / "models", device="cpu", amp=False)

    first = registry.load("cxr")
    second = registry.load("cxr")

    assert first is second
    assert str(first.device) == "cpu"
    assert first.bundle is registry.get("cxr")
    expected = _network(CXR).state_dict()
    loaded = first.network.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key].cpu(), expected[key]) for key in expected)


def test_new_weights_are_loaded_after_a_rescan(
    make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    path = make_bundle("cxr", CXR)
    registry = ModelRegistry(tmp_path / "models", device="cpu", amp=False)
    before = registry.load("cxr")
    state = {key: value + 1 for key, value in _network(CXR).state_dict().items()}
    torch.save(state, path / "models" / "model.pt")

    registry.scan()
    after = registry.load("cxr")

    assert after is not before
    assert after.bundle.weights_sha256 != before.bundle.weights_sha256
    assert registry.load("cxr") is after


def test_a_yaml_bundle_loads(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    make_bundle("cxr", CXR, config_format="yaml")
    registry = ModelRegistry(tmp_path / "models", device="cpu", amp=False)

    model = registry.load("cxr")

    assert model.bundle.config_file.name == "inference.yaml"
    assert callable(model.inferer)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_a_torchscript_bundle_loads(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    make_bundle("scripted", CXR, weights="ts")
    registry = ModelRegistry(tmp_path / "models", device="cpu", amp=False)

    model = registry.load("scripted")

    assert isinstance(model.network, torch.jit.ScriptModule)
    assert registry.load("scripted") is model
