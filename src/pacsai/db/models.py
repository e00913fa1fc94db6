"""SQLAlchemy 2 typed ORM models: the durable truth of what arrived and what is to be done.

Times are stored as naive UTC on every backend and handed out as aware UTC datetimes.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "DEFAULT_QUEUE",
    "ApiToken",
    "Association",
    "AssociationOutcome",
    "AuditEvent",
    "Base",
    "ConsoleSession",
    "DeliveredObject",
    "Delivery",
    "DeliveryStatus",
    "ExpectationState",
    "Instance",
    "Job",
    "JobStatus",
    "Result",
    "ResultKind",
    "ResultObject",
    "Retrieval",
    "RetrievalStatus",
    "Series",
    "Study",
    "StudyExpectation",
    "StudyStatus",
    "TokenRole",
    "UTCDateTime",
    "Worker",
    "utcnow",
]

UID = String(64)
DEFAULT_QUEUE = "default"  # the queue of jobs whose routes are not pinned to another


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and returned as aware UTC, the same on every backend."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so that migrations name constraints stably."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class StudyStatus(enum.StrEnum):
    """Where a study stands in assembly."""

    RECEIVING = "RECEIVING"  # instances may still arrive; the quiet timer runs
    COMPLETE = "COMPLETE"  # quiet for long enough; a job was queued


class JobStatus(enum.StrEnum):
    """The states of a job (DESIGN.md, State and durability)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"

    @classmethod
    def finished(cls) -> tuple[JobStatus, ...]:
        """The states a job ends in."""
        return (cls.SUCCEEDED, cls.SKIPPED, cls.FAILED)


class ResultKind(enum.StrEnum):
    """What a model produced for one series."""

    SEGMENTATION = "SEGMENTATION"
    CLASSIFICATION = "CLASSIFICATION"


class DeliveryStatus(enum.StrEnum):
    """The states of a delivery (DESIGN.md, State and durability)."""

    PENDING = "PENDING"
    SENT = "SENT"
    RETRYING = "RETRYING"
    FAILED = "FAILED"


class AssociationOutcome(enum.StrEnum):
    """How an accepted association ended."""

    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    ABORTED = "ABORTED"
    INTERRUPTED = "INTERRUPTED"  # the node stopped (or was killed) while it was open


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, validate_strings=True)


class Study(Base):
    """A study as assembled from the instances received for it."""

    __tablename__ = "studies"
    # Retention looks for the oldest COMPLETE studies first (migration 0011).
    __table_args__ = (Index("ix_studies_status_last_received_at", "status", "last_received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "study_status"), index=True)
    quiet_seconds: Mapped[float] = mapped_column(Float)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    # When retention or `pacsai studies purge` removed its received instances (files and rows);
    # null while it holds what was received (an instance arriving again clears it).
    purged_at: Mapped[datetime | None]

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Series(Base):
    """A series within a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # What the routing rules read from the header of its first image (RoutingAttributes as
    # JSON), so that a job routes from rows instead of files; null before its first image or
    # before 0012, and "" once a replaced instance may have changed which image is first.
    routing_attributes: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Association(Base):
    """An accepted DICOM association, from A-ASSOCIATE-AC to its release or abort."""

    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # The node whose receiver accepted it (``node.id``): at start-up a node closes only its own
    # open associations (null: recorded before 0011, closed by any node).
    node_id: Mapped[str | None] = mapped_column(String(64), index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    remote_host: Mapped[str] = mapped_column(String(64))
    remote_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean)
    outcome: Mapped[AssociationOutcome] = mapped_column(
        _enum(AssociationOutcome, "association_outcome"), index=True
    )
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """One stored SOP instance and where its bytes are in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[str | None] = mapped_column(ForeignKey("associations.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # Images it holds (NumberOfFrames, 1, or 0 for an SR or other non-image); null before 0012.
    frames: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(400))  # relative to storage.spool_dir
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))  # of the dataset as sent, file meta excluded
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    remote_address: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]
    replaced_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """Work to do on a complete study; the job table is the durable truth of the queue."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created_at", "status", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"))
    reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer)  # of the study when the job was queued
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    timings: Mapped[str | None] = mapped_column(Text)  # JSON: seconds per stage
    # Set by `pacsai jobs retry`: send results again to destinations that already have them,
    # and/or derive new UIDs for the objects (a salt mixed into result_uid).
    resend: Mapped[bool] = mapped_column(Boolean, default=False)
    uid_salt: Mapped[str | None] = mapped_column(String(64))
    # Which workers take it (`queue:` of a route), and which routes it runs (JSON list; null:
    # every route that fires). A job's routes pinned to another queue become a job of their own.
    queue: Mapped[str] = mapped_column(String(64), default=DEFAULT_QUEUE)
    routes: Mapped[str | None] = mapped_column(Text)
    # The lease of a RUNNING job: the worker holding it renews lease_until; once it has passed,
    # the worker is taken for lost and the job runs again (or ends FAILED after max_attempts).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None]
    published_at: Mapped[datetime | None]  # last handed to the broker (celery backend)

    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", order_by="Result.id")


class Result(Base):
    """One model output on one series of a job's study: a label map or class probabilities.

    The output itself is a compressed NumPy file under ``storage.results_dir`` (``output_path``,
    relative to it) holding the label map or probabilities, the affine and the source instances;
    ``summary`` is what people and worklists read: labels present with volumes, or probabilities.
    """

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    route_name: Mapped[str] = mapped_column(String(128))
    series_instance_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "result_kind"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    output_path: Mapped[str] = mapped_column(String(400))
    summary: Mapped[str] = mapped_column(Text)  # JSON object
    created_at: Mapped[datetime]
    # When its files (output, objects, previews) were removed; the row and its objects' rows
    # stay, so that findings and what was sent where remain known.
    purged_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="results")
    objects: Mapped[list[ResultObject]] = relationship(
        back_populates="result", order_by="ResultObject.id"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="result", order_by="Delivery.id"
    )


class ResultObject(Base):
    """A DICOM object written for a result (SEG, SR, overlay image), kept under results_dir."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # SEG | SR | OVERLAY
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))  # relative to storage.results_dir
    created_at: Mapped[datetime]

    result: Mapped[Result] = relationship(back_populates="objects")


