"""Routing: which route fires on a study, which series it picks, and why nothing runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, MRImageStorage, generate_uid

from pacsai._routing_attributes import RoutingAttributes, image_frames
from pacsai.config import Route, SeriesRule, StudyRule, load_settings
from pacsai.errors import ConfigError
from pacsai.inference.bundle import BundleInfo
from pacsai.inference.labels import semantics_for
from pacsai.inference.routing import (
    SeriesInfo,
    StudyInfo,
    default_routes,
    plan_study,
    read_study,
    scan_folder,
)
from tests.support import make_ct_slice, make_enhanced_ct, write_datasets

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
NEAR_AXIAL = [0.9962, 0.0872, 0.0, -0.0872, 0.9962, 0.0]  # rotated 5 degrees in plane

SOP_CLASSES = {"MR": MRImageStorage, "CR": ComputedRadiographyImageStorage}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PACSAI_ variable of the developer's shell leaks into load_settings."""
    for name in list(os.environ):
        if name.startswith("PACSAI_"):
            monkeypatch.delenv(name)


class StudyBuilder:
    """A study written to disk series by series; ``study`` attributes go on every instance."""

    def __init__(self, folder: Path, **study: Any) -> None:
        self.folder = folder
        self.uid = generate_uid()
        self.study = study

    def add(self, images: int = 3, *, modality: str = "CT", **attributes: Any) -> str:
        """Write a series of ``images`` instances; returns its SeriesInstanceUID."""
        series_uid = generate_uid()
        datasets = []
        for index in range(images):
            ds = make_ct_slice(
                study_uid=self.uid, series_uid=series_uid, index=index, rows=4, columns=4
            )
            ds.Modality = modality
            if modality in SOP_CLASSES:
                ds.SOPClassUID = SOP_CLASSES[modality]
                ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
            for keyword, value in {**self.study, **attributes}.items():
                if value is None:
                    ds.pop(keyword, None)
                else:
                    setattr(ds, keyword, value)
            datasets.append(ds)
        write_datasets(datasets, self.folder / self.uid / series_uid)
        return series_uid

    def paths(self) -> list[Path]:
        return sorted((self.folder / self.uid).rglob("*.dcm"))

    def read(self, calling_ae_title: str = "MODALITY") -> StudyInfo:
        return read_study(self.uid, self.paths(), calling_ae_title)


@pytest.fixture
def new_study(tmp_path: Path) -> Any:
    """``new_study(StudyDescription=...)``: a :class:`StudyBuilder` under ``tmp_path``."""
    count = 0

    def create(**study: Any) -> StudyBuilder:
        nonlocal count
        count += 1
        return StudyBuilder(tmp_path / f"studies{count}", **study)

    return create


def route(name: str = "r", model: str = "m", **rules: Any) -> Route:
    return Route.model_validate({"name": name, "model": model, **rules})


def chosen(study: StudyInfo, *routes: Route) -> list[tuple[str, str]]:
    """(route name, series UID) of each planned run, sorted (series order follows the files)."""
    plan = plan_study(study, routes)
    return sorted((run.route.name, run.series.series_instance_uid) for run in plan.runs)


def write_config(path: Path, routes: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"routes": routes}), encoding="utf-8")
    return path


# --- reading studies --------------------------------------------------------------------------


def test_scan_folder_groups_instances_and_skips_what_is_not_an_image(
    new_study: Any, tmp_path: Path
) -> None:
    ct = new_study(StudyDescription="CT abdomen")
    first = ct.add(4)
    second = ct.add(2, modality="MR")
    mr = new_study()
    mr.add(1, modality="MR")
    (tmp_path / "notes.txt").write_text("not DICOM", encoding="utf-8")
    (tmp_path / "empty.dcm").write_bytes(b"")
    no_pixels = make_ct_slice(study_uid=ct.uid, series_uid=generate_uid(), index=0)
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(no_pixels, keyword)
    write_datasets([no_pixels], tmp_path / "no_pixels")

    studies = {study.study_instance_uid: study for study in scan_folder(tmp_path)}

    assert set(studies) == {ct.uid, mr.uid}
    series = {s.series_instance_uid: s for s in studies[ct.uid].series}
    assert set(series) == {first, second}
    assert (series[first].images, series[second].images) == (4, 2)
    assert len(series[first].paths) == 4
    assert studies[ct.uid].modalities == {"CT", "MR"}
    assert studies[ct.uid].calling_ae_title == ""


