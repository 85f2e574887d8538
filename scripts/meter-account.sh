#!/usr/bin/env bash
# Manages the accounts on the internal broker (kpm33b-broker.service).
#
#   meter-account.sh [options] add <meter_id> [password]
#   meter-account.sh [options] remove <meter_id>
#   meter-account.sh [options] list
#   meter-account.sh [options] add-service <kpm33b-proxy|kpm33b-config-sender> [password]
#
# options:
#   --passwd-file PATH   default /etc/kpm33b/mosquitto/passwd
#   --acl-file PATH      default: "acl" beside the password file
#
# A meter's account is named after the last 8 characters of its 13-character
# id (33B1225950027 -> 25950027), the suffix of the command topics it listens
# on. Besides the password entry, `add` writes the meter's section into the
# ACL: what the meter may publish, and the config sender's right to send
# commands to that one meter. (Mosquitto ACL topics cannot wildcard part of a
# topic level, so "MQTT_COMMOD_SET_+" is not valid; each meter is listed.)
# Without a password one is generated and printed once: write it down.
# Ids are accepted in any letter case and written in upper case, as the
# meters show them (33b1225950027 and 33B1225950027 are the same meter).
#
# The broker applies a change when it reloads. `add` and `remove` make it do
# so themselves when it runs: `systemctl reload kpm33b-broker` when that unit is
# active, else SIGHUP to the pid in $KPM33B_BROKER_PID_FILE (the container
# image sets it); otherwise they say how to apply the change.
#
# Environment:
#   KPM33B_METER_PORT       the port the meters reach the broker on, printed by
#                           `add` (default: the listener in internal.conf beside
#                           the password file, else 11883); the container sets
#                           the port it publishes
#   KPM33B_BROKER_PID_FILE  a broker to reload by SIGHUP when systemd has none
#   KPM33B_CONTAINER        set in the container image: the addresses `add`
#                           would find are the container's, not the machine's
set -euo pipefail

passwd_file=/etc/kpm33b/mosquitto/passwd
acl_file=""
broker_group=kpm33b-broker
service_accounts="kpm33b-proxy kpm33b-config-sender"

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() {
  echo "meter-account.sh: $*" >&2
  exit 1
}

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --passwd-file) [ $# -ge 2 ] || usage; passwd_file=$2; shift 2 ;;
    --passwd-file=*) passwd_file=${1#*=}; shift ;;
    --acl-file) [ $# -ge 2 ] || usage; acl_file=$2; shift 2 ;;
    --acl-file=*) acl_file=${1#*=}; shift ;;
    -h|--help) usage 0 ;;
    --) shift; args+=("$@"); break ;;
    -*) echo "meter-account.sh: unknown option $1" >&2; usage ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"
