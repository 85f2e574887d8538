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
# The broker applies a change on `systemctl reload kpm33b-broker`.
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

# The meter id is 13 characters [0-9A-Za-z]; its account is the last 8.
meter_username() {
  local meter_id=$1
  [[ "$meter_id" =~ ^[0-9A-Za-z]{13}$ ]] \
    || die "'$meter_id' is not a meter id: it must be exactly 13 characters 0-9, A-Z, a-z (e.g. 33B1225950027)"
  echo "${meter_id: -8}"
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

# Drop the managed section of one meter from the ACL (rewritten in place, so
# the file keeps its owner and mode).
acl_remove_meter() {
  local meter_id=$1 kept
  [ -e "$acl_file" ] || return 0
  kept=$(awk -v begin="# >>> meter $meter_id" -v end="# <<< meter $meter_id" '
    $0 == begin || index($0, begin " ") == 1 { skip = 1; next }
    skip && $0 == end { skip = 0; next }
    !skip { print }
  ' "$acl_file")
  printf '%s\n' "$kept" > "$acl_file"
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

reload_hint() {
  echo "Apply it with: systemctl reload kpm33b-broker"
}

cmd_add() {
  [ $# -ge 1 ] && [ $# -le 2 ] || usage
  local meter_id=$1 username password generated=no
  username=$(meter_username "$meter_id")
  [ -e "$acl_file" ] || die "ACL file $acl_file not found (run the installer first, or pass --acl-file)"
  # A second id with the same last 8 characters would share the account and
  # the command topics: refuse rather than mix two meters up.
  local other
  other=$(sed -n "s/^# >>> meter \([0-9A-Za-z]*\) .*/\1/p" "$acl_file" \
    | awk -v u="$username" -v id="$meter_id" 'substr($0, 6) == u && $0 != id' | head -n 1)
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
  fi
  echo "On the meter set: broker = this machine, port 11883, user name $username, that password."
  reload_hint
}

cmd_remove() {
  [ $# -eq 1 ] || usage
  local meter_id=$1 username found=no
  username=$(meter_username "$meter_id")
  if passwd_has_user "$username"; then
    mosquitto_passwd -D "$passwd_file" "$username" >/dev/null
    restore_permissions "$passwd_file"
    found=yes
  fi
  if [ -e "$acl_file" ] && grep -qxF "# <<< meter $meter_id" "$acl_file"; then
    acl_remove_meter "$meter_id"
    found=yes
  fi
  if [ "$found" = no ]; then
    echo "Meter $meter_id (account $username) has no account: nothing to remove."
    return 0
  fi
  echo "Meter $meter_id: account $username removed."
  reload_hint
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
