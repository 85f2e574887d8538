#!/usr/bin/env bash
# Installs kpm33b-proxy as three systemd services, or removes it again.
#
#   sudo make install            (= bash scripts/install.sh install)
#   sudo make uninstall          (= bash scripts/install.sh uninstall)
#   make install DESTDIR=/tmp/stage   stage the tree under /tmp/stage instead
#
# What goes where:
#   /opt/kpm33b-proxy/           the code (top-level *.py, requirements.txt,
#                                config.yaml as a reference, mosquitto/, doc/,
#                                scripts/meter-account.sh) and its venv/;
#                                replaced on every install
#   /etc/kpm33b/config.yaml      the configuration; installed only if absent
#   /etc/kpm33b/mosquitto/       internal.conf (ours: replaced, the previous
#                                one kept as internal.conf.old if it differed),
#                                acl and passwd (the operator's: created only
#                                if absent, since meter-account.sh edits them)
#   /etc/kpm33b/secrets*.env     root-only credentials; created only if absent
#   /etc/systemd/system/         kpm33b-broker, kpm33b-proxy,
#                                kpm33b-config-sender .service (replaced)
#   users kpm33b (the daemons) and kpm33b-broker (the broker)
# State (/var/lib/kpm33b, /var/lib/kpm33b-proxy) is created by systemd.
#
# Environment:
#   DESTDIR            staging root; with it no users are created and
#                      systemctl is not called
#   KPM33B_SKIP_VENV=1 do not create or update the venv (tests)
#   KPM33B_PYTHON      interpreter for the venv (default /usr/bin/python3)
# Running it again is safe: it upgrades the code and keeps the configuration.
set -euo pipefail
umask 022

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
destdir=${DESTDIR:-}
destdir=${destdir%/}
prefix=/opt/kpm33b-proxy
etc_dir=/etc/kpm33b
unit_dir=/etc/systemd/system
units=(kpm33b-broker.service kpm33b-proxy.service kpm33b-config-sender.service)
daemon_user=kpm33b
broker_user=kpm33b-broker
# Set when this run created /etc/kpm33b/config.yaml: a first installation,
# which ends with the steps that make it work.
first_install=no

say() {
  echo "install.sh: $*"
}

die() {
  echo "install.sh: $*" >&2
  exit 1
}

is_root() {
  [ "$(id -u)" -eq 0 ]
}

