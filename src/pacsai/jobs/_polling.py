"""Worker threads that poll the database for work, and wake up early when told there is some."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from pacsai.errors import PacsaiError

__all__ = ["PollingWorkers"]

log = logging.getLogger(__name__)


class PollingWorkers(ABC):
    """``count`` threads named ``pacsai-<kind>-N`` that call :meth:`drain` until :meth:`stop`.

    A thread drains, then sleeps ``poll_seconds`` or until :meth:`notify`. A database error
    is logged and the thread carries on at the next poll.
    """

    kind: str

    def __init__(self, *, count: int, poll_seconds: float) -> None:
        self.count = count
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @abstractmethod
    def drain(self) -> int:
        """Do the work that is due now, in this thread, until none is left or :meth:`stop`;
        how many items were handled."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> int:
        """How many of the threads are running."""
        return sum(thread.is_alive() for thread in self._threads)

    def notify(self) -> None:
        """Work was queued: wake a thread now."""
        self._wake.set()

    def start(self) -> None:
        """Start the threads."""
        for index in range(self.count):
            thread = threading.Thread(
                target=self._loop, name=f"pacsai-{self.kind}-{index + 1}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work; what a thread is doing finishes first (up to `timeout` each)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.drain()
            except PacsaiError as exc:
                log.error("%s: %s; retrying", threading.current_thread().name, exc)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
