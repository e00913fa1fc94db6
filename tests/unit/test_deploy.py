"""deploy/: the compose file against the Compose Specification's JSON schema, the systemd units
with `systemd-analyze verify`, and every pacsai command they run against the CLI itself (no
container engine runs on the test machines)."""

from __future__ import annotations

import getpass
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from pacsai.cli import main
from pacsai.config import load_settings
from tests.support import REPO

DEPLOY = REPO / "deploy"
PACSAI_SERVICES = {"migrate", "receiver", "api", "worker"}


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft201909Validator(schema).iter_errors(_compose())
    ]
    assert errors == []


def test_the_schema_check_catches_a_misspelt_key() -> None:
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    broken = _compose()
    broken["services"]["worker"]["deploy"]["resources"]["reservation"] = {}
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(broken))


def test_compose_runs_every_role_beside_postgresql_rabbitmq_and_orthanc() -> None:
    services = _compose()["services"]
    assert {"postgres", "rabbitmq", "orthanc"} | PACSAI_SERVICES <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("receiver", "worker"):  # the spool every role reads
        assert "spool:/srv/pacsai/spool" in services[name]["volumes"]
    assert services["worker"]["build"]["target"] == "gpu"
    assert services["migrate"]["build"]["target"] == "slim"


def _run_cli_help(args: list[str]) -> None:
    """The command and its options exist: click parses them (`--help` stops before running)."""
    options = [a for a in args if a.startswith("--")]
    first = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    command = args[:first]  # `db upgrade`, `serve`, ...
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output, f"pacsai {' '.join(command)} has no {option}"


def test_compose_commands_are_pacsai_commands() -> None:
    services = _compose()["services"]
    for name in PACSAI_SERVICES:
        _run_cli_help(services[name]["command"])


def test_the_shared_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSAI_NODE__ID", "receiver-1")
    settings = load_settings(DEPLOY / "pacsai.yaml")
    assert settings.queue.backend == "celery" and settings.node.id == "receiver-1"
    assert settings.storage.spool_dir == Path("/srv/pacsai/spool")


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (systemd)")
    pacsai = Path(sys.executable).with_name("pacsai")
    user = getpass.getuser()
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {
        "pacsai.service",
        "pacsai-receiver.service",
        "pacsai-api.service",
        "pacsai-worker@.service",
    }
    paths = []
    for unit in units:
        text = unit.read_text()
        for line in re.findall(r"^ExecStart(?:Pre)?=(.*)$", text, flags=re.M):
            _run_cli_help(shlex.split(line.replace("%i", "0"))[1:])
        # Verified as installed here: this checkout's pacsai, this machine's user.
        text = text.replace("/opt/pacsai/venv/bin/pacsai", str(pacsai))
        text = re.sub(r"^(User|Group)=pacsai$", rf"\1={user}", text, flags=re.M)
        name = unit.name.replace("@.service", "@0.service")
        (tmp_path / unit.name).write_text(text)
        if name != unit.name:
            (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *paths], capture_output=True, text=True, check=False
    )
    if "Failed to connect to bus" in result.stderr or "System has not been booted" in result.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # warnings (a misspelt value) included


def test_install_script_is_the_one_make_install_and_the_images_run() -> None:
    script = DEPLOY / "install.sh"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    assert "deploy/install.sh" in (REPO / "Makefile").read_text()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.count("./deploy/install.sh /opt/pacsai/venv") == 2
    for source in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        assert (REPO / source).exists(), source
    for target in ("slim", "gpu"):
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, flags=re.M)
