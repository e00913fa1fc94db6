"""Hostile input to `pacsai serve` over real associations.

Malformed files written by others, seeded byte-level mutations of a valid CT slice, and UIDs built
to escape the spool. Each instance must be refused with a failure status, or stored exactly as it
was sent (the spool file holds the same data set bytes and a row records it). The server must stay
up and go on storing clean series afterwards. A refusal must leave nothing behind, and a data set
cut short must not be acknowledged.

Instances are sent byte for byte, never re-encoded: pynetdicom's
``_config.STORE_SEND_CHUNKED_DATASET`` streams the data set of a Part 10 file as it is on disk.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import socket
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.config
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.status import code_to_category
from sqlalchemy import func, select

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from pacsai.db import Database, Instance, Series
from tests.support import ServeProcess, make_ct_series, make_ct_slice

PYDICOM_FILES = "pydicom/src/pydicom/data/test_files"
ORTHANC_FILES = "orthanc-tests/Database"
TOTALSEGMENTATOR_CT = "TotalSegmentator/tests/reference_files/example_ct_dicom"

#: The "malformed and hostile" files of shared/dicom/README.md that exist in pydicom's test data:
#: no or broken file meta, truncated, bad VR, undefined-length oddities, empty character set.
PYDICOM_HOSTILE = (
    "no_meta.dcm",
    "no_meta_group_length.dcm",
    "meta_missing_tsyntax.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "ExplVR_LitEndNoMeta.dcm",
    "MR_truncated.dcm",
    "rtplan_truncated.dcm",
    "badVR.dcm",
    "UN_sequence.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "empty_charset_LEI.dcm",
)
ORTHANC_HOSTILE_GLOBS = (
    "2026-05-26-oob-monochrome-*.dcm",
    "2017-06-27-XSSInjection.dcm",
    "Issue*.dcm",
    "UnknownSopClassUid.dcm",
)

SUPPORTED_SOP_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)
META_KEYWORDS = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")

NO_RESPONSE = "no response (association aborted)"
CONTEXT_REFUSED = "presentation context refused"

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SPOOL_NAME = re.compile(r"^(?P<uid>[0-9.]+)\.[0-9a-f]{16}\.dcm$")

MUTATION_SEED = 20260526
MUTATION_COUNT = 1200
MUTATION_ASSOCIATIONS = 4


# --- Part 10 bytes ------------------------------------------------------------------------------


def _part10(meta: FileMetaDataset, body: bytes) -> bytes:
    """Preamble, prefix and `meta` (group length and version added), then `body` unchanged."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + body


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file as pacsai spools it: after (0002,0000)-counted meta."""
    assert part10[128:132] == b"DICM", "not a Part 10 file"
    assert part10[132:138] == b"\x02\x00\x00\x00UL", "file meta does not start with its length"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length :]


def _body(ds: Dataset) -> bytes:
    """`ds` encoded in Explicit VR Little Endian, without file meta."""
    encoded = encode(ds, False, True)
    assert encoded is not None
    return encoded


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """One instance to send: a Part 10 file, and what its C-STORE request will carry."""

    label: str
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    body: bytes  # the data set bytes that go on the wire


def _outgoing(label: str, path: Path, meta: FileMetaDataset, body: bytes) -> _Outgoing:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_part10(meta, body))
    return _Outgoing(
        label,
        path,
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        body,
    )


# --- sending ------------------------------------------------------------------------------------


def _no_delay(assoc: Association) -> None:
    """Switch Nagle off on the sender's socket: without it each C-STORE waits ~40 ms for an ACK."""
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Sender:
    """A calling AE that sends files byte for byte and re-associates after an abort."""

    def __init__(self, port: int, contexts: Iterable[tuple[str, str]], ae_title: str) -> None:
        self.port = port
        self.ae = AE(ae_title=ae_title)
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        self.ae.network_timeout = 60
        wanted = sorted(set(contexts))
        assert len(wanted) <= 128, "one association offers at most 128 presentation contexts"
        for abstract_syntax, transfer_syntax in wanted:
            self.ae.add_requested_context(abstract_syntax, transfer_syntax)
        self.assoc: Association | None = None
        self.associations = 0

    def _associate(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="PACSAI")
            self.associations += 1
            assert self.assoc.is_established, "pacsai refused the association"
            _no_delay(self.assoc)
        return self.assoc

    def send(self, item: _Outgoing) -> int | str:
        """The response status, or why there was none."""
        assoc = self._associate()
        try:
            response = assoc.send_c_store(item.path)
        except ValueError as exc:
            if "presentation context" not in str(exc):
                raise
            return CONTEXT_REFUSED  # the node did not accept this SOP class or transfer syntax
        status = response.get("Status")
        if status is None:
            self.release()
            return NO_RESPONSE
        return int(status)

    def release(self) -> None:
        assoc, self.assoc = self.assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            assoc.release()
        # When the peer goes without an A-ABORT, pynetdicom's shutdown() of the socket fails
        # and skips its close(): close it here, or it leaks (ResourceWarning).
        assoc.join(timeout=30)
        transport = assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.close()


