"""Settings: the documented defaults, YAML plus environment, and errors that name the bad key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pacsai.config import Settings, load_settings
from pacsai.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PACSAI_ variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("PACSAI_"):
            monkeypatch.delenv(name)


def _write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_match_the_design() -> None:
    settings = load_settings(None)

    assert settings.node.ae_title == "PACSAI"
    assert settings.node.host == "0.0.0.0"
    assert settings.node.port == 11112
    assert settings.node.max_associations == 16
    assert settings.node.study_quiet_seconds == 10
    assert settings.node.allowed_peers == []
    assert settings.node.tls.enabled is False
    assert settings.node.tls.require_client_cert is False
    assert settings.storage.spool_dir == Path("./var/spool")
    assert settings.storage.min_free_mb == 1024
    assert settings.database.url == "sqlite:///./var/pacsai.db"
    assert settings.queue.backend == "local"
    assert settings.queue.broker_url is None
    assert settings.inference.models_dir == Path("./models")
    assert settings.inference.device == "auto"
    assert settings.inference.amp is True
    assert settings.routes is None
    assert settings.destinations == {}
    assert settings.api.host == "127.0.0.1"
    assert settings.api.port == 8080


def test_the_design_example_file_loads(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "pacsai.yaml",
        {
            "node": {
                "ae_title": "PACSAI",
                "port": 11112,
                "allowed_peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
                "tls": {"enabled": False, "cert": None, "key": None, "ca": None},
            },
            "storage": {"spool_dir": "./var/spool", "min_free_mb": 1024},
            "database": {"url": "postgresql+psycopg://user@host/db"},
            "queue": {"backend": "celery", "broker_url": "amqp://guest:guest@127.0.0.1:5672//"},
            "routes": [
                {
                    "name": "ct-abdomen",
                    "when": {"Modality": "CT"},
                    "series": {"min_instances": 10},
                    "model": "ct_abdomen",
                    "outputs": ["seg", "sr"],
                    "send_to": ["pacs"],
                }
            ],
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
        },
    )

    settings = load_settings(config)

    assert settings.node.allowed_peers[0].ae_title == "ORTHANC"
    assert settings.node.allowed_peers[0].host == "127.0.0.1"
    assert settings.queue.backend == "celery"
    assert settings.routes is not None and settings.routes[0].send_to == ["pacs"]
    assert settings.destinations["pacs"].port == 4242


def test_environment_overrides_the_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _write(
        tmp_path / "pacsai.yaml",
        {"node": {"ae_title": "FROMFILE", "port": 4000}, "api": {"port": 9000}},
    )
    monkeypatch.setenv("PACSAI_NODE__PORT", "4001")
    monkeypatch.setenv("PACSAI_STORAGE__MIN_FREE_MB", "5")

    settings = load_settings(config)

    assert settings.node.port == 4001  # the environment wins
    assert settings.node.ae_title == "FROMFILE"  # the rest of the section stays from the file
    assert settings.api.port == 9000
    assert settings.storage.min_free_mb == 5


def test_environment_alone_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSAI_NODE__AE_TITLE", "ENVNODE")
    monkeypatch.setenv("PACSAI_DATABASE__URL", "postgresql+psycopg://u@h/db")

    settings = load_settings(None)

    assert settings.node.ae_title == "ENVNODE"
    assert settings.database.url == "postgresql+psycopg://u@h/db"
    assert settings.node.port == 11112


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"prot": 11112}}, "node.prot"),
        ({"node": {"ae_title": "A\\B"}}, "node.ae_title"),
        ({"node": {"ae_title": "SEVENTEEN_CHARS_X"}}, "node.ae_title"),
        ({"node": {"max_associations": 0}}, "node.max_associations"),
        ({"storage": {"min_free_mb": -1}}, "storage.min_free_mb"),
        ({"database": {"url": "mysql://localhost/db"}}, "database.url"),
        ({"inference": {"device": "tpu"}}, "inference.device"),
        ({"queue": {"backend": "redis"}}, "queue.backend"),
        ({"nodes": {}}, "nodes"),
    ],
)
def test_a_bad_value_or_unknown_key_names_the_key(tmp_path: Path, data: object, key: str) -> None:
    config = _write(tmp_path / "bad.yaml", data)

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    message = str(caught.value)
    assert key in message
    assert str(config) in message


def test_unknown_key_says_it_is_unknown(tmp_path: Path) -> None:
    config = _write(tmp_path / "bad.yaml", {"node": {"prot": 11112}})

    with pytest.raises(ConfigError, match=r"node\.prot: unknown key"):
        load_settings(config)


def test_every_offending_key_is_named(tmp_path: Path) -> None:
    config = _write(tmp_path / "bad.yaml", {"node": {"port": 70000, "prot": 1}, "api": {"pot": 1}})

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    message = str(caught.value)
    assert "node.port" in message and "node.prot" in message and "api.pot" in message


def test_a_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSAI_NODE__PORT", "70000")

    with pytest.raises(ConfigError, match=r"node\.port") as caught:
        load_settings(None)

    assert "environment" in str(caught.value)


def test_bad_yaml_is_a_clear_config_error(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("node:\n  port: [11112\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_settings(config)

    assert str(config) in str(caught.value)
    assert isinstance(caught.value.__cause__, yaml.YAMLError)


@pytest.mark.parametrize("text", ["- node\n- storage\n", "just a string\n", "42\n"])
def test_a_file_that_is_not_a_mapping_is_a_clear_config_error(tmp_path: Path, text: str) -> None:
    config = tmp_path / "list.yaml"
    config.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError, match="must hold a mapping") as caught:
        load_settings(config)

    assert str(config) in str(caught.value)


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("", encoding="utf-8")

    assert load_settings(config) == load_settings(None)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"

    with pytest.raises(ConfigError, match="cannot read configuration file") as caught:
        load_settings(missing)

    assert str(missing) in str(caught.value)


def test_a_route_to_an_unknown_destination_is_refused(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "routes.yaml",
        {
            "routes": [{"name": "ct-abdomen", "model": "ct_abdomen", "send_to": ["pacs", "nope"]}],
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
        },
    )

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    message = str(caught.value)
    assert "ct-abdomen" in message and "nope" in message
    assert "pacs," not in message  # only the unknown one is blamed


def test_a_route_to_a_known_destination_is_accepted() -> None:
    settings = Settings(
        routes=[{"name": "r", "model": "m", "send_to": ["pacs"]}],
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
    )
    assert settings.routes is not None and settings.routes[0].send_to == ["pacs"]


@pytest.mark.parametrize(
    ("tls", "needle"),
    [
        ({"enabled": True}, "tls.cert and tls.key"),
        ({"enabled": True, "cert": "c.pem", "key": "k.pem", "require_client_cert": True}, "tls.ca"),
    ],
)
def test_incomplete_tls_settings_are_refused(tmp_path: Path, tls: object, needle: str) -> None:
    config = _write(tmp_path / "tls.yaml", {"node": {"tls": tls}})

    with pytest.raises(ConfigError, match=needle) as caught:
        load_settings(config)

    assert "node.tls" in str(caught.value)


def test_celery_without_a_broker_is_refused(tmp_path: Path) -> None:
    config = _write(tmp_path / "q.yaml", {"queue": {"backend": "celery"}})

    with pytest.raises(ConfigError, match="broker_url"):
        load_settings(config)


def test_serve_with_a_bad_config_exits_2_and_names_the_key(tmp_path: Path) -> None:
    config = _write(tmp_path / "bad.yaml", {"node": {"prot": 11112}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}

    result = subprocess.run(
        [sys.executable, "-m", "pacsai.cli", "serve", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "node.prot" in result.stderr
    assert "configuration error" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "var").exists()  # refused before anything was created


def test_serve_with_a_bad_port_exits_2_and_names_the_key(tmp_path: Path) -> None:
    config = _write(tmp_path / "bad.yaml", {"node": {"port": 70000}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}

    result = subprocess.run(
        [sys.executable, "-m", "pacsai.cli", "serve", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "node.port" in result.stderr
    assert "70000" in result.stderr


def test_storage_retention_defaults_and_high_water_mark() -> None:
    from pacsai.config import StorageSettings

    storage = StorageSettings()
    assert storage.retention.enabled is True
    assert (storage.retention.instances_days, storage.retention.results_days) == (7.0, 30.0)
    assert storage.retention.failed_hold_days == 14.0
    assert storage.high_water_bytes == 2048 * 2**20  # twice min_free_mb (1024)
    assert StorageSettings(min_free_mb=0).high_water_bytes == 1024 * 2**20
    assert StorageSettings(min_free_mb=4096).high_water_bytes == 8192 * 2**20
    assert StorageSettings(high_water_mb=0).high_water_bytes == 0  # never for space
    assert StorageSettings(retention={"instances_days": None}).retention.instances_days is None


def test_a_high_water_mark_at_or_below_the_minimum_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pacsai.yaml"
    config.write_text("storage:\n  min_free_mb: 1024\n  high_water_mb: 512\n")
    with pytest.raises(ConfigError, match=r"high_water_mb .*must be above min_free_mb"):
        load_settings(config)
    config.write_text("storage:\n  retention:\n    instances_days: 0\n")
    with pytest.raises(ConfigError, match=r"storage\.retention\.instances_days"):
        load_settings(config)
