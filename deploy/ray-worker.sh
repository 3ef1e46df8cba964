#!/usr/bin/env bash
# A Ray worker node joining the head, in the foreground (`ray start --block`): stopping this PID
# stops this node only. Scale out by running more of them (docker-compose --scale ray-worker=3).
#
# Environment (defaults):
#   HARDBATCH_RAY_HEAD   the head's GCS address, HOST:PORT (ray-head:6379)
#   HARDBATCH_WAIT_S     how long to wait for the head to accept connections (120)
#   RAY_AUTH_TOKEN, RAY_AUTH_MODE, HARDBATCH_NODE_IP, HARDBATCH_NUM_CPUS, HARDBATCH_NUM_GPUS,
#   HARDBATCH_OBJECT_STORE_BYTES, HARDBATCH_METRICS_PORT, HARDBATCH_RAY_TEMP_DIR,
#   GLOO_SOCKET_IFNAME   as for deploy/ray-head.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
hb_ray_auth

head=${HARDBATCH_RAY_HEAD:-ray-head:6379}
hb_split_hostport "$head"
hb_wait_tcp "$HB_HOST" "$HB_PORT" "${HARDBATCH_WAIT_S:-120}"

args=(--address "$head")
hb_ray_node_args args
hb_log "ray worker: ray start ${args[*]}"
exec ray start "${args[@]}"
