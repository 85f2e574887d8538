#!/bin/sh
# The container image's entry point: one image, a role per service of compose.yaml.
#
#   broker          the internal Mosquitto broker the meters connect to (11883):
#                   the shipped mosquitto/internal.conf, logging to stdout; it
#                   makes the daemons' accounts on its first start
#   proxy           kpm33b_proxy.py      } as the unprivileged user kpm33b, with
#   config-sender   config_sender.py     } the secrets of /etc/kpm33b/secrets.env
#                                          and their own internal broker account
#   central-broker  a local, anonymous central broker for trying it out
#   check-config    kpm33b_proxy.py --check-config on /etc/kpm33b/config.yaml
#   anything else   run as it is (e.g. `meter-account add <id>`, `sh`)
#
# Paths inside the container (compose.yaml mounts them):
#   /etc/kpm33b/                      the site directory, read-only: config.yaml
#                                     and, optionally, secrets.env
#   /var/lib/kpm33b/accounts/         the broker's passwd and acl (broker only)
#   /var/lib/kpm33b/daemon-accounts/  secrets-proxy.env, secrets-config-sender.env:
#                                     written by the broker, read by the daemons
#   /var/lib/kpm33b/mosquitto/        the broker's persistence
#   /var/lib/kpm33b-proxy/            the proxy's state ($STATE_DIRECTORY)
set -eu

app=/opt/kpm33b-proxy
site=/etc/kpm33b
accounts=/var/lib/kpm33b/accounts
daemon_accounts=/var/lib/kpm33b/daemon-accounts
broker_run=/run/kpm33b-broker

say() {
  echo "entrypoint: $*" >&2
}

# Export the KEY=VALUE lines of an environment file, as systemd's
# EnvironmentFile= reads it: comments and blank lines skipped, nothing run.
load_env_file() {
  file=$1
  [ -f "$file" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in
      ''|'#'*) ;;
      *=*)
        key=${line%%=*}
        case $key in
          *[!A-Za-z0-9_]*|[0-9]*) say "ignored a line of $file that is not KEY=VALUE" ;;
          *) export "$line" ;;
        esac ;;
      *) say "ignored a line of $file that is not KEY=VALUE" ;;
    esac
  done < "$file"
}

random_password() {
  LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 24
}

# The daemons' accounts on the internal broker, made once with random
# passwords, as install.sh does on a host: the hash goes into passwd, the
# password into an environment file that only the daemons' containers mount.
make_daemon_account() {
  username=$1
  env_file=$daemon_accounts/secrets-${username#kpm33b-}.env
  [ -e "$env_file" ] && return 0
  password=$(random_password)
  meter-account add-service "$username" "$password" >/dev/null
  (umask 077 && printf 'KPM33B_INTERNAL_USERNAME=%s\nKPM33B_INTERNAL_PASSWORD=%s\n' "$username" "$password" \
    > "$env_file.new" && mv "$env_file.new" "$env_file")
  say "created the internal broker account $username"
}

run_broker() {
  install -d -m 0755 "$accounts" "$daemon_accounts"
  install -d -o kpm33b-broker -g kpm33b-broker -m 0700 /var/lib/kpm33b/mosquitto
  install -d -o kpm33b-broker -g kpm33b-broker -m 0755 "$broker_run"
  # The ACL and the password file are the operator's once made (meter-account
  # appends the meters): created only when absent, never replaced.
  if [ ! -e "$accounts/acl" ]; then
    install -m 0640 -g kpm33b-broker "$app/mosquitto/acl" "$accounts/acl"
  fi
  if [ ! -e "$accounts/passwd" ]; then
    install -m 0640 -g kpm33b-broker /dev/null "$accounts/passwd"
  fi
  make_daemon_account kpm33b-proxy
  make_daemon_account kpm33b-config-sender
  # The shipped configuration with only what differs in a container: the
  # accounts' place, stdout instead of syslog, the pid file meter-account
  # signals, and the user to drop to (it starts as root to read the files).
  sed -e "s|^password_file .*|password_file $accounts/passwd|" \
      -e "s|^acl_file .*|acl_file $accounts/acl|" \
      -e 's|^log_dest syslog$|log_dest stdout|' \
      "$app/mosquitto/internal.conf" > "$broker_run/internal.conf"
  printf 'pid_file %s\nuser kpm33b-broker\n' "$KPM33B_BROKER_PID_FILE" >> "$broker_run/internal.conf"
  exec mosquitto -c "$broker_run/internal.conf"
}

run_central_broker() {
  install -d -m 0755 "$broker_run"
  # mosquitto/central-dev.conf, listening on the container's network instead
  # of the loopback only; its port is published by compose.yaml.
  sed -e 's|^listener 11884 127.0.0.1$|listener 1883|' "$app/mosquitto/central-dev.conf" > "$broker_run/central.conf"
  exec mosquitto -c "$broker_run/central.conf"
}

run_daemon() {
  script=$1
  account=$daemon_accounts/secrets-${2}.env
  if [ ! -r "$site/config.yaml" ]; then
    say "no $site/config.yaml: copy config.yaml into the site directory compose.yaml mounts there (KPM33B_SITE, default ./site), then set internal_broker.host: broker and central_broker.host in it"
    exit 2
  fi
  # As the units' ExecStartPre= does: an invalid file is refused at once, one
  # line per problem, instead of after the wait for the account below.
  load_env_file "$site/secrets.env"
  refused=no
  "$app/venv/bin/python" "$app/$script" --config "$site/config.yaml" --check-config >/dev/null || refused=yes
  # A config.yaml made for a host names the internal broker 127.0.0.1 (also
  # its default), which in this container is the daemon itself: say what to
  # set rather than retry a connection that cannot work.
  internal_host=$("$app/venv/bin/python" - "$site/config.yaml" <<'EOF'
import sys

import yaml

try:
    with open(sys.argv[1], encoding="utf-8") as file:
        document = yaml.safe_load(file)
    print((document.get("internal_broker") or {}).get("host") or "127.0.0.1")
except Exception:  # not a readable mapping: --check-config above has said why
    print("")
EOF
)
  case $internal_host in
    127.*|localhost|::1)
      say "internal_broker.host is $internal_host in $site/config.yaml, which in a container is the container itself: set internal_broker.host: broker (the broker's service in compose.yaml)"
      refused=yes ;;
  esac
  [ "$refused" = no ] || exit 2
  # The broker makes the account on its first start: wait for it a little.
  waited=0
  while [ ! -r "$account" ]; do
    if [ "$waited" -ge 60 ]; then
      say "no internal broker account in $account after 60 s: is the broker container running?"
      exit 1
    fi
    [ "$waited" -eq 0 ] && say "waiting for the broker to create this daemon's account ($account)"
    sleep 1
    waited=$((waited + 1))
  done
  load_env_file "$account"
  exec setpriv --reuid=kpm33b --regid=kpm33b --init-groups -- \
    "$app/venv/bin/python" "$app/$script" --config "$site/config.yaml"
}

case "${1:-}" in
  broker) run_broker ;;
  central-broker) run_central_broker ;;
  proxy) run_daemon kpm33b_proxy.py proxy ;;
  config-sender) run_daemon config_sender.py config-sender ;;
  check-config) exec "$app/venv/bin/python" "$app/kpm33b_proxy.py" --config "$site/config.yaml" --check-config ;;
  "") say "usage: broker | proxy | config-sender | central-broker | check-config | <command>"; exit 2 ;;
  *) exec "$@" ;;
esac
