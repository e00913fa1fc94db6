"""`pacsai demo` as people run it: a real process, a PACS stand-in, phantoms there and back."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pacsai.demo.orthanc import Orthanc
from pacsai.demo.preview import encode_png
from tests.support import REPO, wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 300  # seconds for a whole demo run on a busy CPU


def _command(tmp_path: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pacsai.cli",
        "demo",
        "--models",
        str(REPO / "models"),
        "--device",
        "cpu",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--seed",
        "3",
        "--timeout",
        str(TIMEOUT - 60),
        *options,
    ]


def _environment() -> dict[str, str]:
    """No PACSAI_ variable of the developer's shell; wide tables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSAI_")}
    env["COLUMNS"] = "200"
    return env


def _demo(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(tmp_path, *options),
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, after checking its signature and IHDR chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29]) & 0xFFFFFFFF
    width, height = struct.unpack(">II", data[16:24])
    assert data[24:26] == b"\x08\x02"  # 8 bits, RGB
    return int(width), int(height)


def test_png_encoder_writes_what_a_decoder_reads_back() -> None:
    import numpy as np

    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert _png_size_of(data) == (7, 5)
    (length,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41 : 41 + length])
    scanlines = np.frombuffer(raw, np.uint8).reshape(5, 1 + 7 * 3)
    assert not scanlines[:, 0].any()  # filter type 0 on every line
    assert np.array_equal(scanlines[:, 1:].reshape(5, 7, 3), rgb)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(rgb.astype(np.uint16))


def _png_size_of(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_demo_with_the_local_pacs_brings_the_cr_report_back(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--pacs", "local", "--modalities", "cr")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local storage SCP" in result.stdout
    table = result.stdout[result.stdout.index("results back in") :]
    assert re.search(r"CR phantom .*cxr_findings_demo .*p=\d\.\d\d .*SR ", table), table
    assert "missing" not in result.stdout
    report = json.loads((tmp_path / "out" / "demo-report.json").read_text())
    assert report["ok"] is True
    (study,) = report["studies"]
    assert study["modality"] == "CR"
    assert study["back"] == ["SR"]
    assert set(re.findall(r"(\w+) p=", " ".join(study["findings"]))) == {"nodule", "effusion"}
    assert study["seconds"] > 0
    assert study["previews"] == []  # a classification has no SEG to preview
    stored = list((tmp_path / "work" / "pacs").rglob("*.dcm"))
    assert len(stored) == 1  # the SR, in the local PACS


def test_demo_fails_with_what_is_missing_when_no_bundle_fits(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    command = _command(tmp_path, "--pacs", "local", "--modalities", "cr")
    command[command.index(str(REPO / "models"))] = str(empty)
    result = subprocess.run(
        command, cwd=tmp_path, env=_environment(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "no usable model bundle for CR" in result.stderr


@pytest.mark.orthanc
def test_demo_with_orthanc_writes_png_previews_of_the_ct_seg(tmp_path: Path) -> None:
    if not Orthanc.is_installed():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    result = _demo(tmp_path, "--pacs", "orthanc", "--modalities", "ct")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PACS: Orthanc" in result.stdout
    table = result.stdout[result.stdout.index("results back in") :]
    assert re.search(r"CT phantom .*ct_abdomen_demo .* ml .*SEG, SR ", table), table
    report = json.loads((tmp_path / "out" / "demo-report.json").read_text())
    (study,) = report["studies"]
    assert study["back"] == ["SEG", "SR"]
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [path.name for path in pngs] == sorted(study["previews"])
    assert 1 <= len(pngs) <= 3
    for path in pngs:
        assert str(path) in result.stdout.replace("\n", "")
        width, height = _png_size(path)
        # the source slice and its overlay side by side, enlarged to at least 320 pixels
        assert height >= 320 and width > 2 * height - 10, (width, height)


@pytest.mark.orthanc
def test_ctrl_c_stops_the_demo_and_its_orthanc(tmp_path: Path) -> None:
    if not Orthanc.is_installed():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    process = subprocess.Popen(
        _command(tmp_path, "--pacs", "orthanc", "--modalities", "ct"),
        cwd=tmp_path,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []

        def pushed() -> bool:
            line = process.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            if not line and process.poll() is not None:
                raise AssertionError("".join(lines))
            return "pushing" in line

        wait_for(pushed, timeout=120, interval=0)
        port = int(re.findall(r"http://127\.0\.0\.1:(\d+)", "".join(lines))[0])
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, "".join(lines) + output
    assert "interrupted" in output
    with socket.socket() as probe:  # Orthanc is gone with it
        assert probe.connect_ex(("127.0.0.1", port)) != 0
