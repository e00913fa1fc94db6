"""What a finished study's AI results say, as one typed value for the RIS and for alerts.

:class:`StudyResult` is what the HL7 (:mod:`pacsai.reporting.hl7`), FHIR
(:mod:`pacsai.reporting.fhir`) and alert (:mod:`pacsai.reporting.alerts`) senders take. It has
no field for the patient's name, so no message built from it can carry one; the patient ID is
there because a RIS files results by it (HL7 PID-3, FHIR ``subject``), and alerts leave it out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Literal

__all__ = ["Finding", "ModelRun", "ResultObjectRef", "StudyResult"]

_KEY = re.compile(r"^[A-Za-z0-9._-]{1,20}$")


_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1


def _check_uid(value: str, what: str) -> None:
    if len(value) > 64 or not _UID.fullmatch(value):
        raise ValueError(f"{what} {value[:70]!r} is not a UID (digits and dots, at most 64)")


@dataclass(frozen=True, slots=True)
class ModelRun:
    """A model that read the study: bundle name and version (with its weights checksum)."""

    name: str
    version: str

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.version.strip():
            raise ValueError("a model run needs a name and a version")


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a model looked for, and whether it found it.

    A segmentation label gives ``volume_ml`` (0 when absent); a classification gives
    ``probability`` (0 to 1); exactly one of them. ``present`` is the model's verdict (a label
    with voxels, a probability at or above its threshold). ``model`` is the
    :attr:`ModelRun.name` that made it.
    """

    label: str
    present: bool
    model: str
    volume_ml: float | None = None
    probability: float | None = None

    def __post_init__(self) -> None:
        if not self.label.strip():
            raise ValueError("a finding needs a label")
        if (self.volume_ml is None) == (self.probability is None):
            raise ValueError(f"finding {self.label!r}: give volume_ml or probability (one)")
        if self.volume_ml is not None and (not math.isfinite(self.volume_ml) or self.volume_ml < 0):
            raise ValueError(f"finding {self.label!r}: volume_ml must be finite and >= 0")
        if self.probability is not None and not 0 <= self.probability <= 1:
            raise ValueError(f"finding {self.label!r}: probability must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class ResultObjectRef:
    """A DICOM object pacsai wrote into the study (a SEG or an SR)."""

    kind: Literal["SEG", "SR"]
    series_instance_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        if self.kind not in ("SEG", "SR"):
            raise ValueError(f"object kind {self.kind!r} is not SEG or SR")
        _check_uid(self.series_instance_uid, f"{self.kind} Series Instance UID")
        _check_uid(self.sop_instance_uid, f"{self.kind} SOP Instance UID")


@dataclass(frozen=True, slots=True)
class StudyResult:
    """The AI results of one study, without the patient's name.

    Parameters
    ----------
    key
        Identifies this result message, the same on every attempt to send it (1 to 20 of
        ``A-Z a-z 0-9 . _ -``): HL7 MSH-10, the FHIR DiagnosticReport's identifier, the webhook's
        ``X-Pacsai-Delivery``. A receiver that sees it twice has seen the same result twice.
    study_instance_uid, accession_number, patient_id
        The study, its accession number (HL7 OBR-3) and the patient's ID (HL7 PID-3).
    study_time
        When the study was performed (DICOM Study Date and Time), if known.
    models, findings
        The models that ran, and what each looked for.
    priority, priority_reasons
        Whether a route's priority rule holds, and each rule that does, in words.
    objects
        The SEG and SR written into the study.
    link
        Where a person sees the study in pacsai's console or API.
    """

    key: str
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    study_time: datetime | None
    models: tuple[ModelRun, ...]
    findings: tuple[Finding, ...]
    priority: bool = False
    priority_reasons: tuple[str, ...] = ()
    objects: tuple[ResultObjectRef, ...] = ()
    link: str | None = None

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ValueError(f"key {self.key!r} must be 1 to 20 of A-Z a-z 0-9 . _ -")
        _check_uid(self.study_instance_uid, "Study Instance UID")
        if not self.models:
            raise ValueError("a study result names at least one model")
        names = frozenset(model.name for model in self.models)
        unknown = sorted({f.model for f in self.findings} - names)
        if unknown:
            raise ValueError(f"findings name models that did not run: {', '.join(unknown)}")
        if self.priority_reasons and not self.priority:
            raise ValueError("priority_reasons given for a result that is not priority")
        if self.link is not None and not self.link.startswith(("http://", "https://")):
            raise ValueError("link must be an http:// or https:// URL")

    def model(self, name: str) -> ModelRun:
        """The run of the model called ``name``."""
        for run in self.models:
            if run.name == name:
                return run
        raise KeyError(name)

    def objects_of(self, kind: Literal["SEG", "SR"]) -> tuple[ResultObjectRef, ...]:
        """The objects of one kind."""
        return tuple(o for o in self.objects if o.kind == kind)

    def to_json(self) -> str:
        """Everything but :attr:`key`, as canonical JSON (sorted keys): what a delivery stores
        when its job finishes, and builds every attempt's message from with its own key."""
        data = asdict(self)
        del data["key"]
        data["study_time"] = self.study_time.isoformat() if self.study_time else None
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, *, key: str) -> StudyResult:
        """The result :meth:`to_json` wrote, under ``key``.

        Raises
        ------
        ValueError
            If ``text`` is not such a document, or what it holds does not make a result.
        """
        try:
            data: dict[str, Any] = json.loads(text)
            known = {f.name for f in fields(cls)} - {"key"}
            if not isinstance(data, dict) or set(data) - known:
                raise ValueError(f"unexpected fields {sorted(set(data) - known)}")
            time = data.get("study_time")
            return cls(
                key=key,
                study_instance_uid=data["study_instance_uid"],
                accession_number=data.get("accession_number"),
                patient_id=data.get("patient_id"),
                study_time=datetime.fromisoformat(time) if time else None,
                models=tuple(ModelRun(**m) for m in data.get("models", ())),
                findings=tuple(Finding(**f) for f in data.get("findings", ())),
                priority=bool(data.get("priority", False)),
                priority_reasons=tuple(data.get("priority_reasons", ())),
                objects=tuple(ResultObjectRef(**o) for o in data.get("objects", ())),
                link=data.get("link"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a stored study result: {exc!r}") from exc