# systemctl only makes sense on the live system, with systemd running.
systemd_running() {
  [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null
}

# Give a file to root and the given group (only as root on the live system:
# in a DESTDIR the users may not exist).
own() {
  local group=$1 mode=$2 file=$3
  chmod "$mode" "$file"
  if [ -z "$destdir" ] && is_root; then
    chown "root:$group" "$file"
  fi
}

create_system_user() {
  local name=$1 comment=$2
  if getent passwd "$name" >/dev/null; then
    return 0
  fi
  say "creating system user $name"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "$comment" "$name"
}

pick_python() {
  local python=${KPM33B_PYTHON:-}
  if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then
      python=/usr/bin/python3
    else
      python=$(command -v python3) || die "python3 not found"
    fi
  fi
  case "$(readlink -f "$python")" in
    /home/*|/root/*)
      # The units run with ProtectHome=yes: an interpreter there is invisible.
      say "warning: $python lives under /home or /root, which the services cannot see (ProtectHome=yes)" ;;
  esac
  echo "$python"
}

install_code() {
  local target=$destdir$prefix file
  for file in config.yaml kpm33b_proxy.py config_sender.py requirements.txt; do
    [ -f "$repo/$file" ] || die "$repo/$file is missing: the source tree is incomplete"
  done
  mkdir -p "$target"
  # Replace the code wholesale so that a module removed upstream does not
  # linger; the venv is kept and updated below.
  find "$target" -maxdepth 1 -type f -name '*.py' -delete
  rm -rf "$target/__pycache__" "$target/mosquitto" "$target/doc" "$target/scripts"
  for file in "$repo"/*.py "$repo/requirements.txt" "$repo/config.yaml"; do
    install -m 0644 "$file" "$target/"
  done
  cp -R "$repo/mosquitto" "$target/mosquitto"
  if [ -d "$repo/doc" ]; then
    cp -R "$repo/doc" "$target/doc"
  fi
  install -d -m 0755 "$target/scripts"
  install -m 0755 "$repo/scripts/meter-account.sh" "$target/scripts/meter-account.sh"
  chmod -R u=rwX,go=rX "$target/mosquitto" "$target/scripts"
  [ ! -d "$target/doc" ] || chmod -R u=rwX,go=rX "$target/doc"
}

install_venv() {
  local target=$destdir$prefix python
  python=$(pick_python)
  if [ "${KPM33B_SKIP_VENV:-}" = 1 ]; then
    say "KPM33B_SKIP_VENV=1: not creating $prefix/venv"
  else
    if [ ! -x "$target/venv/bin/python" ]; then
      say "creating $prefix/venv with $python"
      "$python" -m venv "$target/venv"
    fi
    say "installing requirements.txt into $prefix/venv"
    "$target/venv/bin/python" -m pip install -q --disable-pip-version-check -r "$target/requirements.txt"
    python=$target/venv/bin/python
  fi
  # /opt is read-only to the services (ProtectSystem=strict): compile the byte
  # code now, recording the installed path for tracebacks.
  "$python" -m compileall -q -l -d "$prefix" "$target" >/dev/null
}

install_etc() {
  local etc=$destdir$etc_dir shipped=$destdir$prefix/mosquitto
  install -d -m 0755 "$etc" "$etc/mosquitto"

  if [ -e "$etc/config.yaml" ]; then
    say "keeping $etc_dir/config.yaml (the shipped default is $prefix/config.yaml)"
  else
    install -m 0644 "$repo/config.yaml" "$etc/config.yaml"
    say "installed $etc_dir/config.yaml"
    first_install=yes
  fi

  if [ -e "$etc/mosquitto/internal.conf" ] && ! cmp -s "$shipped/internal.conf" "$etc/mosquitto/internal.conf"; then
    cp -p "$etc/mosquitto/internal.conf" "$etc/mosquitto/internal.conf.old"
    say "replaced $etc_dir/mosquitto/internal.conf; your previous version is internal.conf.old"
  fi
  install -m 0644 "$shipped/internal.conf" "$etc/mosquitto/internal.conf"

  if [ -e "$etc/mosquitto/acl" ]; then
    if ! cmp -s "$shipped/acl" "$etc/mosquitto/acl"; then
      say "keeping $etc_dir/mosquitto/acl (it holds your meters; the shipped one is $prefix/mosquitto/acl)"
    fi
  else
    install -m 0640 "$shipped/acl" "$etc/mosquitto/acl"
  fi
  own "$broker_user" 0640 "$etc/mosquitto/acl"

  [ -e "$etc/mosquitto/passwd" ] || : > "$etc/mosquitto/passwd"
  own "$broker_user" 0640 "$etc/mosquitto/passwd"

  if [ ! -e "$etc/secrets.env" ]; then
    (umask 077 && cat > "$etc/secrets.env" <<'EOF'
# Credentials for the central broker, read by systemd (root only, mode 0600)
# for kpm33b-proxy and kpm33b-config-sender. Leave them commented out for a
# broker without accounts. Apply with: systemctl restart kpm33b-proxy kpm33b-config-sender
#KPM33B_CENTRAL_USERNAME=
#KPM33B_CENTRAL_PASSWORD=
EOF
    )
    say "created $etc_dir/secrets.env"
  fi
  own root 0600 "$etc/secrets.env"

  install_service_account kpm33b-proxy "$etc/secrets-proxy.env"
  install_service_account kpm33b-config-sender "$etc/secrets-config-sender.env"
}

# Each daemon has its own account on the internal broker; made once, with a
# random password that only the root-only env file and the hash in passwd hold.
install_service_account() {
  local username=$1 env_file=$2 password
  if [ -e "$env_file" ]; then
    own root 0600 "$env_file"
    return 0
  fi
  if ! command -v mosquitto_passwd >/dev/null; then
    say "warning: mosquitto_passwd not found; create the account later with"
    say "  $prefix/scripts/meter-account.sh add-service $username"
    return 0
  fi
  password=$(head -c 600 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
  password=${password:0:24}
  bash "$repo/scripts/meter-account.sh" --passwd-file "$destdir$etc_dir/mosquitto/passwd" \
    add-service "$username" "$password" >/dev/null
  own "$broker_user" 0640 "$destdir$etc_dir/mosquitto/passwd"
  (umask 077 && cat > "$env_file" <<EOF
# $username's account on the internal broker (created by install.sh; the
# hash is in $etc_dir/mosquitto/passwd). Root only, mode 0600.
KPM33B_INTERNAL_USERNAME=$username
KPM33B_INTERNAL_PASSWORD=$password
EOF
  )
  own root 0600 "$env_file"
  say "created the internal broker account $username ($etc_dir/$(basename "$env_file"))"
}

# What is left to do once the files are in place: the installation refuses to
# start until central_broker.host names the existing broker (config.yaml ships
# without one), so say exactly what to set, where, and what comes after.
next_steps() {
  local python=$prefix/venv/bin/python
  if [ "$first_install" != yes ]; then
    say "done; kept your configuration in $etc_dir"
    say "new settings: compare $etc_dir/config.yaml with $prefix/config.yaml"
    return 0
  fi
  cat <<EOF
install.sh: done. Next steps:
  1. Central broker: set central_broker.host in $etc_dir/config.yaml to the address of
     your existing MQTT broker (for example Home Assistant's), and .port and .tls if they
     differ; the services refuse to start until it is set. Check the file with
       $python $prefix/kpm33b_proxy.py --config $etc_dir/config.yaml --check-config
  2. Secrets: if that broker has accounts, put KPM33B_CENTRAL_USERNAME and KPM33B_CENTRAL_PASSWORD in $etc_dir/secrets.env
  3. First meter: $prefix/scripts/meter-account.sh add <meter id>
     and enter what it prints on the meter ($prefix/doc/meters.md)
  4. Start: systemctl start kpm33b-broker kpm33b-proxy kpm33b-config-sender
     and watch: journalctl -u 'kpm33b-*' -f
More in $prefix/doc/operations.md (backup, upgrades, removal, troubleshooting).
EOF
}

install_units() {
  local unit
  install -d -m 0755 "$destdir$unit_dir"
  for unit in "${units[@]}"; do
    install -m 0644 "$repo/systemd/$unit" "$destdir$unit_dir/$unit"
  done
}

do_install() {
  if [ -z "$destdir" ]; then
    is_root || die "run it as root (sudo make install), or stage it with DESTDIR=..."
    command -v mosquitto >/dev/null || say "warning: mosquitto is not installed (apt-get install mosquitto)"
    # The distribution's broker unit is not needed (kpm33b-broker.service
    # runs its own); it is left as it is, on its own port 1883.
    create_system_user "$daemon_user" "kpm33b-proxy daemons"
    create_system_user "$broker_user" "kpm33b internal MQTT broker"
  fi
  install_code
  install_venv
  install_etc
  install_units
  if [ -n "$destdir" ]; then
    say "staged under $destdir (no users created, systemctl not called)"
  elif systemd_running; then
    systemctl daemon-reload
    systemctl enable "${units[@]}"
    # An upgrade: restart what was running so that the new code is used.
    systemctl try-restart "${units[@]}"
    say "enabled ${units[*]} (restarted those that were running)"
  else
    say "note: systemd is not running here; enable the units later with:"
    say "  systemctl daemon-reload && systemctl enable ${units[*]}"
  fi
  next_steps
}

do_uninstall() {
  local unit
  if [ -z "$destdir" ]; then
    is_root || die "run it as root (sudo make uninstall), or give DESTDIR=..."
  fi
  if systemd_running; then
    systemctl disable --now "${units[@]}" 2>/dev/null || true
  elif [ -z "$destdir" ]; then
    say "note: systemd is not running here; nothing to stop or disable"
  fi
  for unit in "${units[@]}"; do
    rm -f "$destdir$unit_dir/$unit"
  done
  if systemd_running; then
    systemctl daemon-reload
  fi
  rm -rf "$destdir$prefix"
  say "removed $prefix and the units"
  say "kept $etc_dir (configuration, accounts, secrets), the state in /var/lib/kpm33b and"
  say "/var/lib/kpm33b-proxy, and the users $daemon_user and $broker_user; remove them by hand if wanted"
}

case "${1:-}" in
  install) do_install ;;
  uninstall) do_uninstall ;;
  *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
