#!/usr/bin/env bash
# Build edge-agent_<version>_<arch>.deb: the daemon in a virtualenv under /opt/edge-agent/venv with every
# dependency installed from wheels (also shipped in /opt/edge-agent/wheels), so the package installs without
# a network; the systemd unit; /etc/edge-agent/agent.toml as a conffile. No secret is created.
#
#   packaging/build-deb.sh [OUT_DIR]          (default: dist/)
#   WHEELHOUSE=DIR packaging/build-deb.sh     take every wheel from DIR, offline (see docs/operations.md)
#   DEB_COMPRESS=gzip                         faster to build, larger (default xz)
#   PYTHON=/usr/bin/python3.11                the target's interpreter (default /usr/bin/python3); the
#                                             package depends on exactly this minor version
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$src/dist}" && cd "${1:-$src/dist}" && pwd)
py=${PYTHON:-/usr/bin/python3}
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
version=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$src/pyproject.toml")
arch=$(dpkg --print-architecture)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
opt="$root/opt/edge-agent"

# 1. The wheelhouse: this package and every dependency as wheels for this interpreter.
mkdir -p "$opt/wheels"
if [ -n "${WHEELHOUSE:-}" ]; then
  "$py" -m pip wheel -q --no-index --find-links "$WHEELHOUSE" -w "$opt/wheels" "$src"
else
  "$py" -m pip wheel -q -w "$opt/wheels" "$src"
fi

# 2. The virtualenv, installed from the wheelhouse only, then moved to its final path's form: scripts get the
#    final interpreter path; `edge-agent` finds its interpreter next to itself, so the tree also runs where
#    it was unpacked (a throwaway root, a chroot).
"$py" -m venv "$opt/venv"
"$opt/venv/bin/python" -m pip install -q --no-compile --no-index --find-links "$opt/wheels" edge-agent
rm -f "$opt"/venv/bin/pip* "$opt"/venv/bin/activate*
sed -i "s#$opt/venv#/opt/edge-agent/venv#g" "$opt/venv/pyvenv.cfg"
for f in "$opt"/venv/bin/*; do
  if [ -f "$f" ] && [ ! -L "$f" ] && head -c 2 "$f" | grep -q '#!'; then
    sed -i "1s#^\#!$opt/venv/bin/#\#!/opt/edge-agent/venv/bin/#" "$f"
  fi
done
cat > "$opt/venv/bin/edge-agent" <<'SCRIPT'
#!/bin/sh
'''exec' "$(dirname -- "$(readlink -f -- "$0")")/python" "$0" "$@"
' '''
import sys

from agent.cli import main

sys.exit(main())
SCRIPT
chmod 0755 "$opt/venv/bin/edge-agent"
"$opt/venv/bin/python" -m compileall -q -f -d /opt/edge-agent/venv/lib "$opt/venv/lib" >/dev/null || true
install -D -m 0755 "$src/systemd/write-dropins.sh" "$opt/share/write-dropins.sh"
mkdir -p "$root/usr/bin"
ln -s /opt/edge-agent/venv/bin/edge-agent "$root/usr/bin/edge-agent"

# 3. The unit and the config (a conffile: dpkg keeps local edits on upgrade). Secrets are the admin's.
install -D -m 0644 "$src/systemd/edge-agent.service" "$root/lib/systemd/system/edge-agent.service"
install -D -m 0644 "$src/systemd/agent.toml" "$root/etc/edge-agent/agent.toml"
install -d -m 0700 "$root/etc/edge-agent/credentials"
install -D -m 0644 "$src/docs/operations.md" "$root/usr/share/doc/edge-agent/operations.md"

# 4. Control files.
mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@PYVER@/$pyver/g" -e "s/@SIZE@/$size/" \
  "$src/packaging/debian/control" > "$root/DEBIAN/control"
echo /etc/edge-agent/agent.toml > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$src/packaging/debian/$script" "$root/DEBIAN/$script"
done
deb="$out/edge-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z${DEB_COMPRESS:-xz}" --build "$root" "$deb" >/dev/null
echo "$deb"
