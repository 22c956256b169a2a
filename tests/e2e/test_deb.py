"""The .deb: built by packaging/build-deb.sh, installed into a throwaway root with dpkg, its `edge-agent
version` runs; the config is a conffile, no secret is created, the shipped wheels install offline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import __version__
from peers import ROOT, require_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_tool("dpkg-deb")
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        ["bash", str(ROOT / "packaging" / "build-deb.sh"), str(out)],
        env={**os.environ, "DEB_COMPRESS": "gzip"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    path = Path(build.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name.startswith(f"edge-agent_{__version__}_")
    yield path


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dpkg", f"--root={root}", "--force-depends", "--force-script-chrootless", "--force-not-root", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def throwaway_root(tmp: Path) -> Path:
    root = tmp / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    return root


def test_the_deb_installs_into_a_throwaway_root_and_runs(deb: Path, tmp_path: Path) -> None:
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: edge-agent" in info and "python3." in info
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"conffiles" in conffiles
    root = throwaway_root(tmp_path)
    out = dpkg(root, "-i", str(deb))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "var/lib/dpkg/info/edge-agent.conffiles").read_text().split() == ["/etc/edge-agent/agent.toml"]
    version = subprocess.run(
        [str(root / "opt/edge-agent/venv/bin/edge-agent"), "version"], capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0 and version.stdout.strip() == f"edge-agent {__version__}", version.stderr
    assert (root / "lib/systemd/system/edge-agent.service").read_text().count("DeviceAllow=") >= 7
    assert os.readlink(root / "usr/bin/edge-agent") == "/opt/edge-agent/venv/bin/edge-agent"
    creds = root / "etc/edge-agent/credentials"
    assert creds.is_dir() and oct(creds.stat().st_mode & 0o777) == "0o700" and not any(creds.iterdir())
    assert (root / "etc/systemd/system/edge-agent.service.d/credentials.conf").exists()
    # nothing of the build machine's staging path is left in the venv's scripts and config
    for f in [*(root / "opt/edge-agent/venv/bin").iterdir(), root / "opt/edge-agent/venv/pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            text = f.read_bytes()
            assert b"/root/opt/edge-agent" not in text and b"/tmp/tmp" not in text, f
    # remove keeps the edited config (a conffile); purge takes it
    (root / "etc/edge-agent/agent.toml").write_text((root / "etc/edge-agent/agent.toml").read_text() + "# edited\n")
    assert dpkg(root, "-r", "edge-agent").returncode == 0
    assert not (root / "opt/edge-agent/venv").exists()
    assert "# edited" in (root / "etc/edge-agent/agent.toml").read_text()
    assert not (root / "etc/systemd/system/edge-agent.service.d").exists()
    assert dpkg(root, "-P", "edge-agent").returncode == 0
    assert not (root / "etc/edge-agent/agent.toml").exists()


def test_the_shipped_wheels_install_offline(deb: Path, tmp_path: Path) -> None:
    """The offline route for other distros: the wheelhouse in the package is complete."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "x")], check=True, timeout=300)
    wheels = tmp_path / "x/opt/edge-agent/wheels"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, no extra find-links from the machine's pip config
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin/python"),
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheels),
            "edge-agent",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    out = subprocess.run([str(venv / "bin/edge-agent"), "--version"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"edge-agent {__version__}", out.stderr
