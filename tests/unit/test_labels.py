"""Label semantics: SNOMED CT codes from the built-in table, pacsai.yaml overrides, colours."""

from __future__ import annotations

from typing import Any

import pytest

from pacsai.inference.labels import BUILTIN_LABELS, Code, normalise_name, semantics_for

ANATOMICAL_STRUCTURE = "91723000"
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = "49755003"

# CID 7150 "Segmentation Property Categories" (PS3.16), the SNOMED CT part.
CID_7150 = {
    "85756007": "Tissue",
    "91723000": "Anatomical Structure",
    "260787004": "Physical object",
    "49755003": "Morphologically Abnormal Structure",
    "246464006": "Function",
    "309825002": "Spatial and Relational Concept",
    "105590001": "Substance",
    "91720002": "Body Substance",
}


@pytest.mark.parametrize(
    ("name", "type_value", "type_meaning"),
    [
        ("liver", "10200004", "Liver"),
        ("spleen", "78961009", "Spleen"),
        ("kidney", "64033007", "Kidney"),
        ("lesion", "52988006", "Lesion"),
        ("nodule", "27925004", "Nodule"),
        ("pleural_effusion", "60046008", "Pleural effusion"),
        ("effusion", "60046008", "Pleural effusion"),
    ],
)
def test_builtin_types_are_the_snomed_ct_codes(
    name: str, type_value: str, type_meaning: str
) -> None:
    label = semantics_for(1, name, None)

    assert label.type == Code(type_value, "SCT", type_meaning)
    assert label.name == name
    assert label.value == 1


@pytest.mark.parametrize(
    ("name", "category_value"),
    [
        ("liver", ANATOMICAL_STRUCTURE),
        ("spleen", ANATOMICAL_STRUCTURE),
        ("kidney", ANATOMICAL_STRUCTURE),
        ("lesion", MORPHOLOGICALLY_ABNORMAL_STRUCTURE),
        ("nodule", MORPHOLOGICALLY_ABNORMAL_STRUCTURE),
    ],
)
def test_builtin_categories_come_from_cid_7150(name: str, category_value: str) -> None:
    label = semantics_for(1, name, None)

    assert label.category == Code(category_value, "SCT", CID_7150[category_value])


def test_every_builtin_category_is_a_cid_7150_concept() -> None:
    outside = {
        name: category.value
        for name, (category, _type, _color) in BUILTIN_LABELS.items()
        if category.scheme != "SCT" or category.value not in CID_7150
    }

    assert outside == {}


def test_builtin_colours_are_rgb_triples() -> None:
    for name, (_category, _type, color) in BUILTIN_LABELS.items():
        assert len(color) == 3, name
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in color), name


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("Small Intestine", "small_intestine"),
        ("small-intestine", "small_intestine"),
        ("  LIVER ", "liver"),
        ("Pleural   Effusion", "pleural_effusion"),
        ("spinal - cord", "spinal_cord"),
        ("kidney", "kidney"),
    ],
)
def test_names_are_normalised(given: str, normalised: str) -> None:
    assert normalise_name(given) == normalised


def test_a_label_is_looked_up_by_its_normalised_name_and_keeps_its_own() -> None:
    label = semantics_for(3, "Pleural Effusion", None)

    assert label.type.value == "60046008"
    assert label.name == "Pleural Effusion"
    assert label.value == 3


def test_an_override_wins_over_the_builtin_table() -> None:
    override = {
        "category": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"},
        "type": {"value": "12345", "scheme": "99LOCAL", "meaning": "Liver parenchyma"},
        "color": [1, 2, 3],
    }

    label = semantics_for(1, "liver", override)

    assert label.category == Code("85756007", "SCT", "Tissue")
    assert label.type == Code("12345", "99LOCAL", "Liver parenchyma")
    assert label.color == (1, 2, 3)


def test_an_override_of_the_colour_only_keeps_the_builtin_codes() -> None:
    label = semantics_for(1, "spleen", {"color": [10, 20, 30]})

    assert label.type == Code("78961009", "SCT", "Spleen")
    assert label.color == (10, 20, 30)


def test_an_unknown_label_needs_a_category() -> None:
    with pytest.raises(ValueError, match=r"label 'portal_vein' has no coded meaning"):
        semantics_for(1, "portal_vein", None)


def test_an_unknown_label_with_a_category_but_no_type_is_refused() -> None:
    override = {
        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}
    }

    with pytest.raises(ValueError, match=r"label 'portal_vein' has no coded type"):
        semantics_for(1, "portal_vein", override)


def test_an_unknown_label_with_codes_gets_a_palette_colour() -> None:
    override = {
        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "32764006", "scheme": "SCT", "meaning": "Portal vein"},
    }

    first = semantics_for(1, "portal_vein", override)
    second = semantics_for(2, "portal_vein", override)

    assert first.type == Code("32764006", "SCT", "Portal vein")
    assert first.color != second.color
    assert all(0 <= c <= 255 for c in first.color + second.color)


@pytest.mark.parametrize(
    "color",
    [[256, 0, 0], [-1, 0, 0], [1, 2], [1, 2, 3, 4], "red", [1.5, 0, 0], ["1", "2", "3"], None],
)
def test_bad_colours_are_refused(color: Any) -> None:
    with pytest.raises(ValueError, match=r"label 'liver': color must be three integers 0\.\.255"):
        semantics_for(1, "liver", {"color": color})


@pytest.mark.parametrize(
    "code",
    [
        {"value": "10200004", "scheme": "SCT"},
        {"value": True, "scheme": "SCT", "meaning": "Liver"},
        {"value": "", "scheme": "SCT", "meaning": "Liver"},
        "10200004",
        None,
    ],
)
def test_a_malformed_code_is_refused_naming_where(code: Any) -> None:
    with pytest.raises(ValueError, match=r"label 'liver': type must be a mapping"):
        semantics_for(1, "liver", {"type": code})


def test_code_from_mapping() -> None:
    code = Code.from_mapping({"value": "10200004", "scheme": "SCT", "meaning": "Liver"}, "here")

    assert code == Code("10200004", "SCT", "Liver")
    with pytest.raises(ValueError, match=r"^here must be"):
        Code.from_mapping(["10200004", "SCT", "Liver"], "here")


def test_an_unquoted_numeric_code_value_is_read_as_text() -> None:
    label = semantics_for(
        1,
        "organ x",
        {
            "category": {"value": 91723000, "scheme": "SCT", "meaning": "Anatomical Structure"},
            "type": {"value": 10200004, "scheme": "SCT", "meaning": "Liver"},
        },
    )

    assert label.type == Code("10200004", "SCT", "Liver")