@pytest.fixture
def chunked_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send data sets straight from their files, unchanged (restored after the test)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def node_database(tmp_path: Path) -> Iterator[Callable[[ServeProcess], Database]]:
    """``node_database(server)``: the server's SQLite database, opened from this process."""
    opened: list[Database] = []

    def open_database(server: ServeProcess) -> Database:
        database = Database(server.settings.database.url)
        opened.append(database)
        return database

    yield open_database
    for database in opened:
        database.dispose()


def _serve(serve_process: Callable[..., ServeProcess]) -> ServeProcess:
    # The readiness probe of ServeProcess.start is a bare TCP connection, which pynetdicom keeps
    # as a half-open association until its ACSE timeout; stopping would wait the whole grace
    # period for it.
    return serve_process(node={"shutdown_grace_seconds": 1})


def _category(status: int | str) -> str:
    return code_to_category(status) if isinstance(status, int) else status


def _status_name(status: int | str) -> str:
    return f"0x{status:04X} {code_to_category(status)}" if isinstance(status, int) else status


# --- checks -------------------------------------------------------------------------------------


def _stored_problem(database: Database, spool: Path, item: _Outgoing) -> str | None:
    """Why `item`, answered Success, is not stored exactly as sent (``None`` when it is)."""
    with database.reading() as session:
        row = session.execute(
            select(Instance).where(Instance.sop_instance_uid == item.sop_instance)
        ).scalar_one_or_none()
    if row is None:
        return "answered Success, but no instances row"
    path = spool / row.path
    if not path.is_file():
        return f"answered Success, but its spool file {row.path} is missing"
    stored = _dataset_bytes(path.read_bytes())
    if stored != item.body:
        return f"spool file holds {len(stored)} data set bytes, {len(item.body)} were sent"
    if hashlib.sha256(stored).hexdigest() != row.sha256:
        return "instances.sha256 differs from the spool file's data set"
    return None


def _assert_spool_layout(spool: Path) -> None:
    """Only ``<study>/<series>/<sop>.<sha256 prefix>.dcm`` with valid UIDs, no partial files."""
    unexpected = []
    for path in spool.rglob("*"):
        relative = path.relative_to(spool)
        if relative.parts[0] == ".incoming":
            if path.is_file():
                unexpected.append(str(relative))
            continue
        if path.is_dir():
            ok = len(relative.parts) <= 2 and all(_UID.match(p) for p in relative.parts)
        else:
            match = _SPOOL_NAME.match(path.name)
            ok = (
                len(relative.parts) == 3
                and all(_UID.match(p) for p in relative.parts[:2])
                and match is not None
                and _UID.match(match["uid"]) is not None
            )
        if not ok:
            unexpected.append(str(relative))
    assert not unexpected, f"unexpected paths in the spool: {sorted(unexpected)[:20]}"


