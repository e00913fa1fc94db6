"""Before sending again what a lost worker may have sent: ask the destination what it holds.

A worker lost while sending (killed, crashed, its node powered off) may have had one object
accepted by the destination without recording the acknowledgement. The next attempt asks the
destination first: C-FIND (Study Root, IMAGE level, one query per series) for a DICOM peer,
QIDO-RS for a DICOMweb one. Objects found there are recorded as acknowledged and not sent
again. A destination that cannot be asked (a storage-only SCP) gets the unacknowledged objects
again under the same SOP Instance UIDs, which a PACS stores as the same instance (a duplicate it
ignores or overwrites), never as a second result.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import httpx

from pacsai.db.deliveries import DeliveryObject
from pacsai.errors import DeliveryError
from pacsai.reporting.delivery import Peer
from pacsai.reporting.variants import binary_form_uid
from pacsai.scu import NoAcceptedContextError, Target, find_instances

__all__ = ["held_by_destination"]

log = logging.getLogger(__name__)


def held_by_destination(
    peer: Peer,
    objects: Sequence[DeliveryObject],
    *,
    study_instance_uid: str,
    calling_ae_title: str,
    tls: ssl.SSLContext | None = None,
) -> tuple[set[str], str] | None:
    """The SOP Instance UIDs of ``objects`` that ``peer`` holds (in the form written, or as
    the BINARY form of a LABELMAP result), and how that was learnt (``C-FIND`` or ``QIDO-RS``);
    ``None`` when the destination cannot be asked."""
    series = sorted({o.series_instance_uid for o in objects})
    # A LABELMAP SEG (and an SR referring to it) may have gone in its BINARY form.
    forms = {
        o.sop_instance_uid: {o.sop_instance_uid, binary_form_uid(o.sop_instance_uid)}
        for o in objects
    }
    found: set[str] = set()
    try:
        if peer.destination.stow_url:
            for series_uid in series:
                found |= _qido(peer, study_instance_uid, series_uid, tls)
            method = "QIDO-RS"
        else:
            if peer.host is None or peer.ae_title is None or peer.destination.port is None:
                return None
            target = Target(peer.ae_title, peer.host, peer.destination.port)
            for series_uid in series:
                found |= find_instances(
                    target,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_uid,
                    calling_ae_title=calling_ae_title,
                    timeout=peer.destination.timeout_seconds,
                    tls=tls,
                )
            method = "C-FIND"
    except NoAcceptedContextError as exc:
        log.info("%s cannot be queried (%s): unacknowledged objects go again", peer.name, exc)
        return None
    except DeliveryError as exc:
        log.warning("%s could not be queried (%s): unacknowledged objects go again", peer.name, exc)
        return None
    return {uid for uid, held in forms.items() if held & found}, method


def _qido(peer: Peer, study: str, series: str, tls: ssl.SSLContext | None) -> set[str]:
    """QIDO-RS (PS3.18 10.6): the instances of one series."""
    assert peer.destination.stow_url is not None
    url = f"{peer.destination.stow_url.rstrip('/')}/studies/{study}/series/{series}/instances"
    try:
        response = httpx.get(
            url,
            headers={"Accept": "application/dicom+json"},
            timeout=peer.destination.timeout_seconds,
            verify=tls or True,
        )
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{url}: {exc}") from exc
    if response.status_code in (204, 404):
        return set()
    if response.status_code != 200:
        raise DeliveryError(f"{url} answered HTTP {response.status_code}")
    try:
        payload = response.json()
    except ValueError as exc:
        raise DeliveryError(f"{url} answered something other than DICOM JSON") from exc
    found: set[str] = set()
    for item in payload if isinstance(payload, list) else []:
        values = item.get("00080018", {}).get("Value", []) if isinstance(item, dict) else []
        found.update(str(value) for value in values)
    return found
