#!/usr/bin/env bash
# Installs what `make test-container` needs and is missing, from the
# distribution's packages (Debian 12 / Ubuntu; through sudo when not root):
#   podman, runc           the engine, with the runtime that works under the
#                          cgroupfs manager used where systemd does not run
#   netavark, aardvark-dns the compose network, and its names (broker, central)
#   iptables               netavark's port forwarding
#   podman-compose         compose.yaml
#   mmdebstrap             the base image, built here (no registry needed)
# Recommended packages are left out: rootless helpers, buildah, criu.
set -euo pipefail
packages=(podman runc netavark aardvark-dns iptables podman-compose mmdebstrap)

command -v dpkg-query >/dev/null || { echo "install-tools.sh: needs a Debian or Ubuntu machine (apt)" >&2; exit 1; }
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -gt 0 ] || exit 0

echo "Installing ${missing[*]} from the distribution's packages"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
