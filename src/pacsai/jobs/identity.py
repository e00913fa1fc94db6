"""Who this node and this process are, in leases and in the workers table.

The node id is ``node.id`` when set; otherwise it is made once, ``<hostname>-<6 hex digits>``,
and kept in ``node.state_dir/node-id``, so that it survives restarts. ``state_dir`` must be local
to each host: two hosts sharing it would share an identity.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from pathlib import Path

from pacsai.config import NodeSettings
from pacsai.errors import ConfigError

__all__ = ["host_name", "node_id", "process_alive"]

_VALID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def host_name() -> str:
    """This host's name, as recorded beside each worker."""
    return socket.gethostname()[:255] or "localhost"


def node_id(node: NodeSettings) -> str:
    """``node.id``, or the id kept in ``node.state_dir/node-id`` (made on first use).

    Raises
    ------
    ConfigError
        If the state directory cannot be written, or holds a malformed id.
    """
    if node.id:
        return node.id
    path = Path(node.state_dir) / "node-id"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = f"{_label(host_name())}-{secrets.token_hex(3)}"
        with contextlib.suppress(FileExistsError), path.open("x", encoding="ascii") as handle:
            handle.write(candidate + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        value = path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot keep this node's identity in {path}: {exc.strerror}; make node.state_dir "
            "writable, or set node.id"
        ) from exc
    if not _VALID.match(value):
        raise ConfigError(f"{path} holds {value!r}, not a node id: remove it, or set node.id")
    return value


def _label(host: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", host.split(".")[0]).strip("-")
    return (cleaned or "node")[:48]


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a reused id reads as alive: then the
    leases of the process that had it run out instead of being taken back at once)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