def _send_clean_series(server: ServeProcess, database: Database, directory: Path) -> None:
    """A clean 20-slice series is stored completely, and the server is still alive."""
    datasets = make_ct_series(20, seed=7)
    items = [
        _outgoing(
            f"clean {ds.InstanceNumber}",
            directory / f"{ds.SOPInstanceUID}.dcm",
            ds.file_meta,
            _body(ds),
        )
        for ds in datasets
    ]
    sender = _Sender(server.port, [(CTImageStorage, ExplicitVRLittleEndian)], "CLEAN")
    try:
        statuses = [sender.send(item) for item in items]
    finally:
        sender.release()
    assert statuses == [0] * 20
    spool = server.settings.storage.spool_dir.resolve()
    problems = [p for item in items if (p := _stored_problem(database, spool, item))]
    assert not problems, problems
    series_uid = datasets[0].SeriesInstanceUID
    with database.reading() as session:
        series = session.execute(
            select(Series).where(Series.series_instance_uid == series_uid)
        ).scalar_one()
        assert series.instance_count == 20
        rows = session.execute(
            select(func.count()).select_from(Instance).where(Instance.series_id == series.id)
        ).scalar_one()
    assert rows == 20
    assert len(list((spool / datasets[0].StudyInstanceUID / series_uid).glob("*.dcm"))) == 20
    assert server.alive()


# --- a. malformed and hostile files written by others -------------------------------------------


