"""A background thread that does one thing every few seconds until it is stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pacsai.errors import PacsaiError

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``action`` every ``interval`` seconds in a daemon thread named ``name``.

    An error of the kinds in ``tolerate`` is logged as ``"<what> failed, will retry: ..."`` and
    the next period tries again; ``action`` returning ``False`` ends the thread. With
    ``at_start``, the first call is at :meth:`start`, otherwise one interval later.
    """

    def __init__(
        self,
        name: str,
        action: Callable[[], object],
        *,
        interval: float,
        what: str,
        at_start: bool = False,
        tolerate: tuple[type[BaseException], ...] = (PacsaiError,),
    ) -> None:
        self.name = name
        self.action = action
        self.interval = interval
        self.what = what
        self.at_start = at_start
        self.tolerate = tolerate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (a long action may check it and return early)."""
        return self._stop.is_set()

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; a call in progress finishes first."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        if not self.at_start and self._stop.wait(self.interval):
            return
        while not self._stop.is_set():
            try:
                if self.action() is False:
                    return
            except self.tolerate as exc:
                log.error("%s failed, will retry: %s", self.what, exc)
            self._stop.wait(self.interval)
