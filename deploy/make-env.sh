#!/usr/bin/env bash
# Writes the env file docker-compose gives every container (deploy/hardbatch.env by default):
# a fresh Ray cluster token and sampler API token. Refuses to overwrite an existing file.
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
ENV
hb_log "wrote $file"
