#!/usr/bin/env bash
# The sampler service (`hardbatch serve`): REST hardness queries and batch plans.
#
# Environment (defaults); every other HARDBATCH_* setting of services/core/config.py applies too:
#   HARDBATCH_HOST        address to listen on (0.0.0.0)
#   HARDBATCH_PORT        port (8000)
#   HARDBATCH_REDIS_URL   the loss store (redis://127.0.0.1:6380/0)
#   HARDBATCH_API_TOKEN   bearer token for state-changing endpoints (none: open); read from the
#                         environment only, so it never shows in the process list
#   HARDBATCH_LOG_LEVEL   critical, error, warning, info or debug (info)
#   HARDBATCH_WAIT_S      how long to wait for Redis to accept connections (120)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# Before waiting for Redis: a template's placeholder is an error now, not after the wait.
hb_check_secrets HARDBATCH_API_TOKEN HARDBATCH_REDIS_PASSWORD

export HARDBATCH_HOST=${HARDBATCH_HOST:-0.0.0.0}
export HARDBATCH_PORT=${HARDBATCH_PORT:-8000}
export HARDBATCH_REDIS_URL=${HARDBATCH_REDIS_URL:-redis://127.0.0.1:6380/0}
[[ $HARDBATCH_REDIS_URL == redis://* || $HARDBATCH_REDIS_URL == rediss://* ]] \
  || hb_die "HARDBATCH_REDIS_URL must be a redis:// or rediss:// URL (an embedded Redis would lose the table)"

# Redis may still be starting (compose waits for its healthcheck; other launchers do not).
hostport=${HARDBATCH_REDIS_URL#*://}
hostport=${hostport#*@}
hostport=${hostport%%/*}
[[ $hostport == *:* ]] || hostport=$hostport:6379
hb_split_hostport "$hostport"
hb_wait_tcp "$HB_HOST" "$HB_PORT" "${HARDBATCH_WAIT_S:-120}"

hb_log "sampler service on $HARDBATCH_HOST:$HARDBATCH_PORT, store at $HB_HOST:$HB_PORT"
exec hardbatch serve --log-level "${HARDBATCH_LOG_LEVEL:-info}"
