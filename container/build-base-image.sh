#!/usr/bin/env bash
# Builds a Debian 12 base image for the Dockerfile without any container
# registry, and imports it into podman (or docker: KPM33B_ENGINE=docker):
#
#   container/build-base-image.sh localhost/kpm33b-base:bookworm
#   KPM33B_BASE_IMAGE=localhost/kpm33b-base:bookworm docker compose build
#
# mmdebstrap --variant=apt bookworm (apt and the essential packages) plus
# python3, python3-venv and ca-certificates, from Debian's mirror. This
# machine's own certificate authorities (/usr/local/share/ca-certificates) are
# added too: where a proxy inspects TLS, pip inside the image build trusts
# only what the image's certificate store holds.
set -euo pipefail
image=${1:?usage: $0 <image name, e.g. localhost/kpm33b-base:bookworm>}
engine=${KPM33B_ENGINE:-podman}
mirror=${KPM33B_DEBIAN_MIRROR:-http://deb.debian.org}

hooks=()
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  hooks+=(--customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"')
fi
# Rebuilds the bundle from Debian's certificates and the ones added above.
hooks+=(--customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null 2>&1')

mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates "${hooks[@]}" \
  bookworm - \
  "deb $mirror/debian bookworm main" \
  "deb $mirror/debian bookworm-updates main" \
  "deb $mirror/debian-security bookworm-security main" \
  | "$engine" import - "$image" >/dev/null
echo "built $image"