class Delivery(Base):
    """One delivery to one destination: durable, retried with backoff, then FAILED.

    ``kind`` is the destination's kind. A ``dicom`` delivery sends the objects of one result
    (``result_id``; ``kinds`` says which: SEG, SR, OVERLAY). The other kinds send one message
    per finished job (``result_id`` is null): ``hl7`` an ORU^R01, ``fhir`` a transaction
    Bundle, ``webhook`` and ``email`` an alert for a priority finding. Their ``payload`` is
    the study result as it stood when the job finished (JSON of
    :class:`pacsai.reporting.study_result.StudyResult` without its key; no patient name), and
    ``message_key`` is the key every attempt sends it under (HL7 MSH-10, the FHIR resources'
    identifiers, ``X-Pacsai-Delivery``, the e-mail's Message-ID), so that a receiver can tell
    a repeat from a new message.

    A worker holds a delivery while sending it by setting ``claimed_until`` (a lease), so that
    several workers never send it twice and a crashed worker's claim runs out.
    """

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_status_next_attempt_at", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="dicom")  # dicom|hl7|fhir|webhook|email
    destination: Mapped[str] = mapped_column(String(64))
    kinds: Mapped[str] = mapped_column(String(64))  # object kinds to send, e.g. "SEG,SR"
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    claimed_until: Mapped[datetime | None]
    # The worker holding the lease; still set when a worker was lost while sending, which makes
    # the next attempt check the objects that may have arrived before sending them again.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)  # of the successful attempt
    # The SEG type the destination received, negotiated when sent: LABELMAP where it accepts
    # the Label Map Segmentation SOP Class, else BINARY; None when no SEG was sent.
    seg_type: Mapped[str | None] = mapped_column(String(16))
    message_key: Mapped[str | None] = mapped_column(String(20))  # kinds other than dicom
    payload: Mapped[str | None] = mapped_column(Text)  # kinds other than dicom: JSON
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]

    result: Mapped[Result | None] = relationship(back_populates="deliveries")
    acknowledged: Mapped[list[DeliveredObject]] = relationship(
        back_populates="delivery", order_by="DeliveredObject.id"
    )


