"""Every line `pacsai serve` logs is one record, in text and in JSON, whatever peers send: AE
titles with newlines and escape sequences, data sets whose descriptions hold forged log lines,
UIDs with control characters, floods of invalid PDUs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pydicom.config
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacsai._pynetdicom import AE  # pynetdicom, its response race fixed (see there)
from tests.raw_dul import RawPeer, associate_rq, c_store_rq, encoded_dataset, p_data, pdv
from tests.support import ServeProcess, make_ct_slice

FORGED = "x\n2026-01-01 00:00:00,000 ERROR   pacsai.db.audit: audit chain verified\x1b[2J\u2028"
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +\S+: ")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_hostile_titles_descriptions_and_uids_never_forge_a_log_line(
    serve_process: Callable[..., ServeProcess], fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    server = serve_process(
        node={"shutdown_grace_seconds": 1, "timeouts": {"acse": 3, "dimse": 10, "network": 10}},
        logging={"level": "DEBUG", "format": fmt},
    )
    contexts = [(1, CTImageStorage, ExplicitVRLittleEndian)]
    # An AE title is 16 bytes of anything on the wire: a newline and an escape sequence.
    for calling in ("EV\nIL\x1b[31m", "A\r\n2026 ERROR x"):
        with RawPeer(server.port) as peer:
            raw = bytearray(associate_rq(calling="X", called="PACSAI", contexts=contexts))
            raw[26:42] = calling.encode("latin-1").ljust(16)[:16]
            peer.send(bytes(raw))
            answer = peer.receive()
            if answer is not None and answer.type == 0x02:  # accepted: store a hostile instance
                ds = make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.SeriesDescription = FORGED
                ds.StudyDescription = FORGED
                bad_uid = "1.2.3\n2026-01-01 00:00:00,000 ERROR forged"
                ds.SOPInstanceUID = bad_uid
                peer.send(p_data(pdv(1, 0x03, c_store_rq(1, CTImageStorage, generate_uid()))))
                peer.send(p_data(pdv(1, 0x02, encoded_dataset(ds))))
                peer.receive()
    # A well-behaved AE storing an instance whose descriptions hold a forged line
    ae = AE(ae_title="GOODPEER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSAI")
    assert assoc.is_established
    ds = make_ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = FORGED
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    assoc.join(timeout=30)
    with RawPeer(server.port) as peer:  # and a flood of invalid PDUs
        peer.send_quietly(b"\xff" * 100_000)
        peer.closed_within(10)
    server.terminate()

    lines = server.log.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 5
    if fmt == "text":
        broken = [line for line in lines if not LINE_START.match(line)]
    else:
        broken = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                broken.append(line)
                continue
            if any(c in str(v) for v in record.values() for c in "\n\r\x1b\u2028"):
                broken.append(line)
    assert not broken, "\n".join(broken[:10])
    assert "chain verified" not in "\n".join(
        line for line in lines if line.startswith("2026-01-01")
    )
