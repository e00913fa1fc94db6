"""The HTTP API that worklists and auditors use (issue 5: not built yet)."""

from __future__ import annotations

__all__: list[str] = []
