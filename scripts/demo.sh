#!/usr/bin/env bash
# Run the daemon on the shipped agent.toml against the built-in simulators, and show the MQTT traffic.
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x .venv/bin/python ]; then
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || { as_root apt-get update; as_root apt-get install -y python3-venv; }
  python3 -m venv .venv
fi
# An editable install sees code changes by itself: reinstall only when the package metadata changed.
stamp=.venv/.edge-agent-demo-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x .venv/bin/edge-agent ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
  echo "$want" > "$stamp"
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped"
}
trap cleanup INT TERM EXIT

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; }
if ! broker_up; then
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "no MQTT broker on 127.0.0.1:1883: installing mosquitto"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto
  fi
  if ! broker_up; then
    mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    mkdir -p state
    printf 'listener 1883 127.0.0.1\nallow_anonymous true\n%s\n' "$([ "$(id -u)" = 0 ] && echo 'user root')" > state/mosquitto-demo.conf
    "$mosq" -c state/mosquitto-demo.conf &
    pids+=($!)
    for _ in $(seq 50); do broker_up && break; sleep 0.1; done
  fi
fi

mkdir -p state drops
.venv/bin/edge-agent simulate --config agent.toml 2> state/simulate.log &
sim=$!
pids+=($sim)
# The daemon starts once every simulator the shipped config points at listens (OPC UA, Modbus, MTConnect, MPM, printer).
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 300); do
  kill -0 "$sim" 2>/dev/null || { echo "the simulators stopped: see state/simulate.log" >&2; tail -5 state/simulate.log >&2; exit 1; }
  listening 4840 && listening 5020 && listening 5000 && listening 8780 && [ -e state/printer-1.tty ] && break
  sleep 0.1
done
listening 4840 && listening 5020 && listening 5000 && listening 8780 || { echo "the simulators did not come up: see state/simulate.log" >&2; exit 1; }
.venv/bin/edge-agent run --config agent.toml 2> state/agent.log &
pids+=($!)
echo "daemon log: state/agent.log, simulators: state/simulate.log; live MQTT traffic follows (Ctrl-C stops)"
.venv/bin/python scripts/mqtt_watch.py --url mqtt://127.0.0.1:1883 --topic 'edge/#'