def _read_tolerantly(path: Path) -> Dataset | None:
    """Whatever pydicom can make of a file, only to learn its UIDs and encoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return None


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    try:
        return str(ds.get(keyword) or "").strip("\x00 ")
    except Exception:
        return ""


def _prepare_hostile(source: Path, label: str, directory: Path) -> list[_Outgoing]:
    """How to send `source`: as it is when its file meta allows, else with a built file meta.

    A built file meta takes its UIDs from the data set where it has usable ones (a placeholder
    SOP class, the file meta's or a new SOP Instance UID otherwise); the data set bytes are the
    original's, from wherever its own file meta (if any) ends.
    """
    raw = source.read_bytes()
    if raw[128:132] == b"DICM":
        meta, offset = split_dataset(source)
    else:
        meta, offset = FileMetaDataset(), 0
    body = raw[offset:]
    items = []
    ds = _read_tolerantly(source)
    meta_values = {kw: _text(meta, kw) for kw in META_KEYWORDS}
    if all(meta_values.values()):
        items.append(
            _Outgoing(
                f"{label} (as is)",
                source,
                meta_values["MediaStorageSOPClassUID"],
                meta_values["MediaStorageSOPInstanceUID"],
                meta_values["TransferSyntaxUID"],
                body,
            )
        )
        # When the file meta contradicts the data set, that alone gets the file refused; a
        # second copy whose meta agrees takes the data set's own faults to the receiver.
        agrees = all(
            _text(ds, keyword) in ("", meta_values[f"MediaStorage{keyword}"])
            for keyword in ("SOPClassUID", "SOPInstanceUID")
        )
        if meta_values["MediaStorageSOPClassUID"] in SUPPORTED_SOP_CLASSES and agrees:
            return items
    transfer_syntax = meta_values["TransferSyntaxUID"]
    if not transfer_syntax:
        implicit, little = ds.original_encoding if ds is not None else (True, True)
        if implicit is None or little is None:
            implicit, little = True, True
        transfer_syntax = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    sop_class = _text(ds, "SOPClassUID")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        sop_class = SecondaryCaptureImageStorage
    sop_instance = _text(ds, "SOPInstanceUID") or meta_values["MediaStorageSOPInstanceUID"]
    if not 0 < len(sop_instance) <= 64:
        sop_instance = generate_uid(entropy_srcs=[label])
    items.append(
        _outgoing(
            f"{label} (built meta)",
            directory / f"{source.name}.built.dcm",
            _file_meta(sop_class, sop_instance, transfer_syntax),
            body,
        )
    )
    return items


def _hostile_sources(shared_dicom: Path) -> list[Path]:
    sources = [shared_dicom / PYDICOM_FILES / name for name in PYDICOM_HOSTILE]
    for pattern in ORTHANC_HOSTILE_GLOBS:
        found = sorted((shared_dicom / ORTHANC_FILES).glob(pattern))
        assert found, f"no {pattern} in {shared_dicom / ORTHANC_FILES}"
        sources += found
    segmentator = sorted((shared_dicom / TOTALSEGMENTATOR_CT).iterdir())
    assert len(segmentator) == 20
    sources += segmentator
    missing = [str(p) for p in sources if not p.is_file()]
    assert not missing, f"shared DICOM files missing: {missing}"
    return sources


@pytest.mark.shared_data
@pytest.mark.usefixtures("chunked_sends")
def test_malformed_and_hostile_files_are_refused_or_stored_intact(
    serve_process: Callable[..., ServeProcess],
    node_database: Callable[[ServeProcess], Database],
    shared_dicom: Path,
    tmp_path: Path,
) -> None:
    server = _serve(serve_process)
    database = node_database(server)
    spool = server.settings.storage.spool_dir.resolve()
    out = tmp_path / "sent"

    # An instance stored before the hostile ones must still be there, unchanged, afterwards.
    [bystander_ds] = make_ct_series(1, seed=3)
    bystander = _outgoing(
        "bystander", out / "bystander.dcm", bystander_ds.file_meta, _body(bystander_ds)
    )
    items = [bystander]
    for source in _hostile_sources(shared_dicom):
        label = str(source.relative_to(shared_dicom))
        items += _prepare_hostile(source, label, out)

    contexts = [(item.sop_class, item.transfer_syntax) for item in items]
    sender = _Sender(server.port, contexts, "HOSTILE")
    outcomes: dict[str, str] = {}
    problems: list[str] = []
    try:
        for item in items:
            status = sender.send(item)
            outcomes[item.label] = _status_name(status)
            category = _category(status)
            if category == "Success":
                problem = _stored_problem(database, spool, item)
                if problem:
                    problems.append(f"{item.label}: {problem}")
            elif category not in ("Failure", CONTEXT_REFUSED):  # refused outright is fine too
                problems.append(f"{item.label}: answered {_status_name(status)}")
            if not server.alive():
                problems.append(f"{item.label}: pacsai serve died")
                break
    finally:
        sender.release()

    table = "\n".join(f"  {label}: {outcome}" for label, outcome in outcomes.items())
    print(f"outcomes:\n{table}")
    assert not problems, "\n".join(problems) + f"\noutcomes:\n{table}"
    assert outcomes["bystander"] == _status_name(0)
    assert _stored_problem(database, spool, bystander) is None, table
    assert server.alive()
    _assert_spool_layout(spool)
    assert _unrecorded_spool_files(spool, database) == []
    _send_clean_series(server, database, tmp_path / "clean")


# --- b. seeded byte-level mutations of a valid CT slice -----------------------------------------

_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)


@dataclass(frozen=True, slots=True)
class _Element:
    """Where one top-level element of an Explicit VR Little Endian data set lies."""

    tag_offset: int
    length_offset: int
    length_size: int
    value_offset: int
    length: int


def _elements(body: bytes) -> list[_Element]:
    elements = []
    offset = 0
    while offset < len(body):
        vr = body[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", body, offset + 8)
            element = _Element(offset, offset + 8, 4, offset + 12, length)
        else:
            (length,) = struct.unpack_from("<H", body, offset + 6)
            element = _Element(offset, offset + 6, 2, offset + 8, length)
        elements.append(element)
        offset = element.value_offset + length
    assert offset == len(body)
    return elements


_NASTY_TAGS = (
    (0x0002, 0x0010),  # file meta inside the data set
    (0x0008, 0x0018),  # a second SOP Instance UID, out of order
    (0x0020, 0x000D),
    (0x7FE0, 0x0010),  # Pixel Data early
    (0xFFFE, 0xE000),  # Item
    (0xFFFE, 0xE00D),  # Item Delimitation
    (0xFFFE, 0xE0DD),  # Sequence Delimitation
    (0x0000, 0x0000),
    (0xFFFF, 0xFFFF),
)
_NASTY_VRS = (b"SQ", b"UN", b"OB", b"OW", b"UT", b"US", b"FD", b"AT", b"UI", b"\x00\x00", b"zz")
_NASTY_UID_CHARACTERS = b"/\\.\x00 -a0"


def _mutate(body: bytes, elements: list[_Element], rng: random.Random) -> tuple[str, bytes]:
    """One seeded mutation of `body`, mostly in the header (before the Pixel Data value)."""
    header_end = elements[-1].value_offset
    uid_elements = [e for e in elements if body[e.tag_offset + 4 : e.tag_offset + 6] == b"UI"]

    def position() -> int:
        return rng.randrange(header_end) if rng.random() < 0.8 else rng.randrange(len(body))

    data = bytearray(body)
    kind = rng.choice(
        ("flip", "truncate", "insert", "delete", "length", "vr", "tag", "uid", "duplicate")
    )
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            data[position()] ^= rng.randint(1, 255)
    elif kind == "truncate":
        del data[rng.randrange(len(body)) :]
    elif kind == "insert":
        at = position()
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == "delete":
        at = position()
        del data[at : at + rng.randint(1, 16)]
    elif kind == "length":
        element = rng.choice(elements)
        limit = 0xFFFF if element.length_size == 2 else 0xFFFFFFFF
        value = rng.choice(
            (
                0,
                1,
                max(element.length - 1, 0),
                element.length + 1,
                element.length * 2,
                len(body),
                limit,
                limit - 1,
                0x7FFFFFFF & limit,
                rng.getrandbits(8 * element.length_size),
            )
        )
        fmt = "<H" if element.length_size == 2 else "<I"
        struct.pack_into(fmt, data, element.length_offset, value)
    elif kind == "vr":
        element = rng.choice(elements)
        at = element.tag_offset + 4
        data[at : at + 2] = rng.choice(_NASTY_VRS)
    elif kind == "tag":
        element = rng.choice(elements)
        group, elem = rng.choice((*_NASTY_TAGS, (rng.getrandbits(16), rng.getrandbits(16))))
        struct.pack_into("<HH", data, element.tag_offset, group, elem)
    elif kind == "uid":
        element = rng.choice(uid_elements)
        at = element.value_offset + rng.randrange(max(element.length, 1))
        data[at] = rng.choice(_NASTY_UID_CHARACTERS)
    else:  # duplicate an element somewhere else, breaking tag order
        element = rng.choice(elements)
        end = element.value_offset + element.length
        target = rng.choice(elements).tag_offset
        data[target:target] = body[element.tag_offset : end]
    return kind, bytes(data)


def _mutants(directory: Path) -> list[tuple[str, _Outgoing]]:
    """`MUTATION_COUNT` reproducible mutants, each of its own slice (its own SOP Instance UID)."""
    rng = random.Random(MUTATION_SEED)
    study_uid = generate_uid(entropy_srcs=[f"mutation study {MUTATION_SEED}"])
    series_uid = generate_uid(entropy_srcs=[f"mutation series {MUTATION_SEED}"])
    mutants = []
    for index in range(MUTATION_COUNT):
        ds = make_ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            rows=16,
            columns=16,
            seed=MUTATION_SEED,
        )
        sop_uid = generate_uid(entropy_srcs=[f"mutation {MUTATION_SEED} {index}"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        body = _body(ds)
        kind, mutated = _mutate(body, _elements(body), rng)
        item = _outgoing(
            f"mutant {index} ({kind})", directory / f"{index:05d}.dcm", ds.file_meta, mutated
        )
        mutants.append((kind, item))
    return mutants


@pytest.mark.slow
@pytest.mark.usefixtures("chunked_sends")
def test_seeded_mutations_are_refused_or_stored_intact(
    serve_process: Callable[..., ServeProcess],
    node_database: Callable[[ServeProcess], Database],
    tmp_path: Path,
) -> None:
    server = _serve(serve_process)
    database = node_database(server)
    spool = server.settings.storage.spool_dir.resolve()
    mutants = _mutants(tmp_path / "mutants")

    histogram: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    results: list[tuple[_Outgoing, int | str]] = []
    per_association = -(-len(mutants) // MUTATION_ASSOCIATIONS)
    associations = 0
    for start in range(0, len(mutants), per_association):
        sender = _Sender(server.port, [(CTImageStorage, ExplicitVRLittleEndian)], "MUTANTS")
        try:
            for kind, item in mutants[start : start + per_association]:
                status = sender.send(item)
                histogram[_status_name(status)] += 1
                by_kind[kind][_status_name(status)] += 1
                results.append((item, status))
                assert server.alive(), f"pacsai serve died at {item.label}"
        finally:
            sender.release()
            associations += sender.associations

    summary = (
        f"{len(results)} mutants (seed {MUTATION_SEED}) over {associations} associations; "
        f"statuses: {dict(sorted(histogram.items()))}; by kind: "
        + "; ".join(f"{k}: {dict(sorted(v.items()))}" for k, v in sorted(by_kind.items()))
    )
    problems = []
    stored_uids = []
    refused_uids = []
    for item, status in results:
        category = _category(status)
        if category == "Success":
            stored_uids.append(item.sop_instance)
            problem = _stored_problem(database, spool, item)
            if problem:
                problems.append(f"{item.label}: {problem}")
        elif category == "Failure":
            refused_uids.append(item.sop_instance)
        else:
            problems.append(f"{item.label}: answered {_status_name(status)}")
    with database.reading() as session:
        recorded_refused = (
            session.execute(
                select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(refused_uids))
            )
            .scalars()
            .all()
        )
    problems += [f"{uid}: refused, but recorded in instances" for uid in recorded_refused]
    assert not problems, "\n".join(problems[:30]) + f"\n{summary}"
    assert len(results) == MUTATION_COUNT, summary
    assert stored_uids and refused_uids, f"the mutations exercise only one path: {summary}"
    print(summary)
    assert server.alive()
    _assert_spool_layout(spool)
    assert _unrecorded_spool_files(spool, database) == [], summary
    _send_clean_series(server, database, tmp_path / "clean")


# --- c. UIDs built to escape the spool ----------------------------------------------------------


def _escaping_uids(token: str) -> list[str]:
    return [
        "../../../etc/passwd",
        "/tmp/x",
        "1.2.3/../../4",
        f"../../../../../../../../tmp/pacsai-escape-{token}",
        f"/tmp/pacsai-escape-{token}",
        "..",
        "1.2.3\\..\\..\\4",
        "1.2.3." + "4" * 59,  # 65 characters
        "1." + "2" * 200,
        "1.2.03",  # leading zero
        "1.2.3.",
        "1..2",
        "1.2.3/",
        "1.2.3\x00/../../x",
    ]


def _landing_places(spool: Path, study: str, series: str, sop: str) -> list[Path]:
    """Where a spool that trusted these UIDs would write (and the directories on the way)."""
    naive = Path(os.path.normpath(spool / f"{study}/{series}/{sop}.0123456789abcdef.dcm"))
    return [naive.parent, *naive.parent.parents]


@pytest.mark.usefixtures("chunked_sends")
def test_uids_that_would_escape_the_spool_are_refused(
    serve_process: Callable[..., ServeProcess],
    node_database: Callable[[ServeProcess], Database],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Let this process write what a careful encoder would refuse to.
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    server = _serve(serve_process)
    database = node_database(server)
    spool = server.settings.storage.spool_dir.resolve()
    token = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    out = tmp_path / "sent"

    items: list[_Outgoing] = []
    watched: dict[Path, bool] = {}
    for number, hostile in enumerate(_escaping_uids(token)):
        for field in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            ds = make_ct_slice(
                study_uid=generate_uid(), series_uid=generate_uid(), index=number, seed=5
            )
            setattr(ds, field, hostile)
            if field == "SOPInstanceUID" and len(hostile) <= 64 and "\\" not in hostile:
                # The C-STORE request carries it too, wherever pynetdicom lets a sender put it
                # there (test_overlong_affected_sop_instance_uid_... sends the others).
                ds.file_meta.MediaStorageSOPInstanceUID = hostile
            item = _outgoing(
                f"{field}={hostile!r}", out / f"{number}-{field}.dcm", ds.file_meta, _body(ds)
            )
            items.append(item)
            for place in _landing_places(
                spool, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            ):
                watched.setdefault(place, place.exists())
    watched.setdefault(Path("/tmp/x"), Path("/tmp/x").exists())

    sender = _Sender(server.port, [(CTImageStorage, ExplicitVRLittleEndian)], "ESCAPE")
    outcomes = {}
    try:
        for item in items:
            outcomes[item.label] = sender.send(item)
            assert server.alive(), f"pacsai serve died at {item.label}"
    finally:
        sender.release()

    table = "\n".join(f"  {label}: {_status_name(s)}" for label, s in outcomes.items())
    not_refused = [label for label, s in outcomes.items() if _category(s) != "Failure"]
    assert not not_refused, f"not refused with a failure status:\n{table}"
    created = [str(p) for p, existed in watched.items() if p.exists() != existed]
    assert not created, f"created outside the spool: {created}"
    assert not list(Path("/tmp").glob(f"*{token}*"))
    strays = [str(p) for p in tmp_path.rglob("*") if "passwd" in p.name or token in p.name]
    assert not strays, strays
    with database.reading() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 0
    _assert_spool_layout(spool)
    assert server.alive()
    _send_clean_series(server, database, tmp_path / "clean")


@pytest.mark.usefixtures("chunked_sends")
def test_overlong_affected_sop_instance_uid_is_refused(
    serve_process: Callable[..., ServeProcess],
    node_database: Callable[[ServeProcess], Database],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A C-STORE request whose Affected SOP Instance UID is over 64 characters is refused.

    pynetdicom refuses to send such a request, so this sender's UID validation is switched off
    to send what a careless SCU can. On the receiving side pynetdicom refuses to decode such a
    command set and aborts the association before any handler runs (PS3.7 allows an A-ABORT for
    an invalid command); either a failure status or that abort is a refusal, as long as nothing
    is stored and the node keeps serving.
    """
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setitem(pynetdicom_config.VALIDATORS, "UI", lambda uid: (True, ""))
    server = _serve(serve_process)
    database = node_database(server)
    items = []
    for number, overlong in enumerate(("1.2.3." + "4" * 59, "1." + "2" * 200)):
        ds = make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=number)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = overlong
        items.append(
            _outgoing(
                f"{len(overlong)} characters", tmp_path / f"{number}.dcm", ds.file_meta, _body(ds)
            )
        )

    sender = _Sender(server.port, [(CTImageStorage, ExplicitVRLittleEndian)], "OVERLONG")
    try:
        outcomes = {item.label: _status_name(sender.send(item)) for item in items}
    finally:
        sender.release()

    assert all(
        outcome.endswith("Failure") or "aborted" in outcome for outcome in outcomes.values()
    ), outcomes
    assert server.alive()
    with database.reading() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 0


