"""A minimal storage SCP standing in for the PACS when Orthanc is not installed.

It accepts every storage SOP class in every transfer syntax pynetdicom knows, writes each
instance as received (temp file, then rename) to ``<folder>/<StudyInstanceUID>/<SOPInstanceUID>
.dcm``, and keeps an index by study, so that ``pacsai demo`` can tell what came back.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsai.errors import InvalidInstanceError
from pacsai.scp.status import StoreStatus
from pacsai.scp.uids import validate_uid

__all__ = ["LocalPacs", "StoredInstance"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredInstance:
    """One instance the local PACS stored."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    path: Path


class LocalPacs:
    """A pynetdicom storage SCP writing what it receives under ``folder``.

    Parameters
    ----------
    folder : pathlib.Path
        Where instances are written, one sub-folder per study; created if missing.
    ae_title : str
        The AE title it answers to (any called AE title is accepted).
    port : int
        TCP port on 127.0.0.1; ``0`` picks a free one (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, folder: Path, *, ae_title: str = "LOCALPACS", port: int = 0) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self._requested_port = port
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, StoredInstance]] = {}
        self._server: Any = None

    @property
    def port(self) -> int:
        """The port it listens on (valid after :meth:`start`)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.socket.getsockname()[1])

    def start(self) -> LocalPacs:
        """Listen on 127.0.0.1 in background threads."""
        if self._server is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = False
        ae.maximum_pdu_size = 0
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self._requested_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, _handle_store, [self])],
        )
        return self

    def stop(self) -> None:
        """Stop listening; associations in progress are aborted."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def __enter__(self) -> LocalPacs:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def instances(self, study_instance_uid: str) -> list[StoredInstance]:
        """The instances stored for one study, in arrival order (a resent instance once)."""
        with self._lock:
            return list(self._index.get(study_instance_uid, {}).values())

    def store(self, encoded: bytes) -> int:
        """Write one encoded file (with file meta) and index it; the DIMSE status to answer."""
        try:
            header = dcmread(io.BytesIO(encoded), stop_before_pixels=True)
            study_uid = validate_uid(header.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = validate_uid(header.get("SeriesInstanceUID"), "Series Instance UID")
            sop_uid = validate_uid(header.get("SOPInstanceUID"), "SOP Instance UID")
            sop_class = validate_uid(header.get("SOPClassUID"), "SOP Class UID")
        except InvalidInstanceError as exc:
            log.warning("local PACS refused an instance: %s", exc)
            return StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
            log.warning("local PACS could not read an instance: %s", exc)
            return StoreStatus.CANNOT_UNDERSTAND
        folder = self.folder / study_uid
        path = folder / f"{sop_uid}.dcm"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=folder, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(encoded)
                Path(temp).replace(path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("local PACS could not write %s: %s", path, exc)
            return StoreStatus.OUT_OF_RESOURCES
        stored = StoredInstance(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            modality=str(header.get("Modality", "")),
            path=path,
        )
        with self._lock:
            self._index.setdefault(study_uid, {})[sop_uid] = stored
        return StoreStatus.SUCCESS


def _handle_store(event: Any, pacs: LocalPacs) -> int:
    """EVT_C_STORE: store the instance as sent; never raises."""
    try:
        encoded = event.encoded_dataset(include_meta=True)
    except (AttributeError, ValueError, KeyError) as exc:
        log.warning("local PACS could not take an instance: %s", exc)
        return StoreStatus.CANNOT_UNDERSTAND
    return pacs.store(encoded)
