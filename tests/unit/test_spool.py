"""The spool: atomic, durable writes below validated paths, and cleanup of what a crash left."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacsai.errors import InvalidInstanceError, ReceiveError, StorageFullError
from pacsai.scp import spool as spool_module
from pacsai.scp.spool import Spool
from pacsai.scp.uids import validate_uid


def _files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def _relative(spool: Spool) -> str:
    return spool.new_path(generate_uid(), generate_uid(), generate_uid())


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_bytes=0)


def test_the_spool_creates_its_directories(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "b" / "spool", min_free_bytes=0)

    assert spool.root == (tmp_path / "a" / "b" / "spool").resolve()
    assert (spool.root / ".incoming").is_dir()
    assert _files(spool.root) == []


def test_a_spool_that_cannot_be_created_is_a_receive_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")

    with pytest.raises(ReceiveError, match=r"storage\.spool_dir"):
        Spool(blocker / "spool", min_free_bytes=0)


def test_write_puts_exactly_the_chunks_in_the_final_file(spool: Spool) -> None:
    chunks = (b"\x00" * 128 + b"DICM", b"meta" * 100, os.urandom(200_000), b"")
    relative = _relative(spool)

    size = spool.write(relative, chunks)

    final = spool.absolute(relative)
    assert size == sum(len(chunk) for chunk in chunks)
    assert final.read_bytes() == b"".join(chunks)
    assert _files(spool.root) == [final]  # no .part left in .incoming or anywhere else
    assert list((spool.root / ".incoming").iterdir()) == []


def test_write_replaces_an_existing_file_whole(spool: Spool) -> None:
    relative = _relative(spool)
    spool.write(relative, (b"first version, longer than the second",))

    spool.write(relative, (b"second",))

    assert spool.absolute(relative).read_bytes() == b"second"
    assert _files(spool.root) == [spool.absolute(relative)]


def test_new_path_is_study_series_instance_below_the_root(spool: Spool) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()

    relative = spool.new_path(study, series, sop)

    assert re.fullmatch(rf"{study}/{series}/{sop}\.[0-9a-f]{{16}}\.dcm", relative)
    assert Path(relative).parts[:2] == (study, series)
    assert not Path(relative).is_absolute()
    resolved = spool.absolute(relative).resolve()
    assert resolved.is_relative_to(spool.root)


def test_every_version_of_an_instance_gets_its_own_file_name(spool: Spool) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()

    names = {spool.new_path(study, series, sop) for _ in range(1000)}

    assert len(names) == 1000


def test_new_path_parts_are_validated_uids(spool: Spool) -> None:
    # The receive path validates every UID before it builds a path with it; a UID that
    # would leave the spool never gets that far.
    for hostile in ("..", "../../etc", "/etc", "1.2/../../..", "1.2.3\\..\\x"):
        with pytest.raises(InvalidInstanceError):
            spool.new_path(
                validate_uid("1.2.3", "Study"),
                validate_uid(hostile, "Series"),
                validate_uid("1.2.4", "SOP"),
            )

    relative = spool.new_path(
        validate_uid("1.2.3\x00", "Study"),
        validate_uid("1.2.3.4 ", "Series"),
        validate_uid("1.2.3.4.5", "SOP"),
    )
    study, series, name = Path(relative).parts
    assert (study, series) == ("1.2.3", "1.2.3.4")
    assert re.fullmatch(r"1\.2\.3\.4\.5\.[0-9a-f]{16}\.dcm", name)
    for part in (study, series, name.removesuffix(".dcm")):
        assert set(part) <= set("0123456789abcdef.")


def test_check_space_raises_storage_full_below_the_minimum(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "spool", min_free_bytes=0)
    free = probe.free_bytes()
    assert free > 0

    probe.check_space(0)
    with pytest.raises(StorageFullError, match=r"storage\.min_free_mb") as caught:
        probe.check_space(free + 2**20)
    assert str(probe.root) in str(caught.value)

    greedy = Spool(tmp_path / "spool", min_free_bytes=free + 2**30)
    with pytest.raises(StorageFullError):
        greedy.check_space(0)
    assert isinstance(caught.value, ReceiveError)


def test_write_below_the_minimum_leaves_nothing(tmp_path: Path) -> None:
    probe = Spool(tmp_path / "spool", min_free_bytes=0)
    greedy = Spool(tmp_path / "spool", min_free_bytes=probe.free_bytes() + 2**30)
    relative = _relative(greedy)

    with pytest.raises(StorageFullError):
        greedy.write(relative, (b"data",))

    assert _files(greedy.root) == []
    assert not greedy.absolute(relative).parent.exists()


def _failing_write(monkeypatch: pytest.MonkeyPatch, error: int, *, after: int) -> None:
    """Make the spool's os.write write `after` bytes, then fail with `error`."""
    real_write = os.write
    written = 0

    def write(fd: int, data: bytes | memoryview) -> int:
        nonlocal written
        if written >= after:
            raise OSError(error, os.strerror(error))
        count = real_write(fd, bytes(data[: after - written]))
        written += count
        return count

    monkeypatch.setattr(spool_module.os, "write", write)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_during_write_is_storage_full_and_leaves_no_partial_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    _failing_write(monkeypatch, error, after=1000)
    relative = _relative(spool)

    with pytest.raises(StorageFullError, match="full") as caught:
        spool.write(relative, (b"m" * 500, b"d" * 5000))

    assert isinstance(caught.value.__cause__, OSError)
    assert _files(spool.root) == []