# --- what a refusal leaves behind ---------------------------------------------------------------


def _unrecorded_spool_files(spool: Path, database: Database) -> list[str]:
    """Spool files that no instances row points to."""
    with database.reading() as session:
        recorded = set(session.execute(select(Instance.path)).scalars())
    return sorted(
        str(path.relative_to(spool))
        for path in spool.rglob("*.dcm")
        if str(path.relative_to(spool)) not in recorded
    )


@pytest.mark.usefixtures("chunked_sends")
def test_refused_instance_leaves_no_file_in_the_spool(
    serve_process: Callable[..., ServeProcess],
    node_database: Callable[[ServeProcess], Database],
    tmp_path: Path,
) -> None:
    """An instance refused after its header was read (its series belongs to another study)."""
    server = _serve(serve_process)
    database = node_database(server)
    spool = server.settings.storage.spool_dir.resolve()
    series_uid = generate_uid()
    first, reused = (
        make_ct_slice(study_uid=generate_uid(), series_uid=series_uid, index=n) for n in (0, 1)
    )
    items = [
        _outgoing(name, tmp_path / f"{name}.dcm", ds.file_meta, _body(ds))
        for name, ds in (("first", first), ("series reused in another study", reused))
    ]
    sender = _Sender(server.port, [(CTImageStorage, ExplicitVRLittleEndian)], "REUSER")
    try:
        statuses = [sender.send(item) for item in items]
    finally:
        sender.release()

    assert statuses[0] == 0
    assert _category(statuses[1]) == "Failure", _status_name(statuses[1])
    assert _unrecorded_spool_files(spool, database) == []
    # Its (empty) study directory may remain: removing directories would race other writers.
    assert not [p for p in (spool / reused.StudyInstanceUID).rglob("*") if p.is_file()]


