#!/usr/bin/env bash
# Local multi-node Ray cluster on ONE machine: a head raylet plus N worker raylets, each with
# its own --temp-dir, so multi-node code paths (SPREAD placement, per-node runtime_env setup,
# shared storage_path, node loss) can be exercised without a cloud account.
#
#   clusters/local.sh up                 start head + workers; wait until every node is ALIVE
#   clusters/local.sh status             `ray status` for this cluster
#   clusters/local.sh submit [ARGS] [-- ENTRYPOINT...]
#                                        `ray job submit` with the repo root as working_dir;
#                                        no args: a trivial job that runs tasks on every node
#   clusters/local.sh down               stop exactly the processes `up` started
#   clusters/local.sh smoke              up + trivial job + down (teardown even on failure)
#
# Env knobs: NUM_WORKERS=1 HEAD_CPUS=1 WORKER_CPUS=1 GCS_PORT=6379 DASHBOARD_PORT=8265
#   CLIENT_PORT=10001 AGENT_PORT_BASE=52365 OBJECT_STORE_BYTES= (empty: Ray's default)
#   RAYOODKD_LOCAL_DIR=/tmp/rayoodkd-local START_TIMEOUT_S=180 HEAD_START_ATTEMPTS=2
#   RAY_AUTH_MODE=token (RAY_AUTH_MODE=disabled opts out of token auth)
#
# Why not `ray stop`: it kills EVERY Ray process on the machine (someone else's cluster, a
# pytest's ray.init()). Each node here is `ray start --block` in the background; SIGTERM to
# that one process tears down exactly the processes it spawned.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
STATE_DIR="${RAYOODKD_LOCAL_DIR:-/tmp/rayoodkd-local}"
STATE_FILE="$STATE_DIR/cluster.env"

NUM_WORKERS="${NUM_WORKERS:-1}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
# Ray Client cannot be switched off when its deps are installed; give it a port that does
# not collide with another head on this machine (it must lie outside 10002-19999, Ray's
# default worker port range).
CLIENT_PORT="${CLIENT_PORT:-10001}"
# Every raylet on a host needs its own dashboard-agent HTTP port: the default 52365 is
# fixed, and a clash silently disables that node's agent HTTP server. The other per-node
# ports (node manager, object manager, metrics, runtime-env agent) are random by default.
AGENT_PORT_BASE="${AGENT_PORT_BASE:-52365}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-}"
START_TIMEOUT_S="${START_TIMEOUT_S:-180}"
# On a loaded machine the head's ray_client_server can give up (fixed 30 s wait for its
# raylet), and `--block` then stops the whole head; a second attempt normally succeeds.
HEAD_START_ATTEMPTS="${HEAD_START_ATTEMPTS:-2}"

# Token auth stays on (Ray 2.60's default for local clusters). Every `ray` call below and
# the job's driver inherit this; a client elsewhere needs the same mode and token.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

