#!/usr/bin/env bash
# Write the unit's drop-ins from the installed config (run as root; install.sh and the .deb call it):
#   credentials.conf: LoadCredential= for every file in ETC/credentials/ (the config names them
#                     /run/credentials/edge-agent.service/NAME);
#   paths.conf:       ReadWritePaths= for the folders the config writes (`edge-agent service-paths`).
# Usage: write-dropins.sh EDGE_AGENT_BIN ETC_DIR UNIT_DIR. Re-run it after adding a secret or a folder,
# then `systemctl daemon-reload`.
set -euo pipefail
bin=$1
etc=$2
unit_dir=$3
install -d -m 0755 "$unit_dir/edge-agent.service.d"
{
  echo "# Written by write-dropins.sh: one credential per file in $etc/credentials/"
  echo "[Service]"
  for f in "$etc"/credentials/*; do
    if [ -f "$f" ]; then echo "LoadCredential=$(basename "$f"):$f"; fi
  done
} > "$unit_dir/edge-agent.service.d/credentials.conf"

# ProtectSystem=strict makes everything outside StateDirectory read-only: open the folders the config writes.
# "-": a folder that is missing at start (a mount not yet there) does not stop the service.
if paths=$("$bin" service-paths --config "$etc/agent.toml"); then
  {
    echo "# Written by write-dropins.sh from $etc/agent.toml: folders the service writes; re-run after changing them"
    echo "[Service]"
    while IFS= read -r p; do
      if [ -n "$p" ]; then echo "ReadWritePaths=-$p"; fi
    done <<< "$paths"
  } > "$unit_dir/edge-agent.service.d/paths.conf"
else
  echo "warning: $etc/agent.toml is not valid yet; no ReadWritePaths written (re-run after fixing it)" >&2
fi