def test_another_os_error_is_a_receive_error_and_leaves_no_partial_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_write(monkeypatch, errno.EIO, after=10)
    relative = _relative(spool)

    with pytest.raises(ReceiveError) as caught:
        spool.write(relative, (b"d" * 5000,))

    assert not isinstance(caught.value, StorageFullError)
    assert _files(spool.root) == []


def test_a_failing_fsync_leaves_no_partial_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    relative = _relative(spool)

    with pytest.raises(StorageFullError):
        spool.write(relative, (b"d" * 5000,))

    monkeypatch.undo()
    assert _files(spool.root) == []


def test_a_failed_write_keeps_the_previous_version(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    relative = _relative(spool)
    spool.write(relative, (b"acknowledged bytes",))
    _failing_write(monkeypatch, errno.ENOSPC, after=3)

    with pytest.raises(StorageFullError):
        spool.write(relative, (b"new bytes that do not fit",))

    assert spool.absolute(relative).read_bytes() == b"acknowledged bytes"
    assert _files(spool.root) == [spool.absolute(relative)]


def test_clean_incoming_removes_only_this_nodes_leftover_part_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0, node_id="node-a")
    incoming = spool.root / ".incoming"
    mine = ["node-a+1f.part", "node-a+2e.part"]
    # another node's in-flight writes on a shared spool, one whose id begins like ours, and a
    # name from before temporary files carried the node: the sweep removes those once old
    others = ["node-b+3d.part", "node-a.2+4c.part", "0123abcd.part"]
    for name in mine + others:
        (incoming / name).write_bytes(b"partial")
    kept = spool.absolute(_relative(spool))
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"an acknowledged file")

    assert spool.clean_incoming() == 2

    assert sorted(path.name for path in incoming.iterdir()) == sorted(others)
    assert kept.read_bytes() == b"an acknowledged file"
    assert spool.clean_incoming() == 0


def test_temporary_files_carry_the_node_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0, node_id="node-a")
    seen: list[str] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        seen.append(Path(path).name)
        return real_open(path, flags, mode)

    monkeypatch.setattr(spool_module.os, "open", recording_open)
    spool.write(_relative(spool), (b"x",))

    assert (
        [name for name in seen if name.endswith(".part")]
        == [name for name in seen if re.fullmatch(r"node-a\+[0-9a-f]{32}\.part", name)]
        != []
    )