log() { printf '[local.sh] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# One EXIT trap for the whole script: `up` tears down on failure, `smoke` always does.
TEARDOWN_ON_FAILURE=0
TEARDOWN_ALWAYS=0
on_exit() {
  local rc=$?
  if ((TEARDOWN_ALWAYS)) || { ((TEARDOWN_ON_FAILURE)) && ((rc != 0)); }; then
    ((rc == 0)) || log "failed (exit $rc); tearing down"
    cmd_down || true
  fi
  exit "$rc"
}
trap on_exit EXIT

load_state() {
  # Later commands reuse the ports `up` used, even if the environment changed since.
  if [[ -f "$STATE_FILE" ]]; then
    # shellcheck disable=SC1090
    source "$STATE_FILE"
  fi
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

node_pid() { cat "$STATE_DIR/$1.pid" 2>/dev/null || true; }

running_pids() {
  local f pid
  for f in "$STATE_DIR"/*.pid; do
    [[ -e "$f" ]] || continue
    pid="$(cat "$f")"
    if pid_alive "$pid"; then echo "$pid"; fi
  done
}

alive_node_count() {
  # Number of node lines under "Active:" in `ray status`; 0 if the GCS is unreachable.
  ray status --address="127.0.0.1:$GCS_PORT" 2>/dev/null |
    awk '/^Active:/{a=1;next} /^Pending:/{a=0} a && $2 ~ /^node_/{n++} END{print n+0}'
}

nodes_at_least() { [[ "$(alive_node_count)" -ge "$1" ]]; }

jobs_api_ready() { ray job list --address="http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1; }

ensure_token() {
  [[ "$RAY_AUTH_MODE" == "token" ]] || return 0
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    log "no auth token found; generating ~/.ray/auth_token"
    (umask 077 && ray get-auth-token --generate >/dev/null)
  fi
  # `ray get-auth-token --generate` writes the file world-readable; it is a shared secret.
  if [[ -f "$HOME/.ray/auth_token" ]]; then chmod 600 "$HOME/.ray/auth_token" || true; fi
}

start_node() {
  # start_node NAME ARGS... : `ray start --block ARGS` in the background; pid in NAME.pid.
  local name="$1"
  shift
  mkdir -p "$STATE_DIR/$name"
  nohup ray start --block --disable-usage-stats --temp-dir="$STATE_DIR/$name" "$@" \
    >"$STATE_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/$name.pid"
}

stop_node() {
  # stop_node NAME : SIGTERM the node's `ray start --block`, SIGKILL after 60 s.
  local name="$1" pid deadline
  pid="$(node_pid "$name")"
  if pid_alive "$pid"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 60))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 1; done
    if pid_alive "$pid"; then
      log "$name still running after 60 s; SIGKILL pid $pid"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$STATE_DIR/$name.pid"
}

wait_for() {
  # wait_for NAME CMD... : poll CMD until it succeeds; fail if node NAME or the head dies,
  # or after START_TIMEOUT_S.
  local name="$1" n deadline=$((SECONDS + START_TIMEOUT_S))
  shift
  until "$@"; do
    for n in "$name" head; do
      if ! pid_alive "$(node_pid "$n")"; then
        log "$n exited while waiting for $name; last lines of $STATE_DIR/$n.log:"
        tail -n 15 "$STATE_DIR/$n.log" >&2 || true
        return 1
      fi
    done
    if ((SECONDS >= deadline)); then
      log "$name not ready after ${START_TIMEOUT_S}s (see $STATE_DIR/$name.log)"
      return 1
    fi
    sleep 2
  done
}

cmd_up() {
  [[ -z "$(running_pids)" ]] || die "a cluster from $STATE_DIR is already running; run '$0 down' first"
  command -v ray >/dev/null || die "'ray' is not on PATH (activate the venv: . .venv/bin/activate)"
  rm -rf "$STATE_DIR"
  mkdir -p "$STATE_DIR"
  printf 'GCS_PORT=%s\nDASHBOARD_PORT=%s\n' "$GCS_PORT" "$DASHBOARD_PORT" >"$STATE_FILE"
  ensure_token
  TEARDOWN_ON_FAILURE=1 # from here on, any failure tears down what was started

  local store_args=() attempt i
  [[ -z "$OBJECT_STORE_BYTES" ]] || store_args=(--object-store-memory="$OBJECT_STORE_BYTES")

  for ((attempt = 1; ; attempt++)); do
    log "starting head (attempt $attempt): GCS 127.0.0.1:$GCS_PORT," \
      "dashboard http://127.0.0.1:$DASHBOARD_PORT, CPUs=$HEAD_CPUS"
    start_node head --head --port="$GCS_PORT" --dashboard-port="$DASHBOARD_PORT" \
      --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT_BASE" \
      --num-cpus="$HEAD_CPUS" "${store_args[@]}"
    if wait_for head nodes_at_least 1 && wait_for head jobs_api_ready; then break; fi
    ((attempt < HEAD_START_ATTEMPTS)) || return 1
    stop_node head
  done

  for ((i = 1; i <= NUM_WORKERS; i++)); do
    log "starting worker-$i: CPUs=$WORKER_CPUS, agent port $((AGENT_PORT_BASE + i))"
    start_node "worker-$i" --address="127.0.0.1:$GCS_PORT" \
      --dashboard-agent-listen-port="$((AGENT_PORT_BASE + i))" --num-cpus="$WORKER_CPUS" \
      "${store_args[@]}"
  done
  for ((i = 1; i <= NUM_WORKERS; i++)); do
    wait_for "worker-$i" nodes_at_least $((1 + i))
  done

  TEARDOWN_ON_FAILURE=0
  log "cluster up after ${SECONDS}s: $(alive_node_count) nodes alive;" \
    "dashboard http://127.0.0.1:$DASHBOARD_PORT"
  log "submit with: $0 submit -- python -m rayoodkd.train --config PRESET key=value ..."
}

cmd_status() {
  load_state
  ray status --address="127.0.0.1:$GCS_PORT"
}

cmd_submit() {
  load_state
  [[ -n "$(running_pids)" ]] || die "no cluster running from $STATE_DIR; run '$0 up' first"
  if (($# == 0)); then
    # Default job: the driver reaches the cluster and tasks land on every node.
    set -- -- python -c 'import ray
ray.init()
print("cluster_resources:", ray.cluster_resources())
f = ray.remote(num_cpus=0.1)(lambda: ray.get_runtime_context().get_node_id())
ids = ray.get([f.options(scheduling_strategy="SPREAD").remote() for _ in range(16)])
print("distinct nodes that ran tasks:", len(set(ids)), "of", len(ray.nodes()))'
  fi
  # The repo root is the working_dir: it becomes the job's cwd and sys.path root, so
  # `python -m rayoodkd...` works; .gitignore'd paths (.venv, runs/, mlruns/) stay local.
  ray job submit --address="http://127.0.0.1:$DASHBOARD_PORT" --working-dir="$REPO_ROOT" "$@"
}

cmd_down() {
  load_state
  local f stray
  # Workers first, head last, so the head does not report every worker as lost.
  for f in "$STATE_DIR"/worker-*.pid; do
    [[ -e "$f" ]] && stop_node "$(basename "$f" .pid)"
  done
  stop_node head
  # Stragglers: only processes whose command line names this cluster's temp dirs.
  stray="$(pgrep -f -- "--temp-dir=$STATE_DIR/|$STATE_DIR/(head|worker-[0-9]+)/session_" || true)"
  if [[ -n "$stray" ]]; then
    log "killing leftover processes of this cluster: $(echo "$stray" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -TERM $stray 2>/dev/null || true
  fi
  log "down"
}

cmd_smoke() {
  TEARDOWN_ALWAYS=1
  cmd_up
  cmd_submit
}

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
  up | status | submit | down | smoke)
    cmd="$1"
    shift
    "cmd_$cmd" "$@"
    ;;
  -h | --help | help | "") usage ;;
  *)
    usage
    die "unknown command: $1"
    ;;
esac
