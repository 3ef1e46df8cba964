#!/usr/bin/env bash
# The Ray head node, in the foreground (`ray start --block`): stopping this PID stops the node
# and only this node (never use `ray stop`, which stops every Ray process on the machine).
#
# Environment (defaults):
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the cluster token (required unless RAY_AUTH_MODE=disabled)
#   RAY_AUTH_MODE              token or disabled (token)
#   HARDBATCH_RAY_PORT         GCS port that worker nodes join (6379)
#   HARDBATCH_DASHBOARD_HOST   dashboard and job-submission bind address (0.0.0.0)
#   HARDBATCH_DASHBOARD_PORT   dashboard and job-submission port (8265)
#   HARDBATCH_RAY_CLIENT_PORT  Ray Client port, for `hardbatch train --address ray://HOST:PORT` (10001)
#   HARDBATCH_NODE_IP          this node's address as other nodes see it (Ray's guess)
#   HARDBATCH_NUM_CPUS, HARDBATCH_NUM_GPUS, HARDBATCH_OBJECT_STORE_BYTES   node resources (Ray's guess)
#   HARDBATCH_METRICS_PORT     Prometheus metrics port of this node (random)
#   HARDBATCH_RAY_TEMP_DIR     Ray's session and log folder, one per node (/tmp/ray)
#   GLOO_SOCKET_IFNAME         interface for the workers' Gloo traffic (Gloo's guess)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
hb_ray_auth

args=(--head --port "${HARDBATCH_RAY_PORT:-6379}" --include-dashboard true
      --dashboard-host "${HARDBATCH_DASHBOARD_HOST:-0.0.0.0}"
      --dashboard-port "${HARDBATCH_DASHBOARD_PORT:-8265}"
      --ray-client-server-port "${HARDBATCH_RAY_CLIENT_PORT:-10001}")
hb_ray_node_args args
hb_log "ray head: ray start ${args[*]}"
exec ray start "${args[@]}"
