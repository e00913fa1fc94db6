"""Forward each committed audit event to a syslog collector (an ATNA audit record repository).

Each event becomes one RFC 5424 message whose MSG is the DICOM audit message of that event
(PS3.15 A.5.1, see :func:`pacsai.db.audit_export.audit_message_xml`), sent over TLS (RFC 5425) or
plain TCP with octet-counting framing (``MSG-LEN SP SYSLOG-MSG``, RFC 5425 4.3 / RFC 6587 3.4.1).
The header follows IHE ITI TF-2 3.20 (Record Audit Event): facility 10 (security/authorization),
MSGID ``IHE+RFC-3881``, no structured data, no byte order mark; the severity follows the event's
outcome (notice for success, warning for a minor failure, error for worse).

The audit table stays the durable truth: forwarding is best effort. Events are put on a bounded
queue by an :mod:`pacsai.db.audit_hooks` listener, which never blocks and never fails the
transaction that appended them; a background thread sends them, reconnecting with backoff when the
collector is away. When the queue is full, further events are counted as dropped (and logged, once
per episode) rather than held in memory without bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from datetime import UTC
from typing import Final

from sqlalchemy import Engine

from pacsai.config import Settings, SyslogSettings
from pacsai.db.audit_export import audit_message_xml
from pacsai.db.audit_hooks import add_listener, remove_listener
from pacsai.db.audit_query import AuditRecord
from pacsai.errors import ConfigError

__all__ = [
    "FACILITY_SECURITY",
    "MSGID",
    "SyslogForwarder",
    "frame",
    "start_forwarding",
    "syslog_message",
]

log = logging.getLogger(__name__)

FACILITY_SECURITY: Final = 10  # security/authorization messages (IHE ITI TF-2 3.20.4.1.2)
MSGID: Final = "IHE+RFC-3881"
_SEVERITY: Final = {0: 5, 4: 4, 8: 3, 12: 3}  # notice, warning, error, error
_NILVALUE: Final = "-"


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most `limit` long."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return cleaned or _NILVALUE


def syslog_message(
    record: AuditRecord,
    *,
    audit_source_id: str,
    hostname: str,
    app_name: str,
    procid: str | int | None = None,
) -> bytes:
    """The RFC 5424 message of one audit event, its MSG the DICOM audit message (UTF-8).

    Parameters
    ----------
    record
        The committed audit row.
    audit_source_id
        This node's AE title (``AuditSourceID``).
    hostname, app_name
        RFC 5424 HOSTNAME (this machine's FQDN or address) and APP-NAME.
    procid
        RFC 5424 PROCID; the process ID by default.
    """
    pri = FACILITY_SECURITY * 8 + _SEVERITY.get(record.outcome, 3)
    timestamp = record.occurred_at.astimezone(UTC).isoformat(timespec="microseconds")
    header = " ".join(
        (
            f"<{pri}>1",
            timestamp.replace("+00:00", "Z"),
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(str(os.getpid() if procid is None else procid), 128),
            MSGID,
            _NILVALUE,  # STRUCTURED-DATA
        )
    )
    body = audit_message_xml(record, audit_source_id=audit_source_id)
    return header.encode("ascii") + b" " + body.encode("utf-8", "surrogatepass")


def frame(message: bytes) -> bytes:
    """Octet-counting framing (RFC 5425 4.3): ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogForwarder:
    """A background sender of audit events to one syslog collector.

    Parameters
    ----------
    settings
        ``audit.syslog``: host, port, ``tls`` and the CA that signs the collector's certificate.
    audit_source_id
        This node's AE title, the ``AuditSourceID`` of every message.
    hostname
        RFC 5424 HOSTNAME; this machine's fully qualified name by default.
    queue_size
        Events held while the collector is slow or away; beyond that they are dropped (they
        remain in the audit table).
    timeout
        Seconds allowed to connect and to send one message.
    backoff, max_backoff
        Seconds between reconnection attempts, doubling up to `max_backoff`.

    Notes
    -----
    :meth:`attach` registers the forwarder on a database engine so that every committed audit
    event is queued; :meth:`stop` detaches it and sends what is queued, within a deadline.
    """

    def __init__(
        self,
        settings: SyslogSettings,
        *,
        audit_source_id: str,
        hostname: str | None = None,
        queue_size: int = 10_000,
        timeout: float = 10.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        if not settings.host:
            raise ConfigError("audit.syslog.host is required to forward audit events")
        self.settings = settings
        self.host: str = settings.host
        self.audit_source_id = audit_source_id
        self.hostname = hostname or socket.getfqdn()
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[AuditRecord] = queue.Queue(maxsize=queue_size)
        self._engines: list[Engine] = []
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._closing = threading.Event()
        self._deadline = 0.0
        self._dropping = False
        self._counting = threading.Lock()
        self._context = self.tls_context() if settings.tls else None

    def tls_context(self) -> ssl.SSLContext:
        """Verify the collector against ``ca`` (or the system's CAs) and its host name."""
        try:
            context = ssl.create_default_context(
                cafile=None if self.settings.ca is None else str(self.settings.ca)
            )
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(
                f"audit.syslog.ca: cannot load {self.settings.ca} as PEM CA certificates: {exc}"
            ) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    # --- the listener side: never blocks, never raises --------------------------------------------

    def __call__(self, records: Sequence[AuditRecord]) -> None:
        """Queue committed events (the :data:`~pacsai.db.audit_hooks.AuditListener` call)."""
        for record in records:
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                with self._counting:  # committing threads call this concurrently
                    self.dropped += 1
                    first = not self._dropping
                    self._dropping = True
                if first:
                    log.warning(
                        "audit forwarding to %s:%d is behind: the queue is full and events are "
                        "dropped from forwarding (they stay in the audit table)",
                        self.host,
                        self.settings.port,
                        extra={"action": "audit_syslog_drop"},
                    )

    def attach(self, engine: Engine) -> None:
        """Forward the audit events committed on `engine`."""
        add_listener(engine, self)
        self._engines.append(engine)

    # --- the sender thread ------------------------------------------------------------------------

    def start(self) -> SyslogForwarder:
        """Start the sender thread; returns ``self``."""
        if self._thread is None:
            self._closing.clear()
            self._thread = threading.Thread(
                target=self._run, name="pacsai-audit-syslog", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Detach from every engine, send what is queued within `timeout` seconds, and close."""
        for engine in self._engines:
            remove_listener(engine, self)
        self._engines.clear()
        if self._thread is None:
            return
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._thread.join(timeout + self.timeout + 1)
        self._thread = None
        self._close()
        if self.pending:
            log.warning(
                "%d audit events were not forwarded before the stop (they are in the audit table)",
                self.pending,
                extra={"action": "audit_syslog_unsent"},
            )

    @property
    def pending(self) -> int:
        """Events queued and not yet sent."""
        return self._queue.qsize()

    def _overdue(self) -> bool:
        return self._closing.is_set() and time.monotonic() >= self._deadline

    def _run(self) -> None:
        while not self._overdue():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return  # everything queued went out
                continue
            data = frame(
                syslog_message(
                    item,
                    audit_source_id=self.audit_source_id,
                    hostname=self.hostname,
                    app_name=self.settings.app_name,
                )
            )
            if not self._deliver(data):
                return
            self.sent += 1
            if self._dropping and self._queue.qsize() == 0:
                self._dropping = False

    def _deliver(self, data: bytes) -> bool:
        """Send one framed message, reconnecting with backoff until it goes or time is up."""
        delay = self.backoff
        failures = 0
        while True:
            try:
                connection = self._socket or self._connect()
                connection.sendall(data)
            except OSError as exc:  # ssl.SSLError is an OSError
                self._close()
                failures += 1
                if failures == 1:
                    log.warning(
                        "cannot forward audit events to %s:%d (%s); retrying",
                        self.host,
                        self.settings.port,
                        exc,
                        extra={"action": "audit_syslog_down"},
                    )
                if self._closing.is_set():
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    time.sleep(min(delay, remaining))
                else:
                    self._closing.wait(delay)  # woken early by stop()
                delay = min(delay * 2, self.max_backoff)
                continue
            if failures:
                log.info(
                    "audit forwarding to %s:%d resumed",
                    self.host,
                    self.settings.port,
                    extra={"action": "audit_syslog_up"},
                )
            return True

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.settings.port), timeout=self.timeout)
        try:
            connection = (
                raw
                if self._context is None
                else self._context.wrap_socket(raw, server_hostname=self.host)
            )
        except OSError:
            raw.close()
            raise
        connection.settimeout(self.timeout)
        self._socket = connection
        return connection

    def _close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def start_forwarding(settings: Settings, engine: Engine) -> SyslogForwarder | None:
    """Forward the audit events committed on `engine` when ``audit.syslog.enabled`` is set.

    Returns the running forwarder (stop it after the last event of the run is appended), or
    ``None`` when forwarding is off.
    """
    if not settings.audit.syslog.enabled:
        return None
    forwarder = SyslogForwarder(settings.audit.syslog, audit_source_id=settings.node.ae_title)
    forwarder.attach(engine)
    log.info(
        "forwarding audit events to %s:%d (%s)",
        forwarder.host,
        settings.audit.syslog.port,
        "TLS" if settings.audit.syslog.tls else "TCP, unencrypted",
        extra={"action": "audit_syslog_start"},
    )
    return forwarder.start()