def test_a_multiframe_instance_counts_its_frames(tmp_path: Path) -> None:
    enhanced = make_enhanced_ct(frames=5)
    write_datasets([enhanced], tmp_path)

    [study] = scan_folder(tmp_path)

    [series] = study.series
    assert series.images == 5
    assert series.orientation == "axial"  # from the shared functional groups


def test_read_study_records_the_calling_ae_title(new_study: Any) -> None:
    study = new_study()
    study.add(2)

    info = study.read(calling_ae_title="CT_SCANNER_1")

    assert info.study_instance_uid == study.uid
    assert info.calling_ae_title == "CT_SCANNER_1"
    assert info.series[0].images == 2


def test_read_study_of_an_absent_study_is_file_not_found(new_study: Any) -> None:
    study = new_study()
    study.add(1)

    with pytest.raises(FileNotFoundError, match=r"study 1\.2\.3\.4$"):
        read_study("1.2.3.4", study.paths(), "X")


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (AXIAL, "axial"),
        ([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0], "axial"),
        (SAGITTAL, "sagittal"),
        (CORONAL, "coronal"),
        (NEAR_AXIAL, "axial"),
        (None, None),
        ([1.0, 0.0, 0.0], None),
    ],
)
def test_series_orientation(orientation: list[float] | None, expected: str | None) -> None:
    header = Dataset()
    if orientation is not None:
        header.ImageOrientationPatient = orientation

    assert RoutingAttributes.of(header).orientation == expected
    assert SeriesInfo("1.2.3", RoutingAttributes.of(header)).orientation == expected


# --- what the receiver records for routing ------------------------------------------------------


def test_routing_attributes_read_a_header_as_the_rules_do() -> None:
    header = make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    header.ImageType = ["original", "PRIMARY", "AXIAL"]
    header.SliceThickness = "1.25"
    header.SeriesDescription = "Abdomen 1.25mm"
    header.BodyPartExamined = "ABDOMEN"
    header.ReferringPhysicianName = "Doe^Jane"
    header.InstitutionName = "General Hospital"
    header.StudyDescription = "CT ABDOMEN"

    attributes = RoutingAttributes.of(header)

    assert attributes == RoutingAttributes(
        modality="CT",
        series_description="Abdomen 1.25mm",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        slice_thickness=1.25,
        orientation="axial",
        body_part_examined="ABDOMEN",
        study_description="CT ABDOMEN",
        institution_name="General Hospital",
        referring_physician_name="Doe^Jane",
    )
    assert RoutingAttributes.from_json(attributes.to_json()) == attributes


def test_routing_attributes_of_a_sparse_header_are_empty_not_missing() -> None:
    header = Dataset()
    header.ImageType = "DERIVED"  # one value: not read as its letters
    header.SliceThickness = ""

    attributes = RoutingAttributes.of(header)

    assert attributes.image_type == ("DERIVED",)
    assert (attributes.modality, attributes.slice_thickness, attributes.orientation) == (
        "",
        None,
        None,
    )
    assert RoutingAttributes.from_json(attributes.to_json()) == attributes


