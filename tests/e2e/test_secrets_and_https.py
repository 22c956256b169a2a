"""Secrets never leave the daemon; MPM over https is verified."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from certs import issue, make_ca
from peers import (
    Broker,
    Daemon,
    MpmPeer,
    OpcUaPeer,
    Recorder,
    free_port,
    require_tool,
    script_line,
    scripted_equipment,
    wait_until,
    write_config,
)

R = "edge/test-site/cell-t"
SECRETS = {
    "mqtt": "mqtt-Pa55-aZ91xq",
    "mpm": "mpm-K3y-77fgQWpl",
    "viewer": "api-viewer-Zq81Lm",
    "operator": "api-operator-Rt55Hc",
    "admin": "api-admin-Pp02Vn",
    "opcua": "opcua-Pw-9kK2sd",
}


def http_get(url: str, key: str | None = None, method: str = "GET", body: bytes | None = None) -> str:
    req = urllib.request.Request(url, method=method, data=body)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.read().decode()


def test_no_secret_in_anything_the_daemon_writes_or_answers(tmp_path: Path) -> None:
    passwd = require_tool("mosquitto_passwd")
    pwfile = tmp_path / "mosquitto.passwd"
    pwfile.touch()
    subprocess.run([passwd, "-b", str(pwfile), "edge", SECRETS["mqtt"]], check=True, capture_output=True)
    subprocess.run([passwd, "-b", str(pwfile), "watcher", "watcher-pw"], check=True, capture_output=True)
    pwfile.chmod(0o644)
    broker = Broker(tmp_path / "broker", extra_conf=f"password_file {pwfile}\n", anonymous=False)
    broker.start()
    mpm = MpmPeer(api_key=SECRETS["mpm"])
    opc = OpcUaPeer(users={"operator": SECRETS["opcua"]})
    for name in ("mpm", "viewer", "operator", "admin"):
        (tmp_path / f"{name}.key").write_text(SECRETS[name] + "\n")
    port = free_port()
    script = tmp_path / "press.jsonl"
    keys = "".join(
        f'[[http.api_keys]]\nname = "{role}-key"\nkey_file = "{role}.key"\nrole = "{role}"\n'
        for role in ("viewer", "operator", "admin")
    )
    opc_equipment = f"""
