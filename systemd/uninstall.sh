#!/usr/bin/env bash
# Remove the edge-agent service that install.sh set up (run as root): stop and disable it, remove the unit,
# its drop-ins and the virtualenv. The config (/etc/edge-agent) and the durable state (/var/lib/edge-agent,
# or /var/lib/private/edge-agent with DynamicUser) are kept unless --purge is given.
set -euo pipefail
prefix=${PREFIX:-/opt/edge-agent}
etc=${ETC_DIR:-/etc/edge-agent}
unit_dir=${UNIT_DIR:-/etc/systemd/system}
purge=""
[ "${1:-}" = "--purge" ] && purge=1

if [ -z "${NO_SYSTEMCTL:-}" ]; then
  systemctl disable --now edge-agent.service 2>/dev/null || true
fi
rm -f "$unit_dir/edge-agent.service"
rm -rf "$unit_dir/edge-agent.service.d"
rm -rf "$prefix/venv"
rmdir "$prefix" 2>/dev/null || true
if [ -n "$purge" ]; then
  if [ -n "${STATE_DIR:-}" ]; then
    rm -rf "$etc" "$STATE_DIR"
  else
    rm -rf "$etc" /var/lib/edge-agent /var/lib/private/edge-agent
  fi
fi
if [ -z "${NO_SYSTEMCTL:-}" ]; then
  systemctl daemon-reload
fi
echo "edge-agent removed${purge:+ with its config and state}."
[ -n "$purge" ] || echo "kept: $etc (config, credentials) and the state under /var/lib; --purge removes them."