def test_routing_attributes_of_malformed_values_count_them_missing() -> None:
    header = Dataset()
    header.add_new(0x00080008, "US", 5)  # ImageType as a number
    header.add_new(0x00200037, "LO", "upright")  # ImageOrientationPatient as text
    header.add_new(0x00180050, "LO", "thin")  # SliceThickness

    attributes = RoutingAttributes.of(header)

    assert (attributes.image_type, attributes.orientation, attributes.slice_thickness) == (
        (),
        None,
        None,
    )


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "not JSON",
        "[]",
        '{"modality": "CT"}',
        '{"modality": "CT", "x": 1}',
    ],
)
def test_a_record_of_other_attributes_is_no_record(text: str | None) -> None:
    assert RoutingAttributes.from_json(text) is None


def test_a_record_with_a_malformed_value_is_no_record() -> None:
    record = json.loads(RoutingAttributes.of(Dataset()).to_json())
    record["image_type"] = 5

    assert RoutingAttributes.from_json(json.dumps(record)) is None


def test_image_frames_counts_images_and_nothing_for_a_non_image() -> None:
    single = make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    report = Dataset()
    report.Modality = "SR"

    assert image_frames(single) == 1
    assert image_frames(make_enhanced_ct(frames=5)) == 5
    assert image_frames(report) == 0


# --- when: ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "fires"),
    [("CT", True), ("ct", True), (["MR", "CT"], True), ("MR", False), (["MR", "PT"], False)],
)
def test_when_modality(new_study: Any, modality: str | list[str], fires: bool) -> None:
    study = new_study()
    series = study.add(3)

    plan = plan_study(study.read(), [route(when={"Modality": modality})])

    assert [run.series.series_instance_uid for run in plan.runs] == ([series] if fires else [])
    if not fires:
        assert plan.reasons == [f"route 'r': study modalities CT are not {plan_wanted(modality)}"]


def plan_wanted(modality: str | list[str]) -> str:
    values = [modality] if isinstance(modality, str) else modality
    return ", ".join(sorted(v.upper() for v in values))


def test_when_modality_matches_any_series_of_the_study(new_study: Any) -> None:
    study = new_study()
    ct = study.add(3)
    study.add(1, modality="SR")

    assert chosen(study.read(), route(when={"Modality": "CT"})) == [("r", ct)]


def test_when_body_part(new_study: Any) -> None:
    study = new_study()
    series = study.add(3, BodyPartExamined="ABDOMEN")
    info = study.read()

    assert chosen(info, route(when={"BodyPartExamined": ["chest", "Abdomen"]})) == [("r", series)]
    plan = plan_study(info, [route(when={"BodyPartExamined": "HEAD"})])
    assert plan.runs == []
    assert plan.skip_reason == "route 'r': BodyPartExamined is not HEAD"


@pytest.mark.parametrize(
    ("pattern", "fires"),
    [
        ("abdomen", True),
        ("ABDOMEN.*CONTRAST", True),
        ("^ct abd", True),
        ("^abdomen", False),
        ("chest", False),
    ],
)
def test_when_study_description_is_a_case_insensitive_regex(
    new_study: Any, pattern: str, fires: bool
) -> None:
    study = new_study(StudyDescription="CT Abdomen with Contrast")
    study.add(3)

    plan = plan_study(study.read(), [route(when={"StudyDescription": pattern})])

    assert bool(plan.runs) is fires
    if not fires:
        assert plan.reasons == [f"route 'r': StudyDescription does not match {pattern!r}"]


def test_when_study_description_on_a_study_without_one(new_study: Any) -> None:
    study = new_study(StudyDescription=None)
    study.add(3)

    plan = plan_study(study.read(), [route(when={"StudyDescription": "."})])

    assert plan.runs == []
    assert plan.reasons == ["route 'r': StudyDescription does not match '.'"]


def test_when_institution_name(new_study: Any) -> None:
    study = new_study(InstitutionName="St. Elsewhere General Hospital")
    study.add(3)
    info = study.read()

    assert len(plan_study(info, [route(when={"InstitutionName": r"elsewhere\s+general"})]).runs)
    plan = plan_study(info, [route(when={"InstitutionName": "^General"})])
    assert plan.reasons == ["route 'r': InstitutionName does not match '^General'"]


