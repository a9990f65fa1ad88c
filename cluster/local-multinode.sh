#!/usr/bin/env bash
# A two-node Ray cluster on one machine (a head and a second node), for trying metapeft_ray's
# distributed code paths without a cloud account.
#
#   cluster/local-multinode.sh start     # start the head, then the second node
#   cluster/local-multinode.sh status    # `ray status` against this cluster
#   cluster/local-multinode.sh stop      # stop only the processes this script started
#
# Then, with the same RAY_AUTH_MODE (and token) in the client's environment:
#   ray job submit --address http://127.0.0.1:8266 -- metapeft train --config quickstart
#   RAY_ADDRESS="$(cat /tmp/metapeft-ray-$UID/address)" metapeft train --config quickstart
#
# Settings (environment variables, defaults in brackets):
#   METAPEFT_LOCAL_DIR      state: process-group files, logs, a --temp-dir per node
#                           [/tmp/metapeft-ray-$UID]
#   HEAD_PORT               GCS port of the head [6389]
#   DASHBOARD_PORT          dashboard / job API port [8266]
#   HEAD_METRICS_PORT       --metrics-export-port of the head [8080]
#   NODE2_METRICS_PORT      --metrics-export-port of the second node [8081]
#   HEAD_AGENT_PORT         --dashboard-agent-listen-port of the head [52365, Ray's default]
#   NODE2_AGENT_PORT        --dashboard-agent-listen-port of the second node [52366]
#   CLIENT_PORT             --ray-client-server-port of the head [10001, Ray's default]
#   NUM_CPUS                --num-cpus of each node [1]
#   OBJECT_STORE_MEMORY     --object-store-memory of each node, bytes [268435456]
#   START_TIMEOUT           seconds allowed to each `ray start` [120]
#   STOP_GRACE              seconds between SIGTERM and SIGKILL on `stop` [10]
#   RAY, PYTHON             the ray executable [ray] and the Python beside it
#   RAY_AUTH_MODE           Ray token authentication (Ray >= 2.52) [token]
#       token     every node and every client needs the same token: RAY_AUTH_TOKEN, or the
#                 file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (created here with
#                 `ray get-auth-token --generate` when none of them exists). Clients (ray job
#                 submit, ray.init) must run with RAY_AUTH_MODE=token too.
#       disabled  no authentication: only on a machine whose Ray ports nobody else can reach
#                 (Ray binds to the machine's own address, not 127.0.0.1).
#
# Each node runs in its own process group, recorded in $METAPEFT_LOCAL_DIR/<node>.pgid; `stop`
# signals those groups and their descendants only. The script never runs `ray stop`, which
# would stop every Ray process of this user on the machine, including clusters it did not start.
set -euo pipefail

STATE_DIR="${METAPEFT_LOCAL_DIR:-/tmp/metapeft-ray-$(id -u)}"
HEAD_PORT="${HEAD_PORT:-6389}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8266}"
HEAD_METRICS_PORT="${HEAD_METRICS_PORT:-8080}"
NODE2_METRICS_PORT="${NODE2_METRICS_PORT:-8081}"
HEAD_AGENT_PORT="${HEAD_AGENT_PORT:-52365}"
NODE2_AGENT_PORT="${NODE2_AGENT_PORT:-52366}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
NUM_CPUS="${NUM_CPUS:-1}"
OBJECT_STORE_MEMORY="${OBJECT_STORE_MEMORY:-268435456}"
START_TIMEOUT="${START_TIMEOUT:-120}"
STOP_GRACE="${STOP_GRACE:-10}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

RAY="${RAY:-ray}"

log() { printf '[local-multinode] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

pgid_file() { printf '%s/%s.pgid' "$STATE_DIR" "$1"; }

# The process-group id recorded for node $1, if its group still has members that belong to this
# script's cluster (the check on the --temp-dir guards against a recycled group id).
node_pgid() {
  local node="$1" file pgid
  file="$(pgid_file "$node")"
  [[ -f "$file" ]] || return 1
  pgid="$(<"$file")"
  [[ "$pgid" =~ ^[0-9]+$ ]] || return 1
  ps -eo pgid=,args= | awk -v g="$pgid" -v dir="$STATE_DIR/$node/" \
    '$1 == g && index($0, dir) { found = 1 } END { exit !found }' || return 1
  printf '%s\n' "$pgid"
}

# The members of process group $1 and all their descendants: Ray's raylet puts the worker
# processes it spawns into process groups of their own.
group_and_descendants() {
  ps -eo pid=,ppid=,pgid= | awk -v g="$1" '
    { pid[NR] = $1; ppid[NR] = $2; if ($3 == g) mine[$1] = 1 }
    END {
      do {
        grew = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; grew = 1 }
      } while (grew)
      for (p in mine) print p
    }'
}