[ $# -ge 1 ] || usage
command=$1
shift
[ -n "$acl_file" ] || acl_file="$(dirname "$passwd_file")/acl"

# The meter id is 13 characters [0-9A-Za-z], taken in upper case: the
# meters show their ids so, and one spelling per meter is what lets `remove`
# find what `add` wrote. Its account is the last 8 characters.
meter_id_upper() {
  local meter_id=$1
  [[ "$meter_id" =~ ^[0-9A-Za-z]{13}$ ]] \
    || die "'$meter_id' is not a meter id: it must be exactly 13 characters 0-9, A-Z, a-z (e.g. 33B1225950027)"
  echo "${meter_id^^}"
}

# 20 random letters and digits: safe to type into a meter's settings page.
random_password() {
  local password
  password=$(head -c 600 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
  echo "${password:0:20}"
}

# The broker reads the files as its own user: keep them root:kpm33b-broker 0640.
restore_permissions() {
  local file=$1
  chmod 0640 "$file"
  if [ "$(id -u)" -eq 0 ] && getent group "$broker_group" >/dev/null; then
    chgrp "$broker_group" "$file"
  fi
}

set_password() {
  local username=$1 password=$2
  command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (apt-get install mosquitto)"
  mkdir -p "$(dirname "$passwd_file")"
  if [ -e "$passwd_file" ]; then
    mosquitto_passwd -b "$passwd_file" "$username" "$password" >/dev/null
  else
    mosquitto_passwd -c -b "$passwd_file" "$username" "$password" >/dev/null
  fi
  restore_permissions "$passwd_file"
}

passwd_has_user() {
  [ -e "$passwd_file" ] && cut -d: -f1 "$passwd_file" | grep -qxF -- "$1"
}

# The password entries of an account in any letter case (an older version of
# this script kept the case it was given).
passwd_users_like() {
  [ -e "$passwd_file" ] || return 0
  cut -d: -f1 "$passwd_file" | awk -v user="$1" 'toupper($0) == user'
}

# Drop the managed section of one meter from the ACL, whatever the case its id
# was written in (rewritten in place, so the file keeps its owner and mode).
acl_remove_meter() {
  local meter_id=$1 kept
  [ -e "$acl_file" ] || return 0
  kept=$(awk -v begin="# >>> METER $meter_id" -v end="# <<< METER $meter_id" '
    { line = toupper($0) }
    line == begin || index(line, begin " ") == 1 { skip = 1; next }
    skip && line == end { skip = 0; next }
    !skip { print }
  ' "$acl_file")
  printf '%s\n' "$kept" > "$acl_file"
}

acl_has_meter() {
  [ -e "$acl_file" ] && grep -qixF -- "# <<< meter $1" "$acl_file"
}

acl_add_meter() {
  local meter_id=$1 username=$2
  [ -e "$acl_file" ] || die "ACL file $acl_file not found (run the installer first, or pass --acl-file)"
  acl_remove_meter "$meter_id"
  cat >> "$acl_file" <<EOF
# >>> meter $meter_id (written by scripts/meter-account.sh; edit with it)
user $username
topic write MQTT_RT_DATA
topic write MQTT_ENY_NOW
topic write MQTT_DAY_DATA
topic write MQTT_TELEIND
topic write MQTT_COMMOD_SET_REP
topic write MQTT_METER_TIME_REP
topic write MQTT_COMMOD_READ_REP
user kpm33b-config-sender
topic write MQTT_COMMOD_SET_$username
topic write MQTT_SETTIME_$username
# <<< meter $meter_id
EOF
  restore_permissions "$acl_file"
}

# The port the meters reach the broker on: what to enter on the meter.
meter_port() {
  local conf port=""
  conf="$(dirname "$passwd_file")/internal.conf"
  if [ -n "${KPM33B_METER_PORT:-}" ]; then
    port=$KPM33B_METER_PORT
  elif [ -r "$conf" ]; then
    port=$(awk '$1 == "listener" { print $2; exit }' "$conf")
  fi
  echo "${port:-11883}"
}

# This machine's IPv4 addresses on its networks, without the bridges of
# containers and virtual machines, which no meter can reach.
lan_addresses() {
  if command -v ip >/dev/null; then
    ip -4 -o addr show scope global 2>/dev/null \
      | awk '$2 !~ /^(docker|podman|cni|br-|veth|virbr|lxc|lxd)/ { split($4, a, "/"); print a[1] }'
  elif command -v hostname >/dev/null; then
    hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' || true
  fi
}

# What the operator types into the meter's private-server settings (doc/meters.md).
print_meter_settings() {
  local username=$1 password_note=$2 addresses
  if [ -n "${KPM33B_CONTAINER:-}" ]; then
    # Inside a container its own addresses are not what the meters reach.
    addresses="the LAN address of the machine that runs the containers"
  else
    addresses=$(lan_addresses | paste -sd ' ' - | sed 's/ /, /g')
    case "$addresses" in
      "") addresses="this machine's LAN address (none found: see 'ip addr')" ;;
      *", "*) addresses="one of $addresses (this machine; the one on the meters' network)" ;;
      *) addresses="$addresses (this machine)" ;;
    esac
  fi
  echo "On the meter, in the KPM Config app's private server settings (doc/meters.md):"
  echo "  server address: $addresses"
  echo "  port: $(meter_port)"
  echo "  MQTT account: $username"
  echo "  MQTT password: $password_note"
}

# Make the running broker re-read its accounts, or say how to. systemctl
# is-active fails where systemd does not run or the unit is not installed.
reload_broker() {
  local pid=""
  if command -v systemctl >/dev/null && systemctl is-active --quiet kpm33b-broker 2>/dev/null; then
    if systemctl reload kpm33b-broker; then
      echo "kpm33b-broker has reloaded its accounts: the change applies now."
      return 0
    fi
    echo "meter-account.sh: warning: systemctl reload kpm33b-broker failed" >&2
  elif [ -n "${KPM33B_BROKER_PID_FILE:-}" ] && [ -r "$KPM33B_BROKER_PID_FILE" ]; then
    pid=$(head -n 1 "$KPM33B_BROKER_PID_FILE")
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -HUP "$pid" 2>/dev/null; then
      echo "kpm33b-broker has reloaded its accounts: the change applies now."
      return 0
    fi
  fi
  reload_hint
}

reload_hint() {
  echo "Apply it with: systemctl reload kpm33b-broker"
}

