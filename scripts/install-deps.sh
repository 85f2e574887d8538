#!/usr/bin/env bash
# Installs what the project needs on a Debian/Ubuntu machine and is missing:
# Mosquitto from the distribution's packages, and a virtual environment with
# the pinned Python requirements. Safe to run again: it only adds what is absent.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
  echo "Installing mosquitto and mosquitto-clients from the distribution's packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto mosquitto-clients
fi
# The Debian package starts a system-wide broker on 1883; the project's tests
# and demo use their own brokers and ports, so it is left as it is.

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y -qq python3-venv
    "$python" -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