[[equipment]]
id = "mill-1"
driver = "opcua"
[equipment.connection]
endpoint = "{opc.server.endpoint}"
username = "operator"
password_env = "EA_TEST_OPCUA_PASSWORD"
[[equipment.tags]]
name = "state"
node = "ns=2;s=Machine.State"
"""
    body = (
        f'[mpm]\nbase_url = "{mpm.base_url}"\nauth = "api_key"\napi_key_file = "mpm.key"\n'
        + scripted_equipment("press-1", script)
        + opc_equipment
    )
    cfg = write_config(
        tmp_path,
        broker.port,
        body,
        mqtt_extra='username = "edge"\npassword_env = "EA_TEST_MQTT_PASSWORD"\n',
        http=f'[http]\nlisten = "127.0.0.1:{port}"\n{keys}',
    )
    cfg.write_text(cfg.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    env = {"EA_TEST_MQTT_PASSWORD": SECRETS["mqtt"], "EA_TEST_OPCUA_PASSWORD": SECRETS["opcua"]}
    rec = Recorder(broker.port, ["#"], username="watcher", password="watcher-pw")
    daemon = Daemon(cfg, env=env).start()
    answers: list[str] = []
    try:
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("mill-1/status") and m.json["status"] != "offline"])
        # MPM: one result delivered, one refused, one through a transient failure
        script_line(script, op="quality", result={"process_id": "PROC-001", "overall_score": 1.0}, key="q1")
        wait_until(lambda: mpm.call(mpm.emu.results), what="result in MPM")
        mpm.call(mpm.emu.fail_next, 2, 503)
        script_line(script, op="quality", result={"process_id": "PROC-002", "overall_score": 0.5}, key="q2")
        mpm.call(mpm.emu.reject_next, 1, 401)
        wait_until(lambda: len(mpm.call(mpm.emu.results)) >= 1)
        script_line(script, tag="state", value=1)
        script_line(script, tag="job", value="PROC-003")
        # every kind of HTTP answer, with right and wrong keys
        base = f"http://127.0.0.1:{port}"
        for path in ("/healthz", "/metrics", "/api/v1/equipment", "/api/v1/equipment/mill-1", "/api/v1/dead-letters"):
            for key in (None, "wrong", *[SECRETS[r] for r in ("viewer", "operator", "admin")]):
                answers.append(http_get(base + path, key))
        cmd = base + "/api/v1/equipment/press-1/commands/set_speed"
        for key in (None, "wrong", SECRETS["viewer"], SECRETS["operator"]):
            answers.append(http_get(cmd, key, "POST", json.dumps({"parameters": {"value": 5}}).encode()))
        answers.append(http_get(cmd, SECRETS["admin"], "POST", b"{broken"))
        wait_until(lambda: len(mpm.call(mpm.emu.results)) >= 1 and rec.select("/quality"))
        # the broker restarted: the MQTT password goes out again
        broker.stop()
        broker.start()
        rec.wait_for(lambda ms: len([m for m in ms if m.topic == f"{R}/state" and m.json["online"]]) >= 2, "rebirth")
        # check-config on a broken copy of the file, with the secrets in place
        broken = tmp_path / "broken.toml"
        broken.write_text(cfg.read_text().replace("keepalive_s = 5", 'keepalive_s = "five"'))
        out = subprocess.run(
            [sys.executable, "-m", "agent", "check-config", "--config", str(broken)],
            env={**daemon.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2
        answers.append(out.stdout + out.stderr)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        mpm.close()
        opc.close()
        broker.stop()
    written = [daemon.log_path.read_bytes()]
    written += [m.topic.encode() + m.payload for m in rec.messages]
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            written.append(path.read_bytes())
    everything = b"\n".join(written) + "\n".join(answers).encode()
    assert len(rec.messages) > 5 and len(answers) > 20
    for name, secret in SECRETS.items():
        assert secret.encode() not in everything, f"the {name} secret leaked"


def test_mpm_over_https_verified(tmp_path: Path, broker: Broker) -> None:
    pki = tmp_path / "pki"
    ca = make_ca(pki, "plant-ca")
    other = make_ca(pki, "other-ca")
    server = issue(ca, pki, "mpm-server")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server.cert, server.key)
    mpm = MpmPeer(ssl_context=ctx)
    try:
        assert mpm.base_url.startswith("https://")
        for name, ca_file, delivered in (("right-ca", ca.path, True), ("wrong-ca", other.path, False)):
            folder = tmp_path / name
            folder.mkdir()
            script = folder / "s.jsonl"
            mpm_section = f'[mpm]\nbase_url = "{mpm.base_url}"\nca_file = "{ca_file}"\nauth = "none"\n'
            body = mpm_section + scripted_equipment("m1", script)
            cfg = write_config(folder, broker.port, body)
            daemon = Daemon(cfg).start()
            try:
                script_line(
                    script, op="quality", result={"process_id": f"P-{name}", "overall_score": 1.0}, key=f"k-{name}"
                )
                if delivered:
                    wait_until(lambda n=name: mpm.call(mpm.emu.results, f"P-{n}"), what="result over https")
                else:
                    hit = daemon.wait_log("outbox_delivery_retrying")
                    assert "TLS certificate verification failed" in hit[0]["error"], hit
                    assert not mpm.call(mpm.emu.results, f"P-{name}")
                assert daemon.stop() == 0
            finally:
                daemon.kill()
        assert os.path.exists(ca.path)
    finally:
        mpm.close()
