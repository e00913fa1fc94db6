"""Peers the scale-out tests run as separate processes.

``python -m tests.peers recording-scp PORT --log FILE [--ae AE] [--delay S] [--no-find]``: a
storage SCP that appends one JSON line per C-STORE it receives (fsynced before it answers, so a
test sees an arrival even when the sender is killed before the response), optionally waits
``--delay`` seconds before answering, and answers Study Root C-FIND at IMAGE level from what it
holds (unless ``--no-find``, like a storage-only SCP). Its log is the destination's view: every
arrival, duplicates included.

Also :class:`BrokerProxy`, a TCP relay whose connections a test can cut.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["BrokerProxy", "arrivals", "main"]


def arrivals(log: Path) -> list[dict[str, str]]:
    """Every C-STORE the recording SCP received, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _recording_scp(port: int, log: Path, ae_title: str, delay: float, find: bool) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
    )

    held: dict[str, dict[str, str]] = {item["sop"]: item for item in arrivals(log)}
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        ds = event.dataset
        item = {
            "sop": str(ds.SOPInstanceUID),
            "series": str(ds.SeriesInstanceUID),
            "study": str(ds.StudyInstanceUID),
            "modality": str(ds.get("Modality", "")),
            "sop_class": str(ds.SOPClassUID),
            "calling": str(event.assoc.requestor.ae_title),
        }
        with lock, log.open("a") as handle:
            handle.write(json.dumps(item) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            held[item["sop"]] = item
        if delay:
            time.sleep(delay)
        return 0x0000

    def on_find(event: Any) -> Iterator[tuple[int, Any]]:
        query = event.identifier
        with lock:
            items = list(held.values())
        for item in items:
            if query.get("StudyInstanceUID") and item["study"] != query.StudyInstanceUID:
                continue
            if query.get("SeriesInstanceUID") and item["series"] != query.SeriesInstanceUID:
                continue
            answer = Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            answer.StudyInstanceUID = item["study"]
            answer.SeriesInstanceUID = item["series"]
            answer.SOPInstanceUID = item["sop"]
            yield 0xFF00, answer
        yield 0x0000, None

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    if find:
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers.append((evt.EVT_C_FIND, on_find))
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


class BrokerProxy:
    """Relays TCP connections from a local port to ``target``; :meth:`cut` drops every
    connection and refuses new ones until :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for a, b in pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._stopped.set()
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:  # a cut may close the pair before this thread has registered it
            selector.register(a, selectors.EVENT_READ, b)
            selector.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in selector.select(timeout=1.0):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers")
    commands = parser.add_subparsers(dest="command", required=True)
    scp = commands.add_parser("recording-scp")
    scp.add_argument("port", type=int)
    scp.add_argument("--log", type=Path, required=True)
    scp.add_argument("--ae", default="RECORDER")
    scp.add_argument("--delay", type=float, default=0.0)
    scp.add_argument("--no-find", action="store_true")
    args = parser.parse_args(argv)
    _recording_scp(args.port, args.log, args.ae, args.delay, not args.no_find)


if __name__ == "__main__":
    main(sys.argv[1:])
