# Helpers sourced by the deploy/ entrypoints (docker-compose, the cluster launcher, KubeRay and
# the multi-node namespace test all run those entrypoints). Defines functions only.
#
# Tools come from PATH (`python`, `ray`, `hardbatch`): the image puts its virtualenv first on
# PATH, and a checkout does the same with `PATH=.venv/bin:$PATH`.

hb_log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }

hb_die() {
  hb_log "error: $*"
  exit 2
}

# Dies if any of the variables named is set but empty, or still holds a template's placeholder
# (deploy/k8s/secret.yaml's REPLACE-WITH-..., deploy/hardbatch.env.example's <...>, change-me):
# the patterns of services/core/secrets.py. Unset ones are left to the caller (some are optional).
hb_check_secrets() {
  local name value lower
  local make_env="run deploy/make-env.sh (it writes deploy/hardbatch.env with random values)"
  local secret="fill the Kubernetes Secret hardbatch-tokens with random values (deploy/k8s/secret.yaml says how)"
  for name in "$@"; do
    [[ -v $name ]] || continue
    value=${!name} lower=${!name,,}
    if [[ -z ${value//[[:space:]]/} ]]; then
      hb_die "$name is set but empty: unset it, or $make_env; on Kubernetes, $secret"
    elif [[ $lower == *replace-with* || $lower == *replacewith* ]]; then
      hb_die "$name holds the placeholder '$value' of deploy/k8s/secret.yaml: $secret," \
             "never the template as is"
    elif [[ $value == \<*\> ]]; then
      hb_die "$name holds the placeholder '$value' of deploy/hardbatch.env.example: $make_env," \
             "instead of copying the example"
    elif [[ $lower == *change-me* || $lower == *changeme* ]]; then
      hb_die "$name holds the placeholder '$value': edit the file it came from; $make_env," \
             "or on Kubernetes $secret"
    fi
  done
}

# Ray 2.60 turns token auth on by default, and the mode must agree between `ray start`, every
# node and every driver, so make it explicit: token mode unless RAY_AUTH_MODE says otherwise,
# with the token given to every process through the environment (never generated here: the
# nodes of a cluster must share one).
hb_ray_auth() {
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [[ $RAY_AUTH_MODE == token ]]; then
    hb_check_secrets RAY_AUTH_TOKEN
    if [[ -z ${RAY_AUTH_TOKEN:-} && ! -r ${RAY_AUTH_TOKEN_PATH:-/nonexistent} \
          && ! -r ${HOME:-/nonexistent}/.ray/auth_token ]]; then
      hb_die "Ray token auth is on but no token was given: set RAY_AUTH_TOKEN (deploy/make-env.sh" \
             "writes one) or RAY_AUTH_TOKEN_PATH, the same on every node and client, or set" \
             "RAY_AUTH_MODE=disabled on all of them"
    fi
  fi
  # Telemetry off: clusters here are often offline, and nobody asked for it.
  export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
}

# The `ray start` options both node kinds share, appended to the array named by $1.
hb_ray_node_args() {
  local -n _hb_args=$1
  _hb_args+=(--block --disable-usage-stats --temp-dir "${HARDBATCH_RAY_TEMP_DIR:-/tmp/ray}")
  [[ -n ${HARDBATCH_NODE_IP:-} ]] && _hb_args+=(--node-ip-address "$HARDBATCH_NODE_IP")
  [[ -n ${HARDBATCH_NUM_CPUS:-} ]] && _hb_args+=(--num-cpus "$HARDBATCH_NUM_CPUS")
  [[ -n ${HARDBATCH_NUM_GPUS:-} ]] && _hb_args+=(--num-gpus "$HARDBATCH_NUM_GPUS")
  [[ -n ${HARDBATCH_OBJECT_STORE_BYTES:-} ]] \
    && _hb_args+=(--object-store-memory "$HARDBATCH_OBJECT_STORE_BYTES")
  [[ -n ${HARDBATCH_METRICS_PORT:-} ]] && _hb_args+=(--metrics-export-port "$HARDBATCH_METRICS_PORT")
  return 0
}

# Waits until HOST:PORT accepts TCP connections, or dies after $3 seconds (default 120).
hb_wait_tcp() {
  local host=$1 port=$2 limit=${3:-120} start=$SECONDS
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    (( SECONDS - start < limit )) || hb_die "nothing listens on $host:$port after ${limit}s"
    sleep 1
  done
}

# Splits "HOST:PORT" into the globals HB_HOST and HB_PORT.
hb_split_hostport() {
  [[ $1 == *:* ]] || hb_die "expected HOST:PORT, got '$1'"
  # Globals the caller reads.
  # shellcheck disable=SC2034
  HB_HOST=${1%:*} HB_PORT=${1##*:}
}
