"""`pacsai models`, `pacsai routes test` and `pacsai phantom`, as people use them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from pydicom import dcmread
from pydicom.uid import CTImageStorage, SegmentationStorage

from pacsai.cli import main
from tests.support import make_ct_slice, write_datasets
from tests.unit.test_bundle import CT, CXR, edit_config, write_bundle


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PACSAI_ variable of the developer's shell changes the configuration under test."""
    for name in list(os.environ):
        if name.startswith("PACSAI_"):
            monkeypatch.delenv(name)


def pacsai(*args: str | Path) -> Result:
    runner = CliRunner()
    # Rich sizes its tables from COLUMNS when the output is not a terminal.
    return runner.invoke(main, [str(a) for a in args], env={"COLUMNS": "250"})


def write_settings(path: Path, models_dir: Path, **extra: Any) -> Path:
    data = {"inference": {"models_dir": str(models_dir), "device": "cpu"}, **extra}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A CT organ bundle and a chest radiograph bundle that pass, and one that does not."""
    models = tmp_path / "models"
    write_bundle(models / "ct_organs", CT)
    write_bundle(models / "cxr", CXR)
    broken = write_bundle(models / "broken", CT)
    (broken / "models" / "model.pt").unlink()
    edit_config(broken, lambda config: config.pop("inferer"))
    return models


@pytest.fixture
def config(tmp_path: Path, models_dir: Path) -> Path:
    return write_settings(tmp_path / "pacsai.yaml", models_dir)


def column(output: str, index: int) -> str:
    """The text of one column of a Rich table's body (every row, wrapped lines rejoined)."""
    cells = []
    for line in output.splitlines():
        parts = [part.strip() for part in line.split("│")]
        if len(parts) > index + 1 and parts[index + 1]:
            cells.append(parts[index + 1])
    return " ".join(cells)


def write_series(
    folder: Path, study_uid: str, series_uid: str, count: int, **attributes: Any
) -> None:
    datasets = []
    for index in range(count):
        ds = make_ct_slice(
            study_uid=study_uid, series_uid=series_uid, index=index, rows=8, columns=8
        )
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        datasets.append(ds)
    write_datasets(datasets, folder)


# --- pacsai models ----------------------------------------------------------------------------


def test_models_list_shows_ready_and_refused_bundles(config: Path, models_dir: Path) -> None:
    result = pacsai("models", "list", "--config", config)

    assert result.exit_code == 0, result.output
    rows = {
        line.split("│")[1].strip(): line
        for line in result.stdout.splitlines()
        if line.count("│") >= 7
    }
    assert set(rows) == {"broken", "ct_organs", "cxr"}
    assert "ready" in rows["ct_organs"] and "ready" in rows["cxr"]
    assert "refused" in rows["broken"]
    assert "liver, spleen, kidney" in rows["ct_organs"]
    assert "segmentation 3D" in rows["ct_organs"]
    assert "CR/DX" in rows["cxr"] and "classification 2D" in rows["cxr"]
    assert "cpu" in rows["ct_organs"]
    assert "0.1.0+" in rows["ct_organs"]
    assert str(models_dir) in result.stdout
    assert (
        "broken: refused: file models/model.pt (the load_path of handlers#0 in the inference "
        "config); "
        "key 'inferer' in inference.json"
    ) in result.stderr


def test_models_list_of_a_missing_directory_is_an_empty_table(tmp_path: Path) -> None:
    config = write_settings(tmp_path / "pacsai.yaml", tmp_path / "nowhere")

    result = pacsai("models", "list", "--config", config)

    assert result.exit_code == 0, result.output
    assert "ready" not in result.stdout and "refused" not in result.output


def test_models_check_passes_a_good_bundle(config: Path) -> None:
    result = pacsai("models", "check", "ct_organs", "--config", config)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ct_organs: OK 0.1.0+")
    assert "on cpu; CT segmentation 3D; loaded in " in result.stdout
    assert ", ran in " in result.stdout  # it ran once on a synthetic volume
    assert "1=liver (Liver), 2=spleen (Spleen), 3=kidney (Kidney)" in result.stdout


def test_models_check_refuses_a_broken_bundle_naming_what_is_missing(config: Path) -> None:
    result = pacsai("models", "check", "broken", "--config", config)

    assert result.exit_code == 1
    assert "broken: REFUSED" in result.stdout
    assert "file models/model.pt" in result.stdout
    assert "key 'inferer' in inference.json" in result.stdout


