"""Drop-folder entries that are not regular files: moved to failed_dir as what they are, never opened.

A symbolic link is the attack: one pointing at a secret outside the folder must be moved as a link and
its target never read. Two proofs: a secret file's content appears nowhere, and a FIFO outside the folder
whose writer waits for a reader never gets one (opening the link's target would give it one).
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import structlog
from test_file_drop import equipment, report, running

from agent.model import StatusFact
from fs import tmpfs

SECRET = b"root:$6$tHiSiSaSeCrEtHaSh:19000:0:99999:7:::\n"


class Tripwire:
    """A FIFO whose writer end waits in a thread: its open returns only when someone opens it to read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._wait, name="tripwire", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens the FIFO
        self.opened.set()
        os.close(fd)

    def close(self) -> bool:
        """Whether anyone opened it to read; then release the writer."""
        tripped = self.opened.is_set()
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.thread.join(timeout=10)
        os.close(fd)
        return tripped


def all_bytes_under(root: Path) -> bytes:
    """The content of every regular file under `root`, links not followed."""
    out = b""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if stat.S_ISREG(os.lstat(p).st_mode):
                out += p.read_bytes()
    return out


async def test_links_fifos_sockets_devices_and_directories_are_failed_unread(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_bytes(SECRET)
    tripwire = Tripwire(outside / "pipe")
    eq = equipment(tmp_path)
    drop = tmp_path / "drop"
    (drop / ".processing").mkdir(parents=True)
    try:
        os.symlink(secret, drop / "shadow.csv")
        os.symlink(outside / "pipe", drop / "pipe.json")
        os.mkfifo(drop / "fifo.csv")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(drop / "sock.csv"))
        sock.close()
        os.mknod(drop / "null.csv", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # as /dev/null
        (drop / "folder.csv").mkdir()
        (drop / "folder.csv" / "inner.csv").write_bytes(report("JOB-INNER"))
        # A link found in .processing/ (swapped in after a look, or put there by hand) is no different.
        os.symlink(secret, drop / ".processing" / "claimed.csv")
        async with running(eq, tmp_path) as run:
            (drop / "good.csv").write_bytes(report())
            kinds = {
                "shadow.csv": "a symbolic link to " + repr(str(secret)),
                "pipe.json": "a symbolic link to " + repr(str(outside / "pipe")),
                "claimed.csv": "a symbolic link to " + repr(str(secret)),
                "fifo.csv": "a FIFO",
                "sock.csv": "a socket",
                "null.csv": "a character device",
                "folder.csv": "a directory",
            }
            expected = sorted([*kinds, *(f"{n}.error.txt" for n in kinds)])
            await run.wait(lambda: run.names(run.failed) == expected, "every odd entry in failed_dir")
            await run.wait(lambda: run.names(run.processed) == ["good.csv"], "the good one processed")
            assert [r.result["process_id"] for r, _ in run.daemon.results] == ["JOB-000101"]
            for name, kind in kinds.items():
                reason = (run.failed / f"{name}.error.txt").read_text()
                assert reason.startswith(f"{name}: {kind}"), reason
                assert "not a regular file" in reason
            # Each moved as what it is.
            assert os.readlink(run.failed / "shadow.csv") == str(secret)
            assert os.readlink(run.failed / "claimed.csv") == str(secret)
            assert os.readlink(run.failed / "pipe.json") == str(outside / "pipe")
            assert stat.S_ISFIFO(os.lstat(run.failed / "fifo.csv").st_mode)
            assert stat.S_ISSOCK(os.lstat(run.failed / "sock.csv").st_mode)
            assert stat.S_ISCHR(os.lstat(run.failed / "null.csv").st_mode)
            assert (run.failed / "folder.csv" / "inner.csv").read_bytes() == report("JOB-INNER")
            assert run.names(run.directory) == [".processing"] and run.names(run.processing) == []
            assert all(s.status == "idle" for s in run.daemon.of_kind(StatusFact))
    finally:
        tripped = tripwire.close()
    assert not tripped, "the target of pipe.json was opened"
    assert SECRET not in all_bytes_under(tmp_path / "failed") + all_bytes_under(tmp_path / "processed")
    assert secret.read_bytes() == SECRET
    assert SECRET.decode() not in repr([r.result for r, _ in run.daemon.results])


async def test_an_entry_that_cannot_be_moved_is_logged_once_and_left_alone(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "other-fs") as other:
        # A directory cannot be renamed across filesystems, and is never copied (that would read it).
        eq = equipment(tmp_path, failed_dir=str(Path(other) / "failed"), rescan_s=0.2, stable_s=0.1)
        drop = tmp_path / "drop"
        drop.mkdir()
        (drop / "stuck.csv").mkdir()
        (drop / "stuck.csv" / "inner.csv").write_bytes(report("JOB-INNER"))
        with structlog.testing.capture_logs() as logs:
            async with running(eq, tmp_path) as run:
                # Reports keep flowing past it, across several rescans.
                for i in range(3):
                    (drop / f"r{i}.csv").write_bytes(report(f"JOB-{i}"))
                    await run.wait(lambda i=i: f"r{i}.csv" in run.names(run.processed), f"r{i}.csv processed")
                left = [e for e in logs if e["event"] == "entry_left_alone"]
                assert len(left) == 1, left
                assert "a directory" in left[0]["reason"] and "stuck.csv" in left[0]["path"]
                assert (drop / "stuck.csv" / "inner.csv").exists()
                assert [r.result["process_id"] for r, _ in run.daemon.results] == ["JOB-0", "JOB-1", "JOB-2"]
                # Changed, it is looked at again (once).
                (drop / "stuck.csv" / "more.csv").write_bytes(b"x")
                await run.wait(lambda: len([e for e in logs if e["event"] == "entry_left_alone"]) == 2, "a second look")
