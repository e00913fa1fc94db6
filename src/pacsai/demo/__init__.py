"""``pacsai demo`` and the PACS stand-ins it (and the end-to-end tests) run beside a node.

- :class:`~pacsai.demo.orthanc.Orthanc`: a real Orthanc as a child process, with a REST client.
- :class:`~pacsai.demo.local_pacs.LocalPacs`: a small storage SCP, when Orthanc is not installed.
- :func:`~pacsai.demo.run.run_demo`: phantoms pushed through a node and back into the PACS.
- :func:`~pacsai.demo.preview.write_segmentation_previews`: PNG previews of a SEG.

Importing this package loads no model stack; :mod:`pacsai.demo.run` does (it runs a node).
"""

from __future__ import annotations

from pacsai.demo.local_pacs import LocalPacs, StoredInstance
from pacsai.demo.orthanc import Orthanc, OrthancError
from pacsai.demo.preview import encode_png, write_png, write_segmentation_previews

__all__ = [
    "LocalPacs",
    "Orthanc",
    "OrthancError",
    "StoredInstance",
    "encode_png",
    "write_png",
    "write_segmentation_previews",
]
