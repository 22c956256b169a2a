#!/usr/bin/env bash
# Install edge-agent as a systemd service from this checkout (run as root):
#   - the package into its own virtualenv ($PREFIX/venv, default /opt/edge-agent/venv); with WHEELHOUSE=DIR
#     from wheels in DIR only, without a network (see docs/operations.md);
#   - /etc/edge-agent/agent.toml (a commented starting point, kept if present) and /etc/edge-agent/credentials/;
#   - the unit, a drop-in passing every file in credentials/ to the service with LoadCredential, and a
#     drop-in making the folders the config writes (a file drop's folders) writable: ReadWritePaths=;
#   - systemctl daemon-reload and enable (not start: edit the config first).
# Re-run it after adding a secret file to credentials/ or a folder to the config. Undo: systemd/uninstall.sh.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/opt/edge-agent}
etc=${ETC_DIR:-/etc/edge-agent}
unit_dir=${UNIT_DIR:-/etc/systemd/system}
bin="$prefix/venv/bin/edge-agent"

if [ -z "${SKIP_VENV:-}" ]; then
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || {
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
  }
  python3 -m venv "$prefix/venv"
  if [ -n "${WHEELHOUSE:-}" ]; then
    "$prefix/venv/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" edge-agent
  else
    "$prefix/venv/bin/python" -m pip install -q --upgrade pip
    "$prefix/venv/bin/python" -m pip install -q "$src"
  fi
fi

install -d -m 0755 "$etc"
install -d -m 0700 "$etc/credentials"
if [ ! -f "$etc/agent.toml" ]; then
  install -m 0644 "$src/systemd/agent.toml" "$etc/agent.toml"
fi

install -d -m 0755 "$unit_dir"
sed -e "s#/opt/edge-agent/venv/bin/edge-agent#$bin#g" -e "s#/etc/edge-agent/#$etc/#g" \
  "$src/systemd/edge-agent.service" > "$unit_dir/edge-agent.service"
bash "$src/systemd/write-dropins.sh" "$bin" "$etc" "$unit_dir"

if [ -z "${NO_SYSTEMCTL:-}" ]; then
  systemctl daemon-reload
  systemctl enable edge-agent.service
fi
echo "edge-agent installed: edit $etc/agent.toml, put secrets in $etc/credentials/ (then re-run this script),"
echo "check it as the service sees it with '$bin check-config --config $etc/agent.toml --credentials $etc/credentials',"
echo "start with 'systemctl start edge-agent'."