cmd_add() {
  [ $# -ge 1 ] && [ $# -le 2 ] || usage
  local meter_id username password generated=no
  meter_id=$(meter_id_upper "$1")
  username=${meter_id: -8}
  [ -e "$acl_file" ] || die "ACL file $acl_file not found (run the installer first, or pass --acl-file)"
  # A second id with the same last 8 characters would share the account and
  # the command topics: refuse rather than mix two meters up.
  local other
  other=$(sed -n "s/^# >>> meter \([0-9A-Za-z]*\) .*/\1/p" "$acl_file" \
    | awk -v u="$username" -v id="$meter_id" 'toupper(substr($0, 6)) == u && toupper($0) != id' | head -n 1)
  [ -z "$other" ] || die "meter $other already uses the account $username (same last 8 characters)"
  if [ $# -eq 2 ]; then
    password=$2
    [ -n "$password" ] || die "the password must not be empty"
  else
    password=$(random_password)
    generated=yes
  fi
  set_password "$username" "$password"
  acl_add_meter "$meter_id" "$username"
  echo "Meter $meter_id: account $username added to $passwd_file and $acl_file."
  if [ "$generated" = yes ]; then
    echo "Password (shown only now): $password"
    print_meter_settings "$username" "the password above"
  else
    print_meter_settings "$username" "the one given"
  fi
  reload_broker
}

cmd_remove() {
  [ $# -eq 1 ] || usage
  local meter_id username user found=no
  meter_id=$(meter_id_upper "$1")
  username=${meter_id: -8}
  while read -r user; do
    [ -n "$user" ] || continue
    mosquitto_passwd -D "$passwd_file" "$user" >/dev/null
    restore_permissions "$passwd_file"
    found=yes
  done < <(passwd_users_like "$username")
  if acl_has_meter "$meter_id"; then
    acl_remove_meter "$meter_id"
    found=yes
  fi
  if [ "$found" = no ]; then
    echo "Meter $meter_id (account $username) has no account: nothing to remove."
    return 0
  fi
  echo "Meter $meter_id: account $username removed."
  reload_broker
}

cmd_list() {
  [ $# -eq 0 ] || usage
  local users="" meter_id username password_state
  [ -e "$passwd_file" ] && users=$(cut -d: -f1 "$passwd_file")
  printf '%-15s %-22s %s\n' "METER ID" "ACCOUNT" "PASSWORD"
  if [ -e "$acl_file" ]; then
    while read -r meter_id; do
      username=${meter_id: -8}
      password_state=missing
      grep -qxF -- "$username" <<<"$users" && password_state=set
      printf '%-15s %-22s %s\n' "$meter_id" "$username" "$password_state"
    done < <(sed -n "s/^# >>> meter \([0-9A-Za-z]*\) .*/\1/p" "$acl_file")
  fi
  for username in $service_accounts; do
    grep -qxF -- "$username" <<<"$users" && printf '%-15s %-22s %s\n' "(service)" "$username" "set"
  done
  # Entries made by hand: they have a password but no rights in the ACL.
  while read -r username; do
    [ -n "$username" ] || continue
    case " $service_accounts " in *" $username "*) continue ;; esac
    if ! { [ -e "$acl_file" ] && grep -q "^# >>> meter [0-9A-Za-z]\{5\}$username " "$acl_file"; }; then
      printf '%-15s %-22s %s\n' "(no ACL)" "$username" "set"
    fi
  done <<<"$users"
}

cmd_add_service() {
  [ $# -ge 1 ] && [ $# -le 2 ] || usage
  local username=$1 password generated=no env_file
  case " $service_accounts " in
    *" $username "*) ;;
    *) die "'$username' is not a service account; the ACL grants rights only to: $service_accounts" ;;
  esac
  if [ $# -eq 2 ]; then
    password=$2
    [ -n "$password" ] || die "the password must not be empty"
  else
    password=$(random_password)
    generated=yes
  fi
  set_password "$username" "$password"
  env_file=/etc/kpm33b/secrets-${username#kpm33b-}.env
  echo "Service account $username added to $passwd_file."
  if [ "$generated" = yes ]; then
    echo "Password (shown only now): $password"
  fi
  echo "The daemon reads it from $env_file (root, mode 0600):"
  echo "  KPM33B_INTERNAL_USERNAME=$username"
  echo "  KPM33B_INTERNAL_PASSWORD=<the password>"
  reload_hint
}

case "$command" in
  add) cmd_add "$@" ;;
  remove) cmd_remove "$@" ;;
  list) cmd_list "$@" ;;
  add-service) cmd_add_service "$@" ;;
  *) echo "meter-account.sh: unknown command '$command'" >&2; usage ;;
esac
