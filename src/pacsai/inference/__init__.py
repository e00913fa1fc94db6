"""Routing studies to MONAI bundles and running them (issue 3: not built yet).

The receiver never imports this package, so it runs without the GPU stack.
"""

from __future__ import annotations

__all__: list[str] = []
