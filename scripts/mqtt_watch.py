"""Print every MQTT message under a topic filter, one line each, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--topic", default="edge/#")
    args = ap.parse_args()
    url = urlsplit(args.url)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on_connect(c: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe(args.topic, qos=1)

    def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        flag = " (retained)" if msg.retain else ""
        print(f"{msg.topic}{flag} {msg.payload.decode(errors='replace')}", flush=True)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *a: done.set())
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    client.loop_start()
    done.wait()
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