def test_when_calling_ae_title(new_study: Any) -> None:
    study = new_study()
    study.add(3)
    info = study.read(calling_ae_title="CT_SCANNER_1")

    assert len(plan_study(info, [route(when={"CallingAETitle": ["MR_1", "CT_SCANNER_1"]})]).runs)
    plan = plan_study(info, [route(when={"CallingAETitle": "MR_1"})])
    assert plan.runs == []
    assert plan.reasons == ["route 'r': sent by 'CT_SCANNER_1', not MR_1"]


def test_calling_ae_title_has_a_yaml_alias(new_study: Any, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "pacsai.yaml",
        [
            {"name": "alias", "model": "m", "when": {"calling_ae_title": "CT_SCANNER_1"}},
            {"name": "keyword", "model": "m", "when": {"CallingAETitle": ["CT_SCANNER_2"]}},
        ],
    )
    study = new_study()
    series = study.add(3)

    settings = load_settings(config)

    assert settings.routes is not None
    alias, keyword = settings.routes
    assert alias.when.CallingAETitle == "CT_SCANNER_1"
    assert keyword.when.CallingAETitle == ["CT_SCANNER_2"]
    assert chosen(study.read("CT_SCANNER_1"), *settings.routes) == [("alias", series)]
    assert chosen(study.read("CT_SCANNER_2"), *settings.routes) == [("keyword", series)]


def test_every_when_condition_must_hold(new_study: Any) -> None:
    study = new_study(StudyDescription="CT abdomen", InstitutionName="General")
    study.add(3)
    rule = {"Modality": "CT", "StudyDescription": "abdomen", "InstitutionName": "nowhere"}

    plan = plan_study(study.read(), [route(when=rule)])

    assert plan.runs == []
    assert plan.reasons == ["route 'r': InstitutionName does not match 'nowhere'"]


def test_an_empty_when_matches_any_study(new_study: Any) -> None:
    study = new_study()
    series = study.add(1, modality="MR")

    assert chosen(study.read(), route()) == [("r", series)]


# --- series: ----------------------------------------------------------------------------------


def test_series_modality(new_study: Any) -> None:
    study = new_study()
    study.add(3)
    mr = study.add(3, modality="MR")

    assert chosen(study.read(), route(series={"Modality": ["mr"]})) == [("r", mr)]


def test_series_description_is_a_case_insensitive_regex(new_study: Any) -> None:
    study = new_study()
    venous = study.add(3, SeriesDescription="Portal Venous 2.5mm")
    study.add(3, SeriesDescription="Scout")
    study.add(3, SeriesDescription=None)

    assert chosen(study.read(), route(series={"SeriesDescription": "venous"})) == [("r", venous)]