def test_models_check_of_all_bundles_fails_if_one_is_broken(config: Path) -> None:
    result = pacsai("models", "check", "--config", config)

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["broken", "ct_organs", "cxr"]
    assert "REFUSED" in lines[0]
    assert lines[1].startswith("ct_organs: OK") and lines[2].startswith("cxr: OK")
    assert "0=nodule (Nodule), 1=effusion (Pleural effusion)" in lines[2]


@pytest.mark.gpu
def test_models_check_loads_on_the_gpu(tmp_path: Path, models_dir: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to PyTorch")
    config = tmp_path / "gpu.yaml"
    config.write_text(
        yaml.safe_dump({"inference": {"models_dir": str(models_dir), "device": "cuda:0"}}),
        encoding="utf-8",
    )

    result = pacsai("models", "check", "ct_organs", "cxr", "--config", config)

    assert result.exit_code == 0, result.output
    assert result.stdout.count(" on cuda:0; ") == 2


def test_models_check_of_good_bundles_only_exits_0(config: Path) -> None:
    result = pacsai("models", "check", "ct_organs", "cxr", "--config", config)

    assert result.exit_code == 0, result.output
    assert result.stdout.count(": OK ") == 2


def test_models_check_of_an_unknown_name(config: Path) -> None:
    result = pacsai("models", "check", "nope", "--config", config)

    assert result.exit_code == 1
    assert "nope: REFUSED: no model bundle named 'nope'" in result.stdout


def test_models_check_with_no_bundles_exits_1(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    config = write_settings(tmp_path / "pacsai.yaml", tmp_path / "models")

    result = pacsai("models", "check", "--config", config)

    assert result.exit_code == 1
    assert f"no bundles in {tmp_path / 'models'}" in result.stdout


def test_models_check_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(yaml.safe_dump({"inference": {"model_dir": "x"}}), encoding="utf-8")

    result = pacsai("models", "check", "--config", config)

    assert result.exit_code == 2
    assert "inference.model_dir: unknown key" in result.stderr


# --- pacsai routes test -----------------------------------------------------------------------


def test_routes_test_shows_the_route_model_and_series(config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    write_series(folder / "ct", "1.2.3.10", "1.2.3.10.1", 12, SeriesDescription="Venous")
    write_series(folder / "ct", "1.2.3.10", "1.2.3.10.2", 3, SeriesDescription="Scout")
    (folder / "README.txt").write_text("not DICOM", encoding="utf-8")

    result = pacsai("routes", "test", folder, "--config", config)

    assert result.exit_code == 0, result.output
    assert "Routing of 1 studies" in result.stdout
    assert column(result.stdout, 0) == "1.2.3.10"
    assert column(result.stdout, 1) == "ct_organs"  # the default route of the CT bundle
    assert column(result.stdout, 2) == "ct_organs"
    assert column(result.stdout, 3) == "series 1.2.3.10.1 (CT, 'Venous', 12 images)"


def test_routes_test_says_why_a_study_is_skipped(config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    write_series(folder / "ct", "1.2.3.10", "1.2.3.10.1", 12)
    write_series(folder / "mr", "1.2.3.20", "1.2.3.20.1", 4, Modality="MR")

    result = pacsai("routes", "test", folder, "--config", config)

    assert result.exit_code == 0, result.output
    assert "Routing of 2 studies" in result.stdout
    assert "1.2.3.20" in column(result.stdout, 0)
    assert "SKIPPED" in column(result.stdout, 1)
    reason = column(result.stdout, 3)
    assert "route 'ct_organs': study modalities MR are not CT" in reason
    assert "route 'cxr': study modalities MR are not CR, DX" in reason


def test_routes_test_uses_the_configured_routes(tmp_path: Path, models_dir: Path) -> None:
    routes = [
        {
            "name": "abdomen",
            "model": "ct_organs",
            "when": {"Modality": "CT", "StudyDescription": "abdomen"},
            "series": {"min_instances": 3, "select": "all"},
        }
    ]
    config = write_settings(tmp_path / "pacsai.yaml", models_dir, routes=routes)
    folder = tmp_path / "incoming"
    write_series(folder / "a", "1.2.3.30", "1.2.3.30.1", 4, StudyDescription="CT ABDOMEN")
    write_series(folder / "a", "1.2.3.30", "1.2.3.30.2", 5, StudyDescription="CT ABDOMEN")
    write_series(folder / "b", "1.2.3.40", "1.2.3.40.1", 4, StudyDescription="CT HEAD")

    result = pacsai("routes", "test", folder, "--config", config)

    assert result.exit_code == 0, result.output
    assert column(result.stdout, 1).split().count("abdomen") == 2
    series = column(result.stdout, 3)
    assert "series 1.2.3.30.1 (CT" in series and "series 1.2.3.30.2 (CT" in series
    assert "route 'abdomen': StudyDescription does not match 'abdomen'" in series


def test_routes_test_on_a_folder_without_images_is_an_error(config: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "notes.dcm").write_text("not DICOM", encoding="utf-8")

    for folder in (empty, only_text):
        result = pacsai("routes", "test", folder, "--config", config)

        assert result.exit_code == 1
        assert f"pacsai: no DICOM images found under {folder}" in result.stderr
        assert result.stdout == ""


def test_routes_test_on_a_missing_folder_is_a_usage_error(config: Path, tmp_path: Path) -> None:
    result = pacsai("routes", "test", tmp_path / "nowhere", "--config", config)

    assert result.exit_code == 2
    assert "does not exist" in result.stderr


# --- pacsai phantom ---------------------------------------------------------------------------


def dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` with the DICM preamble (the phantom's truth may sit beside them)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


def test_phantom_ct_writes_a_study_and_its_segmentation(tmp_path: Path) -> None:
    out = tmp_path / "phantom"

    result = pacsai("phantom", "ct", out, "--seed", "3")

    assert result.exit_code == 0, result.output
    headers = [dcmread(path, stop_before_pixels=True) for path in dicom_files(out)]
    images = [h for h in headers if h.SOPClassUID == CTImageStorage]
    segmentations = [h for h in headers if h.SOPClassUID == SegmentationStorage]
    assert len(images) >= 10
    assert len(segmentations) == 1
    assert len({h.StudyInstanceUID for h in images + segmentations}) == 1
    assert f"{len(images)} images of study {images[0].StudyInstanceUID}" in result.stdout
    assert "ground truth:" in result.stdout


def test_phantom_ct_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    def pixels(folder: Path) -> list[bytes]:
        datasets = [dcmread(path) for path in dicom_files(folder)]
        ct = [ds for ds in datasets if ds.SOPClassUID == CTImageStorage]
        return [ds.PixelData for ds in sorted(ct, key=lambda ds: int(ds.InstanceNumber))]

    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        result = pacsai("phantom", "ct", tmp_path / name, "--seed", seed)
        assert result.exit_code == 0, result.output

    assert pixels(tmp_path / "a") == pixels(tmp_path / "b")
    assert pixels(tmp_path / "a") != pixels(tmp_path / "c")


def test_a_phantom_ct_is_routed_to_the_ct_bundle(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "phantom"
    assert pacsai("phantom", "ct", out, "--seed", "3").exit_code == 0

    result = pacsai("routes", "test", out, "--config", config)

    assert result.exit_code == 0, result.output
    assert "ct_organs" in column(result.stdout, 1)
    assert "(CT," in column(result.stdout, 3)


def test_models_codes_lists_exactly_the_labels_that_need_codes(
    config: Path, models_dir: Path
) -> None:
    metadata = models_dir / "ct_organs" / "configs" / "metadata.json"
    meta = json.loads(metadata.read_text(encoding="utf-8"))
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    channels.update({"4": "Left Kideny", "5": "kidney_right"})
    metadata.write_text(json.dumps(meta), encoding="utf-8")

    result = pacsai("models", "codes", "ct_organs", "--config", config)

    assert result.exit_code == 0, result.output
    stub = yaml.safe_load(result.stdout)
    assert list(stub["labels"]) == ["Left Kideny"]  # kidney_right is known, with laterality
    written = pacsai("models", "codes", "ct_organs", "--write", "--config", config)
    assert written.exit_code == 0, written.output
    check = pacsai("models", "check", "ct_organs", "--config", config)
    assert check.exit_code == 1
    assert "label 'Left Kideny': category must be a mapping" in check.stdout
