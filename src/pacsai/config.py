"""Typed settings, loaded once from a YAML file plus ``PACSAI_`` environment variables.

Every key of the configuration file can also be set in the environment with the ``PACSAI_``
prefix and ``__`` between nesting levels (``PACSAI_NODE__PORT=11113``); the environment wins over
the file. The loaded :class:`Settings` object is passed down explicitly; no other module reads the
environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pacsai.errors import ConfigError

__all__ = [
    "ApiSettings",
    "AuditSettings",
    "DatabaseSettings",
    "Destination",
    "DestinationTls",
    "EmailDestination",
    "FhirDestination",
    "Hl7Destination",
    "InferenceSettings",
    "LoggingSettings",
    "NodeSettings",
    "OrdersSettings",
    "Peer",
    "PriorityRule",
    "QueueSettings",
    "ResultDestination",
    "RetentionSettings",
    "Route",
    "SeriesRule",
    "Settings",
    "Source",
    "StorageSettings",
    "StudyRule",
    "SyslogSettings",
    "TimeoutSettings",
    "TlsSettings",
    "WebhookDestination",
    "load_settings",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError("must be 1 to 16 printable characters without a backslash (DICOM AE VR)")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Peer(_Section):
    """A calling AE allowed to associate, optionally bound to the host it must come from."""

    ae_title: str
    host: str | None = None
    study_quiet_seconds: float | None = Field(default=None, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 B.1) for the receiver."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("tls.enabled needs both tls.cert and tls.key")
        if self.require_client_cert and self.ca is None:
            raise ValueError("tls.require_client_cert needs tls.ca to verify client certificates")
        return self


class TimeoutSettings(_Section):
    """Seconds to wait for the peer at each protocol layer (``null`` waits forever)."""

    acse: float | None = Field(default=30.0, gt=0)
    dimse: float | None = Field(default=60.0, gt=0)
    network: float | None = Field(default=60.0, gt=0)


class NodeSettings(_Section):
    """The DICOM receiver: who we are, where we listen, and whom we accept."""

    ae_title: str = "PACSAI"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1)
    # Connections in any state (before their association too); more are refused at accept.
    max_connections: int = Field(default=64, ge=1)
    max_connections_per_host: int = Field(default=8, ge=1)
    max_pdu_size: int = Field(default=1_048_576, ge=0)  # 0: no limit
    require_called_ae_title: bool = True
    study_quiet_seconds: float = Field(default=10.0, gt=0)
    allowed_peers: list[Peer] = Field(default_factory=list)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    # "auto": with PostgreSQL one per core the process may use, at most 4; with SQLite 1 (its
    # one writer at a time makes more processes wait on each other); or a number
    receiver_processes: int | Literal["auto"] = Field(default="auto")
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # Modality Performed Procedure Step on the DICOM port: a COMPLETED step tells study
    # completion which series and how many instances to wait for (then no quiet window).
    mpps: bool = True
    # This node's identity in leases and the workers table; null: <hostname>-<random>, made once
    # and kept in state_dir/node-id. Each host needs its own (never share state_dir).
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    state_dir: Path = Path("./var")  # local to this host: the node identity lives here

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("receiver_processes")
    @classmethod
    def _processes(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be auto or a number from 1 to 64")
        return value


class RetentionSettings(_Section):
    """What the node removes by age (``storage.retention``).

    A study is removed only once it is finished: not RECEIVING, no job QUEUED or RUNNING, no
    delivery PENDING or RETRYING (or leased), and no job or delivery FAILED within
    ``failed_hold_days`` (a retry would need its files). Its rows stay, marked as purged, and
    each removal is audited (110105 DICOM Study Deleted). Ages count from the study's last
    instance or the last job of it to finish, whichever is later (results: from their job's end).
    """

    enabled: bool = True
    # Received instances (spool files and their rows), days after the study's last activity;
    # null: kept until `pacsai studies purge` or the high-water mark removes them.
    instances_days: float | None = Field(default=7.0, gt=0)
    # Result files (label maps, SEG, SR, overlays, previews), days after their job finished;
    # null: kept. Findings stay in the database (API, worklist) after their files are gone.
    results_days: float | None = Field(default=30.0, gt=0)
    # A FAILED job or delivery keeps its study's files this long after its last attempt, so
    # that `pacsai jobs retry` still works; the high-water mark respects it too.
    failed_hold_days: float = Field(default=14.0, ge=0)
    interval_minutes: float = Field(default=60.0, gt=0)  # how often the age rules are applied


class StorageSettings(_Section):
    """Where received instances are spooled and results kept, and when they are removed."""

    spool_dir: Path = Path("./var/spool")
    results_dir: Path = Path("./var/results")
    min_free_mb: int = Field(default=1024, ge=0)
    # Free space below which the oldest finished studies are removed (instances first, then
    # results when they share the spool's filesystem), in the background and, when needed,
    # before a C-STORE would be refused for min_free_mb. null: twice min_free_mb, at least
    # min_free_mb + 1024; 0: never remove anything for space.
    high_water_mb: int | None = Field(default=None, ge=0)
    # A larger data set is refused (0xA700) and not held in memory beyond this.
    max_instance_mb: int = Field(default=1024, ge=1)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @model_validator(mode="after")
    def _high_water_above_minimum(self) -> StorageSettings:
        if self.high_water_mb and self.high_water_mb <= self.min_free_mb:
            raise ValueError(
                f"high_water_mb ({self.high_water_mb}) must be above min_free_mb "
                f"({self.min_free_mb}), or 0 to never remove studies for space"
            )
        return self

    @property
    def high_water_bytes(self) -> int:
        """``high_water_mb`` resolved, in bytes (0: off)."""
        if self.high_water_mb is None:
            return max(2 * self.min_free_mb, self.min_free_mb + 1024) * 2**20
        return self.high_water_mb * 2**20


class DatabaseSettings(_Section):
    """The SQL database holding studies, jobs and the audit trail."""

    url: str = "sqlite:///./var/pacsai.db"
    auto_upgrade: bool = True

    @field_validator("url")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value


QUEUE_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class QueueSettings(_Section):
    """How QUEUED jobs reach workers, and how workers hold on to what they run.

    ``local``: workers poll the database (the job table is the queue); `pacsai serve` runs them
    in a child worker process. ``celery``: a job's id is published to RabbitMQ (``broker_url``)
    and `pacsai worker` processes consume it. Either way the database is the truth: a worker
    holds a job or delivery under a lease of ``lease_seconds`` that it renews, and only an
    expired lease makes the work runnable again.
    """

    backend: Literal["local", "celery"] = "local"
    broker_url: str | None = None
    broker_queue_prefix: str = Field(default="pacsai", pattern=QUEUE_NAME)  # <prefix>.<queue>
    local_workers: int = Field(default=1, ge=0, le=64)  # job threads of `pacsai serve` (local)
    delivery_workers: int = Field(default=1, ge=1, le=64)  # threads sending results
    poll_seconds: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)  # a job whose worker was lost this often: FAILED
    lease_seconds: float = Field(default=60.0, ge=3)  # renewed every third of it
    reconcile_seconds: float = Field(default=10.0, gt=0)  # expired leases, lost messages

    @model_validator(mode="after")
    def _broker(self) -> QueueSettings:
        if self.backend == "celery" and not self.broker_url:
            raise ValueError("queue.backend celery needs queue.broker_url (amqp://...)")
        if self.broker_url is not None and not self.broker_url.startswith(
            ("amqp://", "amqps://", "pyamqp://")
        ):
            raise ValueError("queue.broker_url must be an amqp:// URL (RabbitMQ)")
        return self


class InferenceSettings(_Section):
    """Where model bundles live and what runs them.

    ``warm_up``: at start, load every ready bundle and run it once on a synthetic volume of its
    declared input on the configured device (a bundle that fails is refused with the cause), and
    keep it loaded, so that the first study is as fast as the second; when false, the bundles
    are still loaded at start, only not run. ``max_voxels``: a series
    with more voxels (rows x columns x frames, summed over its instances) is refused before any
    pixel is decoded; the default, 10^9, is about four whole-body CTs of 512 x 512 x 1000 (4 GB
    as float32).
    """

    models_dir: Path = Path("./models")
    device: str = "auto"
    amp: bool = True
    warm_up: bool = True
    max_voxels: int = Field(default=1_000_000_000, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


OneOrMore = str | list[str]


class StudyRule(_Section):
    """``when:`` of a route: study-level conditions, all of which must hold (empty: any study).

    A value given as a list matches any of its items. ``Modality`` matches when any series of the
    study has that modality; ``StudyDescription`` and ``InstitutionName`` are regular expressions
    searched case-insensitively.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    Modality: OneOrMore | None = None
    BodyPartExamined: OneOrMore | None = None
    StudyDescription: str | None = None
    InstitutionName: str | None = None
    ReferringPhysicianName: str | None = None
    CallingAETitle: OneOrMore | None = Field(default=None, alias="calling_ae_title")

    @field_validator("StudyDescription", "InstitutionName", "ReferringPhysicianName")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return _check_regex(value)


class SeriesRule(_Section):
    """``series:`` of a route: which series of a matching study the model runs on.

    ``min_instances``/``max_instances`` count images (a multi-frame instance counts its frames).
    ``select: largest`` runs on the matching series with most images, ``all`` on each of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    Modality: OneOrMore | None = None
    SeriesDescription: str | None = None
    ImageType: OneOrMore | None = None  # every value listed must be in the series' ImageType
    SliceThickness: tuple[float, float] | None = None  # [min, max] in mm
    min_instances: int = Field(default=1, ge=1)
    max_instances: int | None = Field(default=None, ge=1)
    orientation: list[Literal["axial", "sagittal", "coronal"]] | None = None
    select: Literal["largest", "all"] = "largest"

    @field_validator("SeriesDescription")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return _check_regex(value)

    @field_validator("orientation", mode="before")
    @classmethod
    def _one_orientation(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a valid regular expression: {exc}") from exc
    return value


class PriorityRule(_Section):
    """``priority:`` of a route: when its results flag a study as priority in worklist results.

    The rule holds when the route's model found ``finding`` (a label or class name): a segmented
    label with at least ``min_volume_ml`` (any volume above zero when not given), or a class with
    a probability of at least ``min_probability`` (0.5 when not given).
    """

    finding: str = Field(min_length=1)
    min_volume_ml: float | None = Field(default=None, ge=0)
    min_probability: float | None = Field(default=None, ge=0, le=1)


class Route(_Section):
    """A routing rule: which studies and series go to which model, and where results go."""

    name: str
    when: StudyRule = Field(default_factory=StudyRule)
    series: SeriesRule = Field(default_factory=SeriesRule)
    model: str
    outputs: list[Literal["seg", "sr", "overlay"]] = Field(
        default_factory=lambda: ["seg", "sr"]  # type: ignore[arg-type]
    )
    # LABELMAP: a Label Map SEG to destinations that accept its SOP Class, BINARY to the others
    # (negotiated at each delivery); BINARY: a BINARY SEG everywhere.
    seg_type: Literal["BINARY", "LABELMAP"] = "LABELMAP"
    send_to: list[str] = Field(default_factory=list)
    # For a model that reads several series (input channels or keys: BraTS T1c, T1, T2, FLAIR):
    # one series rule per input, by the model's channel or key name; the first is the grid the
    # others are resampled onto. ``series:`` is then not used.
    channels: dict[str, SeriesRule] | None = None
    priority: list[PriorityRule] | None = None  # any rule holding flags the study as priority
    queue: str | None = Field(default=None, pattern=QUEUE_NAME)  # pin to workers of this queue


class DestinationTls(_Section):
    """DICOM TLS towards a destination (PS3.15 B.1): verify the peer with ``ca``, and present
    ``cert``/``key`` when the peer asks for a client certificate."""

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = False  # DICOM peers are usually known by address, not by name


class Destination(_Section):
    """Where results are sent: a DICOM peer (C-STORE) or a DICOMweb server (STOW-RS).

    ``back_to_sender: true`` sends to the host the study came from, as its calling AE title,
    on ``port`` (the sender's own storage SCP port cannot be learnt from the association).
    ``kind`` may be left out: a destination without one is a DICOM destination.
    """

    kind: Literal["dicom"] = "dicom"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    back_to_sender: bool = False
    stow_url: str | None = None  # e.g. http://pacs:8042/dicom-web (then ae_title/host unused)
    tls: DestinationTls = Field(default_factory=DestinationTls)
    overlay: bool = False  # also send the secondary-capture overlay series
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=5.0, gt=0)  # first retry; doubles each time
    max_backoff_seconds: float = Field(default=600.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _reachable(self) -> Destination:
        if self.stow_url is not None:
            if not self.stow_url.startswith(("http://", "https://")):
                raise ValueError("stow_url must be an http:// or https:// URL")
            return self
        if self.port is None:
            raise ValueError("a DICOM destination needs port (or stow_url for DICOMweb)")
        if not self.back_to_sender and (self.host is None or self.ae_title is None):
            raise ValueError("a DICOM destination needs ae_title and host (or back_to_sender)")
        return self


class _Retried(_Section):
    """How often and how patiently a destination that is not DICOM is tried (as for DICOM)."""

    timeout_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=5.0, gt=0)  # first retry; doubles each time
    max_backoff_seconds: float = Field(default=600.0, gt=0)


def _reveal(value: SecretStr | None) -> str | None:
    """Secrets dump as themselves, so that settings handed to a child process keep them;
    ``repr`` and ``str`` of the settings still mask them."""
    return None if value is None else value.get_secret_value()


def _check_http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


class Hl7Destination(_Retried):
    """Results to a RIS as HL7 v2.5.1 ORU^R01 messages over MLLP (optionally TLS).

    The MSH names ``sending_application``/``sending_facility`` and
    ``receiving_application``/``receiving_facility``; ``processing_id`` is MSH-11 (P production,
    T training, D debugging).
    """

    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTls = Field(default_factory=DestinationTls)
    sending_application: str = "PACSAI"
    sending_facility: str | None = None
    receiving_application: str | None = None
    receiving_facility: str | None = None
    processing_id: Literal["P", "T", "D"] = "P"
    patient_id_authority: str | None = None  # PID-3.4, the assigning authority of patient IDs


class FhirDestination(_Retried):
    """Results to a FHIR R4 server: one transaction Bundle (DiagnosticReport, Observations,
    the ImagingStudy) POSTed to ``base_url``; ``token`` is sent as a Bearer token."""

    kind: Literal["fhir"]
    base_url: str
    token: SecretStr | None = None
    tls: DestinationTls = Field(default_factory=DestinationTls)
    patient_identifier_system: str | None = None  # e.g. the hospital's MRN system URI
    accession_identifier_system: str | None = None  # e.g. the RIS's accession number system
    identifier_system: str = "urn:pacsai:result"  # of the DiagnosticReport's own identifier

    _url = field_validator("base_url")(_check_http_url)
    _secret = field_serializer("token", when_used="json")(_reveal)


class WebhookDestination(_Retried):
    """Alerts for priority findings as an HTTP POST.

    ``format: json`` posts pacsai's own JSON document; ``slack`` a Slack incoming-webhook body;
    ``teams`` a Microsoft Teams (Workflows) message with an Adaptive Card. With a ``secret``,
    every request carries ``X-Pacsai-Signature-256: sha256=<HMAC-SHA256 of the body>``.
    """

    kind: Literal["webhook"]
    url: str
    secret: SecretStr | None = None
    format: Literal["json", "slack", "teams"] = "json"
    tls: DestinationTls = Field(default_factory=DestinationTls)

    _url = field_validator("url")(_check_http_url)
    _secret = field_serializer("secret", when_used="json")(_reveal)


class EmailDestination(_Retried):
    """Alerts for priority findings as e-mail over SMTP, with STARTTLS unless ``starttls`` is
    false (only for a relay on the same host: the password would then cross in clear)."""

    kind: Literal["email"]
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    ca: Path | None = None  # CA bundle to verify the server with (the system's by default)
    check_hostname: bool = True
    username: str | None = None
    password: SecretStr | None = None
    from_address: str = Field(min_length=3)
    to: list[str] = Field(min_length=1)
    subject_prefix: str = "[pacsai]"

    _secret = field_serializer("password", when_used="json")(_reveal)

    @model_validator(mode="after")
    def _credentials(self) -> EmailDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        if self.password is not None and not self.starttls:
            raise ValueError("a password is only sent over STARTTLS (set starttls: true)")
        return self


def _destination_kind(value: Any) -> str:
    kind = value.get("kind", "dicom") if isinstance(value, dict) else getattr(value, "kind", None)
    return str(kind or "dicom")


#: Any entry of ``destinations:``, told apart by ``kind`` (``dicom`` when left out).
ResultDestination = Annotated[
    Annotated[Destination, Tag("dicom")]
    | Annotated[Hl7Destination, Tag("hl7")]
    | Annotated[FhirDestination, Tag("fhir")]
    | Annotated[WebhookDestination, Tag("webhook")]
    | Annotated[EmailDestination, Tag("email")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="kind must be one of dicom (the default), hl7, fhir, webhook, email",
    ),
]


class Source(_Section):
    """A PACS that `pacsai retrieve` queries (C-FIND) and retrieves studies from.

    ``retrieve: move`` asks the PACS to C-MOVE each study to this node's AE title (the PACS must
    know it, with this node's host and port); ``get`` fetches the instances over the query
    association itself (C-GET), for a PACS that prefers it or cannot reach this node.
    """

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    retrieve: Literal["move", "get"] = "move"
    tls: DestinationTls = Field(default_factory=DestinationTls)
    timeout_seconds: float = Field(default=60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)


class OrdersSettings(_Section):
    """The HL7 listener for orders (ORM^O01, OMI^O23) that tell study completion what to expect.

    Only hosts in ``allowed_hosts`` may send (any host when empty): MLLP has no authentication.
    """

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(default=2575, ge=0, le=65535)
    allowed_hosts: list[str] = Field(default_factory=list)
    timeout_seconds: float = Field(default=60.0, gt=0)  # idle connections are closed after it


class ApiSettings(_Section):
    """The HTTP API (FastAPI) and the operator console, started by `pacsai serve` or alone by
    `pacsai api`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    open_health: bool = True  # /healthz and /readyz without a token
    open_metrics: bool = False  # /metrics without a token
    open_docs: bool = True  # /api/v1/docs and /api/v1/openapi.json without a token
    page_size: int = Field(default=50, ge=1, le=1000)  # default page size; `limit` may ask more
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or
    # networks); empty: the address recorded is always the connecting peer's.
    trusted_proxies: list[str] = Field(default_factory=list)
    session_idle_minutes: float = Field(default=15.0, gt=0)  # console sign-in ends when idle
    session_max_hours: float = Field(default=12.0, gt=0)  # and at the latest after this long
    # The address people open the console at (https://pacsai.example.org, behind the hospital's
    # proxy): HL7 and FHIR results and alerts link to <public_url>/studies/<Study Instance UID>.
    # null: they carry no link (the node's own listening address is rarely one people reach).
    public_url: str | None = None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_http_url(value).rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"{item!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
                ) from exc
        return value


class SyslogSettings(_Section):
    """Forwarding each audit event to an audit repository (RFC 5424 over TLS, RFC 5425)."""

    enabled: bool = False
    host: str | None = None
    port: int = Field(default=6514, ge=1, le=65535)
    tls: bool = True
    ca: Path | None = None
    app_name: str = "pacsai"

    @model_validator(mode="after")
    def _host(self) -> SyslogSettings:
        if self.enabled and not self.host:
            raise ValueError("audit.syslog.enabled needs audit.syslog.host")
        return self


class AuditSettings(_Section):
    """The audit trail's optional forwarding."""

    syslog: SyslogSettings = Field(default_factory=SyslogSettings)


class LoggingSettings(_Section):
    """Log level and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """Everything pacsai can be configured with; see the README for each key."""

    model_config = SettingsConfigDict(
        env_prefix="PACSAI_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    routes: list[Route] | None = None
    destinations: dict[str, ResultDestination] = Field(default_factory=dict)
    sources: dict[str, Source] = Field(default_factory=dict)
    orders: OrdersSettings = Field(default_factory=OrdersSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment overrides it.
        return (env_settings, init_settings)

    def kind_of(self, destination: str) -> str:
        """The kind of the destination called ``destination`` (dicom, hl7, fhir, webhook,
        email).

        Raises
        ------
        KeyError
            If there is no such destination.
        """
        return self.destinations[destination].kind

    @property
    def dicom_destinations(self) -> dict[str, Destination]:
        """The destinations of kind ``dicom`` (C-STORE or STOW-RS), by name."""
        return {
            name: destination
            for name, destination in self.destinations.items()
            if isinstance(destination, Destination)
        }

    def receiver_process_count(self) -> int:
        """How many receiver processes share the port (``node.receiver_processes`` resolved)."""
        if self.node.receiver_processes != "auto":
            return self.node.receiver_processes
        if self.database.url.startswith("sqlite"):
            return 1
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 4))

    @model_validator(mode="after")
    def _routes_send_to_known_destinations(self) -> Settings:
        for route in self.routes or []:
            unknown = [name for name in route.send_to if name not in self.destinations]
            if unknown:
                raise ValueError(
                    f"route {route.name!r} sends to {', '.join(unknown)}, "
                    "which is not under destinations:"
                )
            alerts = [
                name
                for name in route.send_to
                if isinstance(self.destinations[name], WebhookDestination | EmailDestination)
            ]
            if alerts and not route.priority:
                raise ValueError(
                    f"route {route.name!r} sends to {', '.join(alerts)}, which only get alerts "
                    "for priority findings, but has no priority: rule saying when to alert"
                )
        return self


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check its spelling against the README)"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


def load_settings(path: Path | None = None) -> Settings:
    """Load the settings from `path` (YAML) and the environment.

    Parameters
    ----------
    path
        A YAML configuration file, or ``None`` for the embedded defaults plus the environment.

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, or a key is unknown or holds a bad value; the
        message names every offending key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (node:, storage:, ...)")
        data = loaded
    try:
        return Settings(**data)
    except ValidationError as exc:
        lines = "\n".join(f"  {_describe(error)}" for error in exc.errors())
        source = str(path) if path is not None else "the environment"
        raise ConfigError(f"invalid configuration in {source}:\n{lines}") from exc