def test_series_image_type_must_contain_every_listed_value(new_study: Any) -> None:
    study = new_study()
    original = study.add(3, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    derived = study.add(4, ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    study.add(5, ImageType=None)
    info = study.read()
    every = {"select": "all"}

    assert chosen(info, route(series={"ImageType": ["ORIGINAL", "AXIAL"], **every})) == [
        ("r", original)
    ]
    assert chosen(info, route(series={"ImageType": "axial", **every})) == sorted(
        [("r", original), ("r", derived)]
    )
    plan = plan_study(info, [route(series={"ImageType": ["ORIGINAL", "LOCALIZER"]})])
    assert plan.runs == []
    assert f"{original}: ImageType ORIGINAL\\PRIMARY\\AXIAL" in plan.skip_reason
    assert f"{derived}: ImageType DERIVED\\SECONDARY\\AXIAL" in plan.skip_reason
    assert "ImageType none" in plan.skip_reason


def test_series_slice_thickness_range(new_study: Any) -> None:
    study = new_study()
    thin = study.add(3, SliceThickness=1.0)
    middle = study.add(3, SliceThickness=2.5)
    thick = study.add(3, SliceThickness=5.0)
    missing = study.add(3, SliceThickness=None)

    assert chosen(study.read(), route(series={"SliceThickness": [1.0, 3.0], "select": "all"})) == (
        sorted([("r", thin), ("r", middle)])
    )
    rejected = plan_study(study.read(), [route(series={"SliceThickness": [6, 8]})])
    assert f"{thick}: SliceThickness 5.0" in rejected.skip_reason
    assert f"{missing}: SliceThickness None" in rejected.skip_reason


def test_series_min_and_max_instances(new_study: Any) -> None:
    study = new_study()
    few = study.add(2)
    enough = study.add(5)
    many = study.add(12)

    plan = plan_study(
        study.read(), [route(series={"min_instances": 3, "max_instances": 10, "select": "all"})]
    )

    assert [run.series.series_instance_uid for run in plan.runs] == [enough]
    rejected = plan_study(study.read(), [route(series={"min_instances": 20})])
    assert f"{few}: 2 images < min_instances 20" in rejected.skip_reason
    assert f"{many}: 12 images < min_instances 20" in rejected.skip_reason
    capped = plan_study(study.read(), [route(series={"max_instances": 1})])
    assert f"{many}: 12 images > max_instances 1" in capped.skip_reason


def test_series_orientation_rule(new_study: Any) -> None:
    study = new_study()
    axial = study.add(3, ImageOrientationPatient=AXIAL)
    sagittal = study.add(3, ImageOrientationPatient=SAGITTAL)
    coronal = study.add(3, ImageOrientationPatient=CORONAL)
    unknown = study.add(3, ImageOrientationPatient=None)
    info = study.read()

    assert chosen(info, route(series={"orientation": "sagittal"})) == [("r", sagittal)]
    assert chosen(info, route(series={"orientation": "coronal"})) == [("r", coronal)]
    assert chosen(info, route(series={"orientation": ["axial", "coronal"], "select": "all"})) == (
        sorted([("r", axial), ("r", coronal)])
    )
    plan = plan_study(info, [route(series={"orientation": "sagittal", "min_instances": 3})])
    assert len(plan.runs) == 1
    rejected = plan_study(info, [route(series={"orientation": [], "select": "all"})])
    assert f"{axial}: orientation axial" in rejected.skip_reason
    assert f"{unknown}: orientation unknown" in rejected.skip_reason


def test_select_largest_or_all(new_study: Any) -> None:
    study = new_study()
    small = study.add(3)
    large = study.add(7)
    middle = study.add(5)
    info = study.read()

    assert chosen(info, route(series={"select": "largest"})) == [("r", large)]
    assert chosen(info, route()) == [("r", large)]  # largest is the default
    assert chosen(info, route(series={"select": "all"})) == sorted(
        [("r", small), ("r", large), ("r", middle)]
    )


# --- plans ------------------------------------------------------------------------------------


def test_several_routes_fire_on_one_study(new_study: Any) -> None:
    study = new_study(StudyDescription="CT abdomen")
    ct = study.add(10)
    mr = study.add(4, modality="MR")

    runs = chosen(
        study.read(),
        route("organs", "ct_abdomen", when={"Modality": "CT"}, series={"Modality": "CT"}),
        route("lesions", "mr_brain", when={"Modality": "MR"}, series={"Modality": "MR"}),
        route("chest", "cxr", when={"Modality": "CR"}),
        route("every", "any", series={"select": "all"}),
    )

    assert ("organs", ct) in runs and ("lesions", mr) in runs
    assert ("every", ct) in runs and ("every", mr) in runs
    assert len(runs) == 4


def test_no_route_matching_names_each_route_and_why(new_study: Any) -> None:
    study = new_study(StudyDescription="MR brain")
    study.add(3, modality="MR")

    plan = plan_study(
        study.read(calling_ae_title="MR_1"),
        [
            route("organs", when={"Modality": "CT"}),
            route("chest", when={"StudyDescription": "thorax|chest"}),
            route("scanner", when={"CallingAETitle": "CT_1"}),
        ],
    )

    assert plan.runs == []
    assert plan.skip_reason == (
        "route 'organs': study modalities MR are not CT; "
        "route 'chest': StudyDescription does not match 'thorax|chest'; "
        "route 'scanner': sent by 'MR_1', not CT_1"
    )


def test_a_route_without_a_usable_series_lists_each_series_and_why(new_study: Any) -> None:
    study = new_study()
    scout = study.add(2, SeriesDescription="Scout")
    thick = study.add(30, SliceThickness=5.0, SeriesDescription="Abdomen 5mm")
    study.add(3, modality="SR")

    plan = plan_study(
        study.read(),
        [
            route(
                "organs",
                when={"Modality": "CT"},
                series={"Modality": "CT", "min_instances": 10, "SliceThickness": [0.5, 3.0]},
            )
        ],
    )

    assert plan.runs == []
    [reason] = plan.reasons
    assert reason.startswith("route 'organs': no usable series (")
    assert f"{scout}: 2 images < min_instances 10" in reason
    assert f"{thick}: SliceThickness 5.0" in reason
    assert "modality SR" in reason


def test_reasons_are_kept_for_routes_that_did_not_run_beside_ones_that_did(
    new_study: Any,
) -> None:
    study = new_study()
    ct = study.add(3)

    plan = plan_study(
        study.read(), [route("ct", when={"Modality": "CT"}), route("mr", when={"Modality": "MR"})]
    )

    assert [(run.route.name, run.series.series_instance_uid) for run in plan.runs] == [("ct", ct)]
    assert plan.reasons == ["route 'mr': study modalities CT are not MR"]


def test_no_routes_at_all_is_a_reason(new_study: Any) -> None:
    study = new_study()
    study.add(3)

    plan = plan_study(study.read(), [])

    assert plan.runs == []
    assert "no route is configured" in plan.skip_reason


# --- default routes ---------------------------------------------------------------------------


def bundle_info(name: str, modalities: tuple[str, ...], spatial_dims: int) -> BundleInfo:
    return BundleInfo(
        name=name,
        path=Path("/models") / name,
        version="1",
        description=name,
        modalities=modalities,
        task="segmentation" if spatial_dims == 3 else "classification",
        spatial_dims=spatial_dims,
        labels=(semantics_for(1, "liver", None),),
        config_file=Path("/models") / name / "configs" / "inference.json",
        weights=Path("/models") / name / "models" / "model.pt",
        weights_sha256="0" * 64,
    )


def test_default_routes_for_a_3d_ct_and_a_2d_cr_bundle(new_study: Any) -> None:
    ct_bundle = bundle_info("ct_organs", ("CT",), 3)
    cr_bundle = bundle_info("cxr", ("CR", "DX"), 2)

    ct_route, cr_route = default_routes([ct_bundle, cr_bundle], ["pacs", "viewer"])

    assert (ct_route.name, ct_route.model) == ("ct_organs", "ct_organs")
    assert ct_route.when == StudyRule(Modality=["CT"])
    assert ct_route.series == SeriesRule(Modality=["CT"], min_instances=10)
    assert ct_route.send_to == ["pacs", "viewer"]
    assert (cr_route.name, cr_route.model) == ("cxr", "cxr")
    assert cr_route.when == StudyRule(Modality=["CR", "DX"])
    assert cr_route.series == SeriesRule(Modality=["CR", "DX"], max_instances=1)
    assert cr_route.send_to == ["pacs", "viewer"]

    ct_study = new_study()
    volume = ct_study.add(12)
    ct_study.add(4)
    assert chosen(ct_study.read(), ct_route, cr_route) == [("ct_organs", volume)]
    short = new_study()
    short.add(9)
    plan = plan_study(short.read(), [ct_route, cr_route])
    assert plan.runs == []
    assert "9 images < min_instances 10" in plan.skip_reason
    assert "route 'cxr': study modalities CT are not CR, DX" in plan.skip_reason
    radiograph = new_study()
    single = radiograph.add(1, modality="CR")
    assert chosen(radiograph.read(), ct_route, cr_route) == [("cxr", single)]
    stack = new_study()
    stack.add(2, modality="DX")
    assert "2 images > max_instances 1" in plan_study(stack.read(), [cr_route]).skip_reason


def test_default_routes_of_no_bundle_are_empty() -> None:
    assert default_routes([], ["pacs"]) == []


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        ({"when": {"Modalty": "CT"}}, "routes.0.when.Modalty: unknown key"),
        ({"when": {"SeriesDescription": "x"}}, "routes.0.when.SeriesDescription: unknown key"),
        ({"series": {"slice_thickness": [1, 2]}}, "routes.0.series.slice_thickness: unknown key"),
        (
            {"series": {"BodyPartExamined": "CHEST"}},
            "routes.0.series.BodyPartExamined: unknown key",
        ),
    ],
)
def test_an_unknown_route_key_is_refused_by_name(
    tmp_path: Path, rules: dict[str, Any], key: str
) -> None:
    config = write_config(tmp_path / "bad.yaml", [{"name": "r", "model": "m", **rules}])

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert key in str(caught.value)
    assert str(config) in str(caught.value)


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        ({"when": {"StudyDescription": "abdomen("}}, "routes.0.when.StudyDescription"),
        ({"when": {"InstitutionName": "[General"}}, "routes.0.when.InstitutionName"),
        ({"series": {"SeriesDescription": "*venous"}}, "routes.0.series.SeriesDescription"),
    ],
)
def test_a_bad_regex_is_refused_by_name(tmp_path: Path, rules: dict[str, Any], key: str) -> None:
    config = write_config(
        tmp_path / "bad.yaml",
        [{"name": "ok", "model": "m"}, {"name": "r", "model": "m", **rules}],
    )

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    message = str(caught.value)
    assert key.replace("routes.0", "routes.1") in message
    assert "is not a valid regular expression" in message


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        ({"series": {"orientation": "oblique"}}, "routes.0.series.orientation"),
        ({"series": {"select": "first"}}, "routes.0.series.select"),
        ({"series": {"min_instances": 0}}, "routes.0.series.min_instances"),
        ({"series": {"SliceThickness": [1.0]}}, "routes.0.series.SliceThickness"),
    ],
)
def test_a_bad_series_value_is_refused_by_name(
    tmp_path: Path, rules: dict[str, Any], key: str
) -> None:
    config = write_config(tmp_path / "bad.yaml", [{"name": "r", "model": "m", **rules}])

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(config)


def test_a_full_route_loads_from_yaml(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "pacsai.yaml",
        [
            {
                "name": "ct-abdomen",
                "model": "ct_abdomen_demo",
                "when": {
                    "Modality": "CT",
                    "BodyPartExamined": ["ABDOMEN", "CHEST"],
                    "StudyDescription": "abd",
                    "InstitutionName": "General",
                    "CallingAETitle": "CT1",
                },
                "series": {
                    "Modality": "CT",
                    "SeriesDescription": "venous",
                    "ImageType": ["ORIGINAL", "PRIMARY"],
                    "SliceThickness": [0.5, 3],
                    "min_instances": 40,
                    "max_instances": 2000,
                    "orientation": "axial",
                    "select": "all",
                },
            }
        ],
    )

    [loaded] = load_settings(config).routes or []

    assert loaded.when.BodyPartExamined == ["ABDOMEN", "CHEST"]
    assert loaded.series.SliceThickness == (0.5, 3.0)
    assert loaded.series.orientation == ["axial"]
    assert loaded.series.select == "all"


def test_rules_are_frozen() -> None:
    rule = SeriesRule(min_instances=3)

    with pytest.raises(ValueError, match="frozen"):
        rule.min_instances = 4  # type: ignore[misc]
