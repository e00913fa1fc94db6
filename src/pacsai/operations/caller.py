"""Who asks an operation to run: the actor and address its audit events record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Caller"]


@dataclass(frozen=True)
class Caller:
    """The person or system an operation runs for.

    Parameters
    ----------
    actor
        The audit actor: ``api:<token name>`` (API and console), ``cli:<os user>`` (commands).
    remote_address
        The address the request came from (``None`` for commands run on the node).
    origin
        What was used, recorded in every audit event's detail: ``{"route": "GET /studies"}``,
        ``{"route": "GET /studies", "via": "console"}`` or ``{"command": "jobs retry"}``.
    """

    actor: str
    remote_address: str | None = None
    origin: Mapping[str, Any] = field(default_factory=dict)

    def detail(self, **values: Any) -> dict[str, Any]:
        """An audit detail: the origin, then ``values``."""
        return {**self.origin, **values}
