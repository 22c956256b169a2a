"""MQTT over TLS end to end: verified server, client certificates, and each way it must be refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import CA, Issued, issue, make_ca
from peers import Broker, Daemon, Recorder, free_port, wait_until, write_config

R = "edge/test-site/cell-t"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    folder = tmp_path / "pki"
    ca = make_ca(folder, "plant-ca")
    other = make_ca(folder, "other-ca")
    return {
        "ca": ca,
        "other": other,
        "server": issue(ca, folder, "broker"),
        "wrong_host": issue(ca, folder, "broker-wrong-host", hosts=("mqtt.elsewhere.example",)),
        "expired": issue(ca, folder, "broker-expired", expired=True),
        "client": issue(ca, folder, "edge-client", client=True),
    }


def tls_broker(tmp: Path, name: str, ca: CA, server: Issued) -> Broker:
    """A mosquitto with a TLS-only listener that requires a client certificate, plus a plain one for the test."""
    tls_port = free_port()
    extra = (
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {ca.path}\ncertfile {server.cert}\nkeyfile {server.key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    broker = Broker(tmp / name, extra_conf=extra)
    broker.tls_port = tls_port  # type: ignore[attr-defined]
    return broker


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[list[Broker]]:
    started: list[Broker] = []
    yield started
    for b in started:
        b.stop()


def tls_config(tmp: Path, broker: Broker, ca: CA, client: Issued | None) -> Path:
    cert = f'cert_file = "{client.cert}"\nkey_file = "{client.key}"\n' if client else ""
    cfg = write_config(tmp, broker.port, mqtt_extra=f'ca_file = "{ca.path}"\n{cert}')
    text = cfg.read_text().replace(f"mqtt://127.0.0.1:{broker.port}", f"mqtts://127.0.0.1:{broker.tls_port}")  # type: ignore[attr-defined]
    text = text.replace('log_level = "info"', 'log_level = "debug"')
    cfg.write_text(text)
    return cfg


def test_tls_connects_with_ca_and_client_certificate(tmp_path: Path, pki: dict, brokers: list[Broker]) -> None:
    broker = tls_broker(tmp_path, "b", pki["ca"], pki["server"])
    broker.start()
    brokers.append(broker)
    rec = Recorder(broker.port, [f"{R}/state"])
    daemon = Daemon(tls_config(tmp_path, broker, pki["ca"], pki["client"])).start()
    try:
        rec.wait_for(lambda ms: [m for m in ms if m.json["online"]], "birth over TLS")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("wrong_ca", "TLS certificate verification failed"),
        ("wrong_host", "TLS certificate verification failed: IP address mismatch"),
        ("expired", "TLS certificate verification failed: certificate has expired"),
        ("no_client_cert", "may require a client certificate"),
    ],
)
def test_tls_refused_clearly_and_retried(
    tmp_path: Path, pki: dict, brokers: list[Broker], case: str, expected: str
) -> None:
    server = {"wrong_host": pki["wrong_host"], "expired": pki["expired"]}.get(case, pki["server"])
    broker = tls_broker(tmp_path, "b", pki["ca"], server)
    broker.start()
    brokers.append(broker)
    ca = pki["other"] if case == "wrong_ca" else pki["ca"]
    client = None if case == "no_client_cert" else pki["client"]
    rec = Recorder(broker.port, [f"{R}/state"])
    daemon = Daemon(tls_config(tmp_path, broker, ca, client)).start()
    try:
        down = daemon.wait_log("mqtt_down")
        assert expected in down[0]["error"], down[0]
        assert down[0]["error"]  # a reason, never empty
        # retried with backoff: more attempts follow, but the transition is logged once
        wait_until(
            lambda: len([e for e in daemon.logs() if e.get("event") == "mqtt_attempt_failed"]) >= 2, what="retries"
        )
        assert len([e for e in daemon.logs() if e.get("event") == "mqtt_down"]) == 1
        assert not [m for m in rec.messages if m.json.get("online")]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