# Runs `ray start ARGS...` for node $1 in a new session (so a new process group) under
# `timeout`, and records the group id. The Ray daemons stay in that group after `ray start`
# returns, which is what lets `stop` reach them and nothing else.
start_node() {
  local node="$1"; shift
  local temp_dir="$STATE_DIR/$node" file
  file="$(pgid_file "$node")"
  if node_pgid "$node" >/dev/null; then
    die "$node is already running (process group $(<"$file")); run '$0 stop' first"
  fi
  mkdir -p "$temp_dir"
  log "starting $node (temp dir $temp_dir)"
  # In the new session, bash's PID is the session and process-group id; `exec` keeps it for
  # `timeout`, whose children (ray start and the daemons it spawns) inherit the group.
  setsid bash -c 'echo "$$" > "$1"; shift; exec "$@"' _ "$file" \
    timeout "$START_TIMEOUT" "$RAY" start --temp-dir="$temp_dir" \
      --num-cpus="$NUM_CPUS" --object-store-memory="$OBJECT_STORE_MEMORY" --disable-usage-stats \
      "$@" >"$STATE_DIR/$node.start.log" 2>&1 \
    || { log "$node failed to start; see $STATE_DIR/$node.start.log"; cmd_stop; exit 1; }
}

# True if any of the PIDs is a live process (zombies do not count).
any_running() {
  local states
  states="$(ps -o stat= -p "$(IFS=,; printf '%s' "$*")" 2>/dev/null || true)"
  grep -q '^[^Z]' <<<"$states"
}

# SIGTERM to the node's process group and its descendants, SIGKILL to whatever of them is left
# after a grace period (gcs_server may ignore SIGTERM).
stop_node() {
  local node="$1" file pgid pids pid
  file="$(pgid_file "$node")"
  [[ -f "$file" ]] || return 0
  if pgid="$(node_pgid "$node")"; then
    log "stopping $node (process group $pgid)"
    mapfile -t pids < <(group_and_descendants "$pgid")
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 "$((STOP_GRACE * 2))"); do
      any_running "${pids[@]}" || break
      sleep 0.5
    done
    for pid in "${pids[@]}"; do
      # Skip a PID that has meanwhile been reused by a process outside this node.
      if [[ -d "/proc/$pid" ]] && grep -qF -- "$STATE_DIR/$node/" "/proc/$pid/cmdline" 2>/dev/null \
        || [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pgid" ]]; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  else
    log "$node: recorded process group is gone or not ours; nothing to stop"
  fi
  rm -f "$file"
}

ensure_token() {
  [[ "$RAY_AUTH_MODE" == token ]] || return 0
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    log "RAY_AUTH_MODE=token and no token found: generating ~/.ray/auth_token"
    "$RAY" get-auth-token --generate >/dev/null
  fi
}

# The address Ray binds to (on Linux the machine's own address, not 127.0.0.1), computed by the
# Python interpreter that sits next to the `ray` executable.
head_ip() {
  local python="${PYTHON:-$(dirname "$(command -v "$RAY")")/python}"
  "$python" -c 'import ray.util; print(ray.util.get_node_ip_address())'
}

cmd_start() {
  command -v "$RAY" >/dev/null || die "'$RAY' not found; activate the environment with Ray installed"
  mkdir -p "$STATE_DIR"
  ensure_token
  local address
  address="$(head_ip):$HEAD_PORT"
  start_node head --head --port="$HEAD_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$HEAD_AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --metrics-export-port="$HEAD_METRICS_PORT"
  start_node node2 --address="$address" \
    --dashboard-agent-listen-port="$NODE2_AGENT_PORT" \
    --metrics-export-port="$NODE2_METRICS_PORT"
  printf '%s\n' "$address" >"$STATE_DIR/address"
  log "cluster up: GCS $address, dashboard http://127.0.0.1:$DASHBOARD_PORT (RAY_AUTH_MODE=$RAY_AUTH_MODE)"
  log "metrics: :$HEAD_METRICS_PORT/metrics and :$NODE2_METRICS_PORT/metrics; Prometheus file_sd:" \
    "$STATE_DIR/head/prom_metrics_service_discovery.json"
}

cmd_stop() {
  # The second node first, so the head sees an orderly departure.
  stop_node node2
  stop_node head
  rm -f "$STATE_DIR/address"
}

cmd_status() {
  [[ -f "$STATE_DIR/address" ]] || die "not running (no $STATE_DIR/address)"
  timeout 30 "$RAY" status --address="$(<"$STATE_DIR/address")"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) printf 'usage: %s start|stop|status\n' "$0" >&2; exit 2 ;;
esac
