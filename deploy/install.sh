#!/usr/bin/env bash
# Install meshmerge as a systemd service: venv in /opt/meshmerge, unit, config, user.
#   sudo deploy/install.sh            install or upgrade from this checkout
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/meshmerge
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$here"
install -D -m 0644 "$here/deploy/meshmerge.service" /etc/systemd/system/meshmerge.service
install -D -m 0644 "$here/deploy/meshmerge.sysusers" /usr/lib/sysusers.d/meshmerge.conf
install -D -m 0644 "$here/deploy/meshmerge.tmpfiles" /usr/lib/tmpfiles.d/meshmerge.conf
[ -f /etc/meshmerge/config.toml ] || install -D -m 0644 "$here/deploy/config.toml" /etc/meshmerge/config.toml
systemd-sysusers /usr/lib/sysusers.d/meshmerge.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/meshmerge.conf
systemctl daemon-reload
echo "installed; edit /etc/meshmerge/config.toml (listen addresses), then: systemctl enable --now meshmerge"
