"""UID syntax (PS3.5 9.1): what may reach a path or a query, and what is refused."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, generate_uid

from pacsai.errors import InvalidInstanceError, ReceiveError
from pacsai.scp.uids import validate_uid

SIXTY_FOUR = "1." + "2" * 62
assert len(SIXTY_FOUR) == 64


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.1.2.1",
        "0",
        "1.0.3",
        "2.25.329800735698586629295641978511506172918",
        SIXTY_FOUR,
    ],
)
def test_good_uids_are_returned_unchanged(uid: str) -> None:
    assert validate_uid(uid, "SOP Instance UID") == uid


def test_generated_and_pydicom_uids_are_accepted() -> None:
    for _ in range(50):
        uid = generate_uid()
        assert validate_uid(uid, "UID") == uid
    assert validate_uid(UID("1.2.3"), "UID") == "1.2.3"


@pytest.mark.parametrize("padded", ["1.2.3\x00", "1.2.3 ", "1.2.3\x00\x00 "])
def test_trailing_padding_is_removed(padded: str) -> None:
    assert validate_uid(padded, "UID") == "1.2.3"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "missing"),
        ("", "empty"),
        ("\x00", "empty"),
        ("   ", "empty"),
        (SIXTY_FOUR + "1", "65 characters"),
        ("1." + "2" * 200, "characters long"),
        ("../1.2.3", "not a UID"),
        ("1.2/../../etc", "not a UID"),
        ("..", "not a UID"),
        ("/1.2.3", "not a UID"),
        ("/etc/passwd", "not a UID"),
        ("1.2.3/4", "not a UID"),
        ("1.2.3\\4", "not a UID"),
        ("1.2.abc", "not a UID"),
        ("1.2.3a", "not a UID"),
        ("1.2.3e5", "not a UID"),
        ("1.02.3", "not a UID"),
        ("01.2.3", "not a UID"),
        ("1.2.00", "not a UID"),
        ("1..2", "not a UID"),
        (".1.2", "not a UID"),
        ("1.2.", "not a UID"),
        ("1.2.3.", "not a UID"),
        (" 1.2.3", "not a UID"),
        ("1. 2.3", "not a UID"),
        ("1.2.3\x00.4", "not a UID"),
        ("-1.2", "not a UID"),
        ("+1.2", "not a UID"),
        ("1,2,3", "not a UID"),
        ("\u0661.\u0662", "not a UID"),  # Arabic-Indic digits: str.isdigit, not DICOM
    ],
)
def test_bad_uids_are_refused(value: object, why: str) -> None:
    with pytest.raises(InvalidInstanceError, match=why) as caught:
        validate_uid(value, "Study Instance UID")

    assert "Study Instance UID" in str(caught.value)
    assert isinstance(caught.value, ReceiveError)


@pytest.mark.parametrize("value", ["1.2.3\n", "1.2.3\r\n", "\n1.2.3", "1.2\n.3"])
def test_line_breaks_are_refused(value: str) -> None:
    # A UID is digits and dots only; a line break must not reach a file name or a log line.
    with pytest.raises(InvalidInstanceError, match="not a UID"):
        validate_uid(value, "SOP Instance UID")


def test_the_message_does_not_echo_a_huge_value() -> None:
    with pytest.raises(InvalidInstanceError) as caught:
        validate_uid("x" * 10_000, "UID")
    assert len(str(caught.value)) < 200
