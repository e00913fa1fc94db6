"""The study result value the RIS and alert senders take, and the destination kinds beside DICOM
in the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsai.config import (
    Destination,
    EmailDestination,
    FhirDestination,
    Hl7Destination,
    WebhookDestination,
    load_settings,
)
from pacsai.errors import ConfigError
from pacsai.reporting.alerts import Alert
from pacsai.reporting.study_result import Finding, ModelRun, ResultObjectRef, StudyResult
from tests.study_results import make_study_result


def test_a_finding_has_a_volume_or_a_probability() -> None:
    with pytest.raises(ValueError, match="volume_ml or probability"):
        Finding("liver", present=True, model="m")
    with pytest.raises(ValueError, match="volume_ml or probability"):
        Finding("liver", present=True, model="m", volume_ml=1.0, probability=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Finding("nodule", present=True, model="m", probability=1.5)
    with pytest.raises(ValueError, match="finite"):
        Finding("liver", present=True, model="m", volume_ml=float("nan"))


def test_a_study_result_is_checked_when_made() -> None:
    with pytest.raises(ValueError, match="key"):
        make_study_result(key="has spaces")
    with pytest.raises(ValueError, match="not a UID"):
        make_study_result(study_instance_uid="1.2.03")
    with pytest.raises(ValueError, match="models that did not run"):
        make_study_result(models=(ModelRun("other", "1"),))
    with pytest.raises(ValueError, match="not priority"):
        make_study_result(priority=False)
    with pytest.raises(ValueError, match="not a UID"):
        ResultObjectRef("SEG", "1.2.x", "1.2.3")
    with pytest.raises(ValueError, match="http"):
        make_study_result(link="javascript:alert(1)")


def test_an_alert_carries_only_present_findings_and_no_identifiers() -> None:
    alert = Alert.of(make_study_result())
    assert [f.label for f in alert.findings] == ["liver"]
    assert not hasattr(alert, "patient_id")
    with pytest.raises(ValueError, match="not priority"):
        Alert.of(make_study_result(priority=False, priority_reasons=()))


def test_destination_kinds(tmp_path: Path) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(
        """
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  stow: {kind: dicom, stow_url: "http://127.0.0.1:8042/dicom-web"}
  ris: {kind: hl7, host: ris.example, port: 2575, receiving_application: RIS}
  fhir: {kind: fhir, base_url: "https://fhir.example/r4"}
  teams: {kind: webhook, url: "https://hooks.example/x", format: teams}
  oncall: {kind: email, host: smtp.example, from_address: pacsai@h.example, to: [a@h.example]}
""",
        encoding="utf-8",
    )
    settings = load_settings(config)
    kinds = {name: type(d) for name, d in settings.destinations.items()}
    assert kinds == {
        "pacs": Destination,
        "stow": Destination,
        "ris": Hl7Destination,
        "fhir": FhirDestination,
        "teams": WebhookDestination,
        "oncall": EmailDestination,
    }
    assert set(settings.dicom_destinations) == {"pacs", "stow"}


def test_secrets_come_from_the_environment_and_survive_a_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(
        "destinations:\n  hook: {kind: webhook, url: 'https://hooks.example/x'}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("PACSAI_DESTINATIONS__HOOK__SECRET", "from-the-environment")
    settings = load_settings(config)
    hook = settings.destinations["hook"]
    assert isinstance(hook, WebhookDestination) and hook.secret is not None
    assert hook.secret.get_secret_value() == "from-the-environment"
    assert "from-the-environment" not in repr(settings)
    # A child process gets the settings as a JSON dump: the secret must still be there.
    dumped = settings.model_dump(mode="json")
    assert dumped["destinations"]["hook"]["secret"] == "from-the-environment"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{kind: ftp, host: x}", "kind must be one of dicom"),
        ("{kind: hl7, host: ris}", "port"),
        ("{kind: fhir, base_url: 'ftp://x'}", "http"),
        ("{kind: email, host: m, from_address: a@b, to: []}", "to"),
        ("{kind: email, host: m, from_address: a@b, to: [c@d], username: u}", "both username"),
        (
            "{kind: email, host: m, from_address: a@b, to: [c@d], username: u, password: p, "
            "starttls: false}",
            "STARTTLS",
        ),
    ],
)
def test_bad_destinations_are_named(tmp_path: Path, entry: str, message: str) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(f"destinations:\n  bad: {entry}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_routes_send_results_to_every_kind_and_alerts_need_a_priority_rule(
    tmp_path: Path,
) -> None:
    config = tmp_path / "pacsai.yaml"
    destinations = """
destinations:
  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  ris: {kind: hl7, host: ris.example, port: 2575}
  fhir: {kind: fhir, base_url: "https://fhir.example/r4"}
  oncall: {kind: email, host: smtp.example, from_address: pacsai@h.example, to: [a@h.example]}
"""
    config.write_text(
        destinations
        + """
routes:
  - name: ct
    model: ct_abdomen_demo
    send_to: [pacs, ris, fhir, oncall]
    priority: [{finding: liver, min_volume_ml: 1000}]
""",
        encoding="utf-8",
    )
    settings = load_settings(config)
    assert [settings.kind_of(n) for n in ("pacs", "ris", "fhir", "oncall")] == [
        "dicom",
        "hl7",
        "fhir",
        "email",
    ]
    config.write_text(
        destinations + "routes:\n  - {name: ct, model: m, send_to: [ris, oncall]}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"oncall, which only get alerts.*no priority: rule"):
        load_settings(config)


@pytest.mark.parametrize(
    ("url", "expected"),
    [("https://pacsai.example.org/", "https://pacsai.example.org"), ("ftp://x", None)],
)
def test_public_url_is_an_http_url(tmp_path: Path, url: str, expected: str | None) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text(f"api: {{public_url: '{url}'}}\n", encoding="utf-8")
    if expected is None:
        with pytest.raises(ConfigError, match="public_url"):
            load_settings(config)
    else:
        assert load_settings(config).api.public_url == expected


def test_a_stored_study_result_reads_back_under_a_key() -> None:
    result = make_study_result()
    stored = result.to_json()
    assert "J42-R1" not in stored  # the key is each delivery's own
    assert StudyResult.from_json(stored, key=result.key) == result
    assert StudyResult.from_json(stored, key="D7-0a1b2c3d").key == "D7-0a1b2c3d"
    with pytest.raises(ValueError, match="not a stored study result"):
        StudyResult.from_json('{"findings": []}', key="D1")
    with pytest.raises(ValueError, match="unexpected fields"):
        StudyResult.from_json('{"patient_name": "X"}', key="D1")