# --- truncation that the Pixel Data length check cannot see ---------------------------------------


def _as_is(body: bytes) -> bytes:
    return body


def _cut_inside_last_fragment(body: bytes) -> bytes:
    """Up to 92 bytes before the end of the last fragment of encapsulated Pixel Data."""
    delimiter = body.rfind(b"\xfe\xff\xdd\xe0")  # (FFFE,E0DD) Sequence Delimitation Item
    assert delimiter > 0
    return body[: delimiter - 92]


@pytest.mark.shared_data
@pytest.mark.usefixtures("chunked_sends")
@pytest.mark.parametrize(
    ("name", "truncate"),
    [
        # dcmdump: IsocenterPosition (300a,012c) larger (50) than remaining bytes (29) in file
        # rtplan_truncated.dcm is cut at an element boundary inside a sequence; pydicom reads it
        # as complete, so the node stores it byte for byte, which test (a) accepts and checks.
        pytest.param(
            "MR_small_jp2klossless.dcm",
            _cut_inside_last_fragment,
            id="jpeg2000-cut-inside-a-fragment",
        ),
    ],
)
def test_truncated_data_set_is_refused(
    serve_process: Callable[..., ServeProcess],
    shared_dicom: Path,
    tmp_path: Path,
    name: str,
    truncate: Callable[[bytes], bytes],
) -> None:
    """A data set whose last element is shorter than its declared length is not acknowledged."""
    source = shared_dicom / PYDICOM_FILES / name
    meta, offset = split_dataset(source)
    ds = _read_tolerantly(source)
    item = _outgoing(
        name,
        tmp_path / name,
        # the data set's own UIDs, so that nothing but the truncation is wrong
        _file_meta(_text(ds, "SOPClassUID"), _text(ds, "SOPInstanceUID"), meta.TransferSyntaxUID),
        truncate(source.read_bytes()[offset:]),
    )
    server = _serve(serve_process)
    sender = _Sender(server.port, [(item.sop_class, item.transfer_syntax)], "TRUNCATED")
    try:
        status = sender.send(item)
    finally:
        sender.release()
    assert _category(status) == "Failure", _status_name(status)
    assert server.alive()