def test_a_new_spool_on_an_old_directory_keeps_it(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool", min_free_bytes=0)
    relative = _relative(first)
    first.write(relative, (b"x",))

    second = Spool(tmp_path / "spool", min_free_bytes=0)

    assert second.absolute(relative).read_bytes() == b"x"


def test_remove_deletes_and_tolerates_a_missing_file(spool: Spool) -> None:
    relative = _relative(spool)
    spool.write(relative, (b"x",))

    spool.remove(relative)
    spool.remove(relative)

    assert not spool.absolute(relative).exists()


class _Keeper:
    """A space keeper that records what it is asked and can "free" space by lowering the
    spool's minimum (what removing a study does to the free space the spool sees)."""

    def __init__(self, spool: Spool, *, frees: bool) -> None:
        self.spool = spool
        self.frees = frees
        self.lows = 0
        self.reclaims: list[int] = []

    def low(self) -> None:
        self.lows += 1

    def reclaim(self, needed_bytes: int) -> bool:
        self.reclaims.append(needed_bytes)
        if self.frees:
            self.spool.min_free_bytes = 0
        return self.frees


def _greedy(tmp_path: Path) -> Spool:
    free = Spool(tmp_path / "spool", min_free_bytes=0).free_bytes()
    return Spool(tmp_path / "spool", min_free_bytes=free + 2**30, high_water_bytes=free + 2**31)


def test_the_space_keeper_is_asked_before_a_write_is_refused(tmp_path: Path) -> None:
    spool = _greedy(tmp_path)
    keeper = _Keeper(spool, frees=True)
    spool.space_keeper = keeper
    relative = _relative(spool)

    assert spool.write(relative, (b"data",)) == 4

    assert keeper.reclaims == [4] and keeper.lows == 1
    assert spool.absolute(relative).read_bytes() == b"data"


def test_a_write_is_refused_when_the_keeper_finds_nothing_to_remove(tmp_path: Path) -> None:
    spool = _greedy(tmp_path)
    keeper = _Keeper(spool, frees=False)
    spool.space_keeper = keeper

    with pytest.raises(StorageFullError, match=r"storage\.min_free_mb"):
        spool.write(_relative(spool), (b"data",))

    assert keeper.reclaims == [4]
    assert _files(spool.root) == []


def test_below_the_high_water_mark_the_keeper_is_told_and_the_write_goes_on(
    tmp_path: Path,
) -> None:
    free = Spool(tmp_path / "spool", min_free_bytes=0).free_bytes()
    spool = Spool(tmp_path / "spool", min_free_bytes=0, high_water_bytes=free + 2**30)
    keeper = _Keeper(spool, frees=False)
    spool.space_keeper = keeper

    spool.write(_relative(spool), (b"data",))

    assert (keeper.lows, keeper.reclaims) == (1, [])


@pytest.mark.parametrize("frees", [True, False])
def test_a_disk_that_fills_during_a_write_is_tried_once_more_after_a_removal(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, frees: bool
) -> None:
    keeper = _Keeper(spool, frees=frees)
    spool.space_keeper = keeper
    real_write = os.write
    failures = []

    def write(fd: int, data: bytes | memoryview) -> int:
        if not failures:
            failures.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(spool_module.os, "write", write)
    relative = _relative(spool)

    if frees:
        assert spool.write(relative, (b"data",)) == 4
        assert _files(spool.root) == [spool.absolute(relative)]
    else:
        with pytest.raises(StorageFullError, match="full"):
            spool.write(relative, (b"data",))
        assert _files(spool.root) == []
    assert keeper.reclaims == [4]


def test_a_series_directory_removed_by_a_purge_meanwhile_is_made_again(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    relative = _relative(spool)
    directory = spool.absolute(relative).parent
    real_make = Spool._make_parents
    calls = []

    def make_then_lose(self: Spool, target: Path) -> None:
        real_make(self, target)
        calls.append(target)
        if len(calls) == 1:
            target.rmdir()  # a purge removed it as empty between mkdir and rename

    monkeypatch.setattr(Spool, "_make_parents", make_then_lose)

    assert spool.write(relative, (b"data",)) == 4

    assert calls == [directory, directory]
    assert spool.absolute(relative).read_bytes() == b"data"


def _counting_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what each fsync is for: "dir" or "file" (the spool's own os.fsync calls)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    return synced


def test_a_deferred_write_is_made_durable_later_one_directory_fsync_for_many_files(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver's path: written with its writeback started, made durable before the commit
    of its group, with one fsync per file and one per directory."""
    study, series = generate_uid(), generate_uid()
    relatives = [spool.new_path(study, series, generate_uid()) for _ in range(3)]
    for relative in relatives:
        spool.write(relative, (b"m" * 200, b"d" * 70_000), durable=False)  # its directory is new
    synced = _counting_fsyncs(monkeypatch)
    assert all(spool.absolute(r).read_bytes() == b"m" * 200 + b"d" * 70_000 for r in relatives)
    assert synced == []

    spool.make_durable(relatives)

    assert synced == ["file", "file", "file", "dir"]


@pytest.mark.parametrize(
    ("error", "raised"),
    [(errno.ENOSPC, StorageFullError), (errno.EIO, ReceiveError)],
)
def test_a_file_that_cannot_be_made_durable_is_an_error_saying_so(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, error: int, raised: type[Exception]
) -> None:
    relative = _relative(spool)
    spool.write(relative, (b"d" * 5000,), durable=False)

    def fsync(fd: int) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    with pytest.raises(raised) as caught:
        spool.make_durable([relative])
    assert isinstance(caught.value.__cause__, OSError)
