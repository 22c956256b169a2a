"""The status page: served from the package, offline (no outside URL), with the API's read access."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from peers import GUARD_S, Broker, Daemon, free_port, scripted_equipment, write_config


def fetch(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=GUARD_S) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_page_files_are_in_the_package_and_fetch_nothing_from_elsewhere() -> None:
    web = resources.files("agent.web")
    for name in ("index.html", "app.js", "style.css"):
        text = web.joinpath(name).read_text()
        assert not re.search(r"https?://", text), f"{name} refers to an outside URL"
    assert '<script src="/ui/app.js"' in web.joinpath("index.html").read_text()


def test_page_served_by_the_daemon(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path,
        broker.port,
        scripted_equipment("press-1", tmp_path / "press.jsonl"),
        http=f'[http]\nlisten = "127.0.0.1:{port}"\n',
    )
    daemon = Daemon(cfg).start()
    try:
        daemon.wait_log("http_listening")
        status, headers, body = fetch(port, "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert b"/ui/app.js" in body
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            status, headers, body = fetch(port, f"/ui/{name}")
            assert status == 200 and headers["Content-Type"].startswith(kind) and body
        assert fetch(port, "/ui/secret.txt")[0] == 404
        assert fetch(port, "/ui/..%2Fhttp.py")[0] == 404
    finally:
        daemon.stop()
