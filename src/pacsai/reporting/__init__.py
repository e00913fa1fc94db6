"""DICOM SEG and TID 1500 SR from model outputs, and their delivery (issue 4: not built yet)."""

from __future__ import annotations

__all__: list[str] = []
