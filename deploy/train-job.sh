#!/usr/bin/env bash
# Submits a training run to a Ray cluster as a Ray job, follows its logs, and exits with the
# job's outcome (0 when it succeeded). The job's driver runs on the head node and trains on
# the cluster's workers with the sampler service's plans and the Redis loss store.
#
# Environment (defaults):
#   HARDBATCH_JOB_ADDRESS   the head's dashboard / job-submission URL (http://127.0.0.1:8265)
#   HARDBATCH_SERVICE_URL   the sampler service, as the cluster's nodes reach it (http://127.0.0.1:8000)
#   HARDBATCH_REDIS_URL     the loss store, as the cluster's nodes reach it (redis://127.0.0.1:6380/0)
#   HARDBATCH_RUN           run name, also the Ray submission id (hb-<time>)
#   HARDBATCH_TASK          task to train ("" = the built-in MNIST-1D task)
#   HARDBATCH_WORKERS       training workers (2)
#   HARDBATCH_PLACEMENT     PACK, SPREAD, STRICT_SPREAD or STRICT_PACK (SPREAD)
#   HARDBATCH_STORAGE       checkpoint folder every node can reach (/data/ray/storage)
#   HARDBATCH_OUT           where the driver writes metrics.json and plots (/data/ray/out/<run>)
#   HARDBATCH_TRAIN_ARGS    more `hardbatch train` options, e.g. "--epochs 5 --num-samples 8000"
#   HARDBATCH_WAIT_S        how long to wait for the job-submission server (180)
#   RAY_AUTH_TOKEN, RAY_AUTH_MODE   as for deploy/ray-head.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
hb_ray_auth
hb_check_secrets HARDBATCH_API_TOKEN HARDBATCH_REDIS_PASSWORD

address=${HARDBATCH_JOB_ADDRESS:-http://127.0.0.1:8265}
run=${HARDBATCH_RUN:-hb-$(date +%Y%m%d-%H%M%S)}
[[ $run =~ ^[A-Za-z0-9._-]+$ ]] || hb_die "HARDBATCH_RUN may only hold letters, digits and . _ -"

# The dashboard answers a while after the head's GCS does; submitting earlier fails.
limit=${HARDBATCH_WAIT_S:-180}
start=$SECONDS
until python -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/api/gcs_healthz", timeout=3)' "$address" 2>/dev/null; do
  (( SECONDS - start < limit )) || hb_die "no job-submission server at $address after ${limit}s"
  sleep 2
done

train=(hardbatch train --address auto
       --service "${HARDBATCH_SERVICE_URL:-http://127.0.0.1:8000}"
       --redis "${HARDBATCH_REDIS_URL:-redis://127.0.0.1:6380/0}"
       --run "$run"
       --workers "${HARDBATCH_WORKERS:-2}"
       --placement "${HARDBATCH_PLACEMENT:-SPREAD}"
       --storage "${HARDBATCH_STORAGE:-/data/ray/storage}"
       --out "${HARDBATCH_OUT:-/data/ray/out/$run}"
       --no-progress)
[[ -n ${HARDBATCH_TASK:-} ]] && train+=(--task "$HARDBATCH_TASK")
# Word-split on purpose: a list of options in one variable.
# shellcheck disable=SC2206
train+=(${HARDBATCH_TRAIN_ARGS:-})

hb_log "submitting run $run to $address: ${train[*]}"
# `ray job submit` quotes each word itself before its shell on the head runs them.
exec ray job submit --address "$address" --submission-id "$run" --entrypoint-num-cpus 0 \
  -- "${train[@]}"
