"""A real Orthanc (https://www.orthanc-server.com) as a plain child process, with a REST client.

Orthanc stands in for the hospital PACS in ``pacsai demo`` and in the end-to-end tests. It runs
with its own JSON configuration in its own directory (storage and index there, never
``/etc/orthanc``), on free ports, without authentication and without remote access; it listens
on all interfaces and has no bind option, so it is stopped by its PID, never by name::

    with Orthanc(workdir, modalities={"PACSAI": ("PACSAI", "127.0.0.1", 11112)}) as pacs:
        study = pacs.upload_all(paths)[0]["ParentStudy"]
        pacs.store_to("PACSAI", [study])  # Orthanc C-STOREs the study to pacsai
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from pacsai.errors import PacsaiError

__all__ = ["DICOMWEB_PLUGIN_NAMES", "Orthanc", "OrthancError", "find_dicomweb_plugin", "free_port"]

#: Where the Debian packages put the DICOMweb plugin (``orthanc-dicomweb``).
DICOMWEB_PLUGIN_NAMES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


class OrthancError(PacsaiError):
    """Orthanc could not be started, or its REST API refused a request."""


def free_port() -> int:
    """A TCP port free on every interface now (Orthanc binds all of them)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def find_dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or ``None`` when it is not installed."""
    for candidate in DICOMWEB_PLUGIN_NAMES:
        if candidate.is_file():
            return candidate
    plugins = Path("/usr/lib/orthanc")
    if plugins.is_dir():
        for candidate in sorted(plugins.glob("libOrthancDicomWeb.so*")):
            return candidate
    return None


class Orthanc:
    """One Orthanc process with its configuration, storage and log under ``workdir``.

    Parameters
    ----------
    workdir : pathlib.Path
        Created if missing; holds ``orthanc.json``, ``storage/`` and ``orthanc.log``. Starting
        again with the same ``workdir`` (after :meth:`stop`) finds what was stored before.
    ae_title : str
        Orthanc's own AE title (``DicomAet``).
    http_port, dicom_port : int or None
        Ports to listen on; free ones are picked when ``None``. They stay the same across
        :meth:`stop` and :meth:`start`.
    modalities : mapping of str to (AE title, host, port)
        Peers Orthanc may C-STORE to (``DicomModalities``), e.g. ``{"PACSAI": ("PACSAI",
        "127.0.0.1", 11112)}``.
    stable_age : int
        Seconds without a new instance after which Orthanc calls a study stable.
    dicomweb : bool
        Load the DICOMweb plugin when it is installed (see :attr:`dicomweb_url`).
    binary : str or None
        The Orthanc executable; ``Orthanc`` on the ``PATH`` by default.
    startup_timeout : float
        Seconds to wait for the REST API to answer.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "ORTHANC",
        http_port: int | None = None,
        dicom_port: int | None = None,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        stable_age: int = 2,
        dicomweb: bool = True,
        binary: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.plugin = find_dicomweb_plugin() if dicomweb else None
        self.binary = binary or shutil.which("Orthanc")
        self.startup_timeout = startup_timeout
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @staticmethod
    def is_installed() -> bool:
        """Whether an ``Orthanc`` executable is on the ``PATH``."""
        return shutil.which("Orthanc") is not None

    # --- process ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._process is not None and self._process.poll() is None

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        storage = self.workdir / "storage"
        config: dict[str, Any] = {
            "Name": f"pacsai-{self.ae_title}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "HttpCompressionEnabled": False,
            "Plugins": [str(self.plugin)] if self.plugin else [],
        }
        if self.plugin:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config

    def start(self) -> Orthanc:
        """Write the configuration, start Orthanc and wait until its REST API answers.

        Raises
        ------
        OrthancError
            If Orthanc is not installed, exits during start-up (its log is quoted), or does not
            answer within ``startup_timeout`` seconds.
        """
        if self.running:
            return self
        if self.binary is None:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2), encoding="utf-8")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._client = httpx.Client(base_url=self.url, timeout=60.0, trust_env=False)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._close_client()
                raise OrthancError(
                    f"Orthanc exited with status {code} while starting; its log ends:\n"
                    f"{self.log_tail()}"
                )
            try:
                if self._client.get("/system", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise OrthancError(
                    f"Orthanc did not answer on {self.url} within {self.startup_timeout:.0f} s; "
                    f"its log ends:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._close_client()
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of Orthanc's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- REST ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._client is None:
            raise OrthancError(f"Orthanc is not running (start it before {method} {path})")
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise OrthancError(f"{method} {self.url}{path}: {exc}") from exc
        if response.status_code >= 400:
            raise OrthancError(
                f"{method} {self.url}{path} answered HTTP {response.status_code}: "
                f"{response.text[:500]}"
            )
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AE title, ports."""
        result: dict[str, Any] = self._json("GET", "/system")
        return result

    @property
    def dicomweb_url(self) -> str | None:
        """The DICOMweb root (for STOW-RS) when the plugin is loaded, else ``None``."""
        if self._client is None or "dicom-web" not in self._json("GET", "/plugins"):
            return None
        return f"{self.url}/dicom-web"

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances``: store one DICOM file; Orthanc's answer (``ID``,
        ``ParentStudy``, ``ParentSeries``, ``Status``)."""
        answer: dict[str, Any] = self._json(
            "POST",
            "/instances",
            content=Path(path).read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        return answer

    def upload_all(self, paths: Iterable[Path]) -> list[dict[str, Any]]:
        """:meth:`upload` each file."""
        return [self.upload(path) for path in paths]

    def store_to(
        self, modality: str, resources: Iterable[str], *, synchronous: bool = True
    ) -> dict[str, Any]:
        """``POST /modalities/{modality}/store``: Orthanc C-STOREs ``resources`` (Orthanc IDs
        of patients, studies, series or instances) to a peer of ``DicomModalities``.

        Raises
        ------
        OrthancError
            If the peer could not be reached or refused an instance (Orthanc answers HTTP 500
            and says why in its log).
        """
        body = {"Resources": list(resources), "Synchronous": synchronous}
        answer: dict[str, Any] = self._json("POST", f"/modalities/{modality}/store", json=body)
        failed = int(answer.get("FailedInstancesCount", 0) or 0)
        if failed:
            raise OrthancError(f"Orthanc could not store {failed} instances to {modality}")
        return answer

    def lookup(self, uid: str, kind: str) -> str | None:
        """``POST /tools/lookup``: the Orthanc ID of the ``kind`` (``Study``, ``Series``,
        ``Instance``) with DICOM UID ``uid``, or ``None``."""
        for item in self._json("POST", "/tools/lookup", content=uid.encode()):
            if item.get("Type") == kind:
                return str(item["ID"])
        return None

    def lookup_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc ID of the study with ``study_instance_uid``, or ``None``."""
        return self.lookup(study_instance_uid, "Study")

    def lookup_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc ID of the instance with ``sop_instance_uid``, or ``None``."""
        return self.lookup(sop_instance_uid, "Instance")

    def series_of(self, study: str) -> list[dict[str, Any]]:
        """The series of a study (Orthanc ID), each with ``ID``, ``MainDicomTags`` (Modality,
        SeriesInstanceUID, SeriesDescription, SeriesNumber...) and ``Instances``."""
        result: list[dict[str, Any]] = self._json("GET", f"/studies/{study}/series")
        return result

    def instances_of(self, series: str) -> list[dict[str, Any]]:
        """The instances of a series (Orthanc ID), each with ``ID`` and ``MainDicomTags``
        (SOPInstanceUID, InstanceNumber...)."""
        result: list[dict[str, Any]] = self._json("GET", f"/series/{series}/instances")
        return result

    def instance_tags(self, instance: str) -> dict[str, Any]:
        """Every tag of an instance (Orthanc ID) by keyword, sequences as lists of dicts."""
        result: dict[str, Any] = self._json("GET", f"/instances/{instance}/simplified-tags")
        return result

    def instance_file(self, instance: str) -> bytes:
        """The DICOM file of an instance (Orthanc ID), as it was stored."""
        return self._request("GET", f"/instances/{instance}/file").content

    def study_contents(self, study_instance_uid: str) -> dict[str, list[dict[str, Any]]]:
        """Modality -> instances of that modality in the study (each with ``ID`` and
        ``MainDicomTags``); empty when Orthanc does not have the study."""
        study = self.lookup_study(study_instance_uid)
        contents: dict[str, list[dict[str, Any]]] = {}
        if study is None:
            return contents
        for series in self.series_of(study):
            modality = str(series.get("MainDicomTags", {}).get("Modality", ""))
            contents.setdefault(modality, []).extend(self.instances_of(series["ID"]))
        return contents
