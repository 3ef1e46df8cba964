#!/usr/bin/env bash
# Writes the env file docker-compose gives every container (deploy/hardbatch.env by default):
# a fresh Ray cluster token, sampler API token and Redis password. Refuses to overwrite an
# existing file.
#
#   deploy/make-env.sh [PATH]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

file=${1:-$(dirname "$0")/hardbatch.env}
[[ -e $file ]] && hb_die "$file exists; delete it first to make new tokens"
token() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
cat > "$file" <<ENV
# Made by deploy/make-env.sh. Secrets: keep this file out of version control and images.
# Ray token auth: every node, driver and \`ray\` command of the cluster needs the same token.
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(token)
# Bearer token of the sampler service's state-changing endpoints (plans, plan configs).
HARDBATCH_API_TOKEN=$(token)
# Password of the loss store's Redis (requirepass, protected mode on). Every hardbatch client
# fills it into redis:// URLs that name none, so URLs elsewhere carry no secret.
HARDBATCH_REDIS_PASSWORD=$(token)
ENV
hb_log "wrote $file"
