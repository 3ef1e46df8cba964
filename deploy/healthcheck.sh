#!/usr/bin/env bash
# Exits 0 when the named component answers: `deploy/healthcheck.sh redis|sampler|ray-head`.
# docker-compose healthchecks and the multi-node namespace test both use it. Reads the same
# environment as the matching entrypoint.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

case ${1:-} in
  redis)
    # A PING through the same client library the service uses (and the same password).
    host=${HARDBATCH_REDIS_BIND:-0.0.0.0}
    [[ $host == 0.0.0.0 ]] && host=127.0.0.1
    exec python - "$host" "${HARDBATCH_REDIS_PORT:-6380}" <<'PY'
import os, sys, redis
r = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), socket_timeout=3,
                password=os.environ.get("HARDBATCH_REDIS_PASSWORD") or None)
sys.exit(0 if r.ping() else 1)
PY
    ;;
  sampler)
    # Ready = the service is up and its Redis answers.
    host=${HARDBATCH_HOST:-0.0.0.0}
    [[ $host == 0.0.0.0 ]] && host=127.0.0.1
    exec python - "http://$host:${HARDBATCH_PORT:-8000}/readyz" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    ;;
  ray-head)
    # The GCS answers and the dashboard (which takes job submissions) is up.
    host=${HARDBATCH_NODE_IP:-127.0.0.1}
    hb_wait_tcp "$host" "${HARDBATCH_RAY_PORT:-6379}" 1
    exec python - "http://$host:${HARDBATCH_DASHBOARD_PORT:-8265}/api/gcs_healthz" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    ;;
  *)
    hb_die "usage: $0 redis|sampler|ray-head"
    ;;
esac