class DeliveredObject(Base):
    """One object of a delivery that the destination has: committed right after its C-STORE
    succeeded, or after a query (C-FIND, QIDO-RS) found it there following a lost worker."""

    __tablename__ = "delivered_objects"
    __table_args__ = (UniqueConstraint("delivery_id", "result_object_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    result_object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    confirmed_by: Mapped[str] = mapped_column(String(16))  # C-STORE | STOW-RS | C-FIND | QIDO-RS
    acknowledged_at: Mapped[datetime]

    delivery: Mapped[Delivery] = relationship(back_populates="acknowledged")


class Worker(Base):
    """A process that runs jobs and deliveries, as it last reported itself (its heartbeat).

    ``id`` is stable across restarts on one node (``<node id>/<name>``), so that a restarted
    worker takes back what its predecessor held instead of waiting for the leases to run out.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16))  # local | celery
    device: Mapped[str] = mapped_column(String(32))
    queues: Mapped[str] = mapped_column(Text)  # comma-separated; "*": every queue
    concurrency: Mapped[int] = mapped_column(Integer)
    models: Mapped[str] = mapped_column(Text)  # JSON: model name -> "warm" | "loading" | error
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]


class AuditEvent(Base):
    """One row of the append-only, hash-chained audit trail (DICOM PS3.15 A.5.3 event IDs).

    ``row_hash`` is the SHA-256 of this row's content and ``prev_hash``; ``prev_hash`` is the
    ``row_hash`` of the row before it. Editing, deleting or inserting a row breaks the chain.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_occurred_at", "occurred_at"),
        Index("ix_audit_events_study_instance_uid", "study_instance_uid"),
        Index("ix_audit_events_patient_id", "patient_id"),
        Index("ix_audit_events_event_id_occurred_at", "event_id", "occurred_at"),
        # `GET /audit?actor=|outcome=|event_id=`, newest first: (value, id) serves both the
        # filter and the order (migration 0005).
        Index("ix_audit_events_actor_id", "actor", "id"),
        Index("ix_audit_events_outcome_id", "outcome", "id"),
        Index("ix_audit_events_event_id_id", "event_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime]
    event_id: Mapped[str] = mapped_column(String(16))  # DCM code value, e.g. 110104
    event_type: Mapped[str | None] = mapped_column(String(16))  # DCM code value, e.g. 110120
    action: Mapped[str] = mapped_column(String(1))  # C R U D E (PS3.15 EventActionCode)
    outcome: Mapped[int] = mapped_column(Integer)  # 0, 4, 8, 12 (PS3.15 EventOutcomeIndicator)
    actor: Mapped[str] = mapped_column(String(128))
    remote_address: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)  # JSON object
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)


class TokenRole(enum.StrEnum):
    """What an API token may do; each role can do everything the roles before it can."""

    VIEWER = "viewer"  # studies, jobs, worklist results
    AUDITOR = "auditor"  # also the audit trail
    ADMIN = "admin"  # also retries, token listing and (when protected) metrics


class ApiToken(Base):
    """A bearer token of the HTTP API: only the SHA-256 of its secret is stored.

    A revoked token keeps its row (``revoked_at``) so that the audit trail's ``api:<name>``
    actors stay explained; at most one unrevoked token holds a name.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (
        Index(
            "uq_api_tokens_active_name",
            "name",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[TokenRole] = mapped_column(_enum(TokenRole, "token_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the secret
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class ConsoleSession(Base):
    """A sign-in to the operator console: a browser holding the session's secret in a cookie.

    Only the SHA-256 of the secret is stored. The session acts with its token's name and role,
    and ends when signed out (``ended_at``), when idle or too old, or when its token is revoked.
    """

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    remote_address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class ExpectationState(enum.StrEnum):
    """Where an expectation of a study (from MPPS or an HL7 order) stands."""

    IN_PROGRESS = "IN_PROGRESS"  # an MPPS step still running: nothing to expect yet
    WAITING = "WAITING"  # the study completes as soon as what is expected has arrived
    MET = "MET"  # the study completed through it, before its quiet window
    SUPERSEDED = "SUPERSEDED"  # all of it arrived, but the quiet window completed the study first
    DISCONTINUED = "DISCONTINUED"  # the MPPS step was discontinued: the quiet window decides
    EXPIRED = "EXPIRED"  # no matching study got what was expected within its lifetime


class StudyExpectation(Base):
    """What an MPPS step or an HL7 order says a study will hold, or that it is complete.

    It names the study by ``study_instance_uid``, else by ``accession_number``. A study it
    names completes (and gets its job) once every series in ``expected_series`` (JSON: Series
    Instance UID -> instance count or null) holds its instances and the study at least
    ``expected_instances``, or at once with ``complete_now``; otherwise the quiet window applies.
    ``reference`` is the MPPS SOP Instance UID, or ``<sending application>|<order>`` for HL7.
    """

    __tablename__ = "study_expectations"
    __table_args__ = (UniqueConstraint("source", "reference"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(8))  # MPPS | HL7
    reference: Mapped[str] = mapped_column(String(200))
    state: Mapped[ExpectationState] = mapped_column(
        _enum(ExpectationState, "expectation_state"), index=True
    )
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    expected_series: Mapped[str | None] = mapped_column(Text)  # JSON object
    complete_now: Mapped[bool] = mapped_column(Boolean, default=False)
    actor: Mapped[str] = mapped_column(String(128))  # calling AE title or HL7 sending application
    remote_address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    met_at: Mapped[datetime | None]


class RetrievalStatus(enum.StrEnum):
    """Where a retrieval from a PACS stands."""

    RUNNING = "RUNNING"  # querying the PACS, or retrieving the studies found
    SUCCEEDED = "SUCCEEDED"  # every study found was retrieved (or only listed: a dry run)
    FAILED = "FAILED"  # nothing found, the PACS could not be asked, or a study failed
    INTERRUPTED = "INTERRUPTED"  # the process running it stopped before it ended


class Retrieval(Base):
    """One `pacsai retrieve` or ``POST /retrieve``: what was asked of which PACS, and how each
    study found went (``studies``: JSON list, one object per study with its last counts and
    final DIMSE status). ``host`` and ``pid`` name the process running it, so that one left
    RUNNING by a stopped process is shown INTERRUPTED."""

    __tablename__ = "retrievals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[RetrievalStatus] = mapped_column(
        _enum(RetrievalStatus, "retrieval_status"), index=True
    )
    source: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(8))  # move | get
    criteria: Mapped[str] = mapped_column(Text)  # JSON object
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    actor: Mapped[str] = mapped_column(String(128))
    remote_address: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    found: Mapped[int | None] = mapped_column(Integer)  # studies the C-FIND listed
    studies: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
