#!/usr/bin/env bash
# Simulate a multi-node Ray cluster on ONE machine: a head plus N worker "nodes", each its own
# raylet with 1 CPU and its own custom resource (node_head, node_worker_1, ...), so code that spreads
# work across nodes (Train workers, Data actor pools, Serve replicas) can be exercised on a laptop.
#
#   cluster/local-multinode.sh up [--workers N] [--port P] [--dir DIR] ...   # prints `export ...` lines
#   eval "$(cluster/local-multinode.sh up --workers 2)"                      # ... into this shell
#   eval "$(cluster/local-multinode.sh up --workers 2 --s3)"                 # + a local S3 server
#   cluster/local-multinode.sh status [--port P | --dir DIR]
#   cluster/local-multinode.sh down   [--port P | --dir DIR] [--keep-dir]
#   cluster/local-multinode.sh kill worker_N [--port P | --dir DIR]   # a fault drill: lose a node
#
# Every node is one `ray start --block` process whose pid is recorded under DIR/pids; `down` stops
# exactly those (and their children), never `ray stop`, which kills every Ray process on the machine,
# including a local `ray.init()` cluster that another program or test may be using.
#
# Ray 2.60 token authentication: a plain `ray.init()` enables it by default and `ray start --head`
# enables it when it finds a token (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), but
# `ray start --address=...` (an extra node) and `ray.init(address=...)` never auto-enable it: they
# follow RAY_AUTH_MODE only, which defaults to disabled. Sharing the head's --temp-dir does not help.
# So this script sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=DIR/auth_token (a fresh token per
# cluster) for every node, and prints both for your drivers. RAY_AUTH_MODE=disabled in the caller's
# environment opts out.
#
# --s3 also starts a local S3-compatible server (moto, from the project's dev dependencies) on
# 127.0.0.1 and gives every node its endpoint and throwaway credentials in the node's environment,
# the way a cloud node gets an instance role: jobs resolve them themselves, nothing passes them
# around. The same variables are printed for your drivers; `down` stops the server too.
#
# Addresses: every address this script passes is 127.0.0.1. Ray on Linux still advertises the
# machine's primary IP as the node IP (services.resolve_ip_for_localhost rewrites loopback) and its
# gRPC servers listen on all interfaces; the token is what keeps other hosts out.
set -euo pipefail

SCRIPT_NAME=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
MARKER=.recsys-ray-local   # `down` deletes DIR only if `up` created this file in it

usage() {
    cat <<EOF
usage: $SCRIPT_NAME up|status|down [options]
       $SCRIPT_NAME kill worker_N [options]   (SIGKILL that node's every process at once, as when
                                              a machine is lost; the head is refused: use down)

options:
  --workers N            extra worker nodes (up; default 1)
  --port P               head GCS port (default 26379; other ports derive from it)
  --dashboard-port P     dashboard / job API port (default P+1)
  --client-port P        Ray client server port (default P+2)
  --dir DIR              cluster dir: token, pids, logs, Ray's temp dir DIR/ray (default /tmp/recsys-ray-P)
  --cpus-per-node C      CPUs each node advertises (default 1)
  --gpus-per-worker G    GPUs each worker node advertises (default 0; the head never gets one)
  --object-store-mb M    object store per node in MiB (default 512)
  --timeout S            seconds to wait for the cluster to come up (default 90)
  --keep-dir             down: keep DIR (logs) instead of deleting it
  --s3                   up: also start a local S3 server (moto) on 127.0.0.1 for the nodes
  --s3-port P            its port (default P+3)

env: RAY_BIN (ray executable), PYTHON (interpreter with ray), RAY_AUTH_MODE=disabled (no token)
EOF
}

log() { echo "[$SCRIPT_NAME] $*" >&2; }
die() { log "error: $*"; exit 1; }

CMD=${1:-}
[[ -n "$CMD" ]] || { usage >&2; exit 2; }
shift
NODE=""
if [[ "$CMD" == kill ]]; then
    NODE=${1:-}
    [[ "$NODE" =~ ^worker_[0-9]+$ ]] || die "kill needs a worker node name (worker_1, worker_2, ...), got '${NODE}'"
    shift
fi

WORKERS=1
PORT=26379
DASH_PORT=""
CLIENT_PORT=""
DIR=""
CPUS=1
GPUS=0
OBJ_MB=512
TIMEOUT=90
KEEP_DIR=0
S3=0
S3_PORT=""

need_int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 needs a non-negative integer, got '$2'"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) need_int "$1" "${2:-}"; WORKERS=$2; shift 2 ;;
        --port) need_int "$1" "${2:-}"; PORT=$2; shift 2 ;;
        --dashboard-port) need_int "$1" "${2:-}"; DASH_PORT=$2; shift 2 ;;
        --client-port) need_int "$1" "${2:-}"; CLIENT_PORT=$2; shift 2 ;;
        --dir) [[ -n "${2:-}" ]] || die "--dir needs a path"; DIR=$2; shift 2 ;;
        --cpus-per-node) need_int "$1" "${2:-}"; CPUS=$2; shift 2 ;;
        --gpus-per-worker) need_int "$1" "${2:-}"; GPUS=$2; shift 2 ;;
        --object-store-mb) need_int "$1" "${2:-}"; OBJ_MB=$2; shift 2 ;;
        --timeout) need_int "$1" "${2:-}"; TIMEOUT=$2; shift 2 ;;
        --keep-dir) KEEP_DIR=1; shift ;;
        --s3) S3=1; shift ;;
        --s3-port) need_int "$1" "${2:-}"; S3_PORT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

DASH_PORT=${DASH_PORT:-$((PORT + 1))}
CLIENT_PORT=${CLIENT_PORT:-$((PORT + 2))}
S3_PORT=${S3_PORT:-$((PORT + 3))}
DIR=${DIR:-/tmp/recsys-ray-$PORT}
[[ "$DIR" = /* ]] || DIR="$PWD/$DIR"
DIR=${DIR%/}
# Ray's temp dir sits inside DIR: Ray makes its temp dir world-writable (0777), while DIR stays 0700,
# so other local users can neither reach this cluster's sockets nor swap its token file.
RAY_TMP="$DIR/ray"
# Ray puts unix sockets under RAY_TMP/session_<timestamp>_<pid>/sockets/; Linux caps a socket path
# at 107 bytes, so a long DIR fails late and obscurely inside the raylet. Fail here instead.
[[ ${#DIR} -le 36 ]] || die "--dir '$DIR' is ${#DIR} chars; use one of at most 36 (unix socket path limit)"

find_ray() {
    if [[ -n "${RAY_BIN:-}" ]]; then
        echo "$RAY_BIN"
    elif command -v ray >/dev/null 2>&1; then
        command -v ray
    elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
        echo "$REPO_ROOT/.venv/bin/ray"
    else
        die "no 'ray' executable: activate the project's virtualenv or set RAY_BIN"
    fi
}

RAY=$(find_ray) || exit 1
[[ -x "$RAY" ]] || die "'$RAY' is not an executable ray (set RAY_BIN)"
# The interpreter next to `ray` is the one that has it installed.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$(dirname "$RAY")/python" ]]; then PYTHON="$(dirname "$RAY")/python"; else PYTHON=python3; fi
fi

node_names() {  # head first, then workers in start order
    [[ -d "$DIR/pids" ]] || return 0
    [[ -f "$DIR/pids/head.pid" ]] && echo head
    local f
    for f in $(ls "$DIR/pids" 2>/dev/null | grep -E '^worker_[0-9]+\.pid$' | sort -t_ -k2 -n); do
        echo "${f%.pid}"
    done
}

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }
# Fields of /proc/PID/stat after "(comm) " (comm itself may contain spaces): 1 = state,
# 20 = start time in clock ticks since boot. Empty if the process is gone.
stat_field() {
    local stat n=$2
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    local -a fields=(${stat##*) })
    echo "${fields[n - 1]:-}"
}
# A zombie has exited; only its parent's wait() is missing (kill -0 still succeeds on it).
is_alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null && [[ "$(stat_field "$1" 1)" != Z ]]; }
# Start time guards against killing a recycled pid later.
start_time() { if is_alive "$1"; then stat_field "$1" 20; fi; }

# The given pids plus all their descendants, as "pid starttime" lines.
process_tree() {
    local roots="$*"
    ps -eo pid=,ppid= | awk -v roots="$roots" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            changed = 1
            while (changed) {
                changed = 0
                for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
            }
            for (p in keep) print p
        }' | while read -r p; do
        local st
        st=$(start_time "$p")
        if [[ -n "$st" ]]; then echo "$p $st"; fi
    done
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Wait until a node's `ray start --block` log says the runtime started; fail if its process dies.
wait_started() {
    local name=$1 pid=$2 deadline=$((SECONDS + TIMEOUT))
    until grep -q "Ray runtime started" "$DIR/logs/$name.log" 2>/dev/null; do
        if ! is_alive "$pid"; then
            tail -n 20 "$DIR/logs/$name.log" >&2 || true
            return 1
        fi
        if ((SECONDS > deadline)); then
            log "$name did not start within ${TIMEOUT}s (log: $DIR/logs/$name.log)"
            return 1
        fi
        sleep 0.3
    done
}

setup_auth_env() {
    unset RAY_ADDRESS
    if [[ "${RAY_AUTH_MODE:-token}" == disabled ]]; then
        log "RAY_AUTH_MODE=disabled: starting WITHOUT token authentication"
        export RAY_AUTH_MODE=disabled
        unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
        return
    fi
    # RAY_AUTH_TOKEN outranks RAY_AUTH_TOKEN_PATH in Ray's lookup; drop it so this cluster's token wins.
    unset RAY_AUTH_TOKEN
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
}

# The local S3 server: moto, its state in memory, on loopback only; throwaway credentials.
start_s3() {
    "$PYTHON" -c "import moto.server" 2>/dev/null || die "--s3 needs moto (pip install 'moto[server]', a dev dependency)"
    port_in_use "$S3_PORT" && die "port $S3_PORT on 127.0.0.1 is in use; pick another --s3-port"
    setsid "$PYTHON" -m moto.server -H 127.0.0.1 -p "$S3_PORT" </dev/null >"$DIR/logs/s3.log" 2>&1 &
    echo $! >"$DIR/pids/s3.pid"
    local deadline=$((SECONDS + TIMEOUT))
    until port_in_use "$S3_PORT"; do
        is_alive "$(cat "$DIR/pids/s3.pid")" || { tail -n 20 "$DIR/logs/s3.log" >&2; die "the S3 server exited"; }
        ((SECONDS < deadline)) || die "the S3 server did not listen on $S3_PORT within ${TIMEOUT}s"
        sleep 0.2
    done
    export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_DEFAULT_REGION=us-east-1
    export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
    unset AWS_ENDPOINT_URL_S3 AWS_SESSION_TOKEN AWS_PROFILE
    log "S3 server (moto) at $AWS_ENDPOINT_URL, throwaway credentials"
}

env_lines() {
    if [[ -f "$DIR/pids/s3.pid" ]]; then
        echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_DEFAULT_REGION=us-east-1"
        echo "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing"
        echo "unset AWS_ENDPOINT_URL_S3 AWS_SESSION_TOKEN AWS_PROFILE"
    fi
    echo "export RAY_ADDRESS=127.0.0.1:$PORT"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ "$RAY_AUTH_MODE" == token ]]; then
        echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
        echo "unset RAY_AUTH_TOKEN"
    fi
}

cmd_up() {
    local name pid
    for name in $(node_names) s3; do
        is_alive "$(pid_of "$name")" && die "a cluster is already running in $DIR; run '$SCRIPT_NAME down --dir $DIR' first"
    done
    for p in "$PORT" "$DASH_PORT" "$CLIENT_PORT"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is in use; pick another --port (or --dashboard-port / --client-port)"
    done
    if [[ -e "$DIR" && ! -f "$DIR/$MARKER" && -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
        die "$DIR exists and is not empty; give an empty or new --dir"
    fi
    mkdir -p "$DIR/pids" "$DIR/logs"
    chmod 700 "$DIR"
    rm -rf "$RAY_TMP"   # a previous run's sessions (kept by --keep-dir or a failed up)
    touch "$DIR/$MARKER"
    rm -f "$DIR"/pids/*.pid

    setup_auth_env
    # Job entrypoints (`ray job submit -- python ...`) resolve `python` on the nodes' PATH: make it
    # the interpreter that has this ray, as an activated virtualenv would.
    export PATH="$(dirname "$RAY"):$PATH"
    if [[ "$RAY_AUTH_MODE" == token ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$DIR/auth_token")
    fi

    # From here on a failure tears down whatever already started.
    # The dir (with the logs saying why) is kept; a later `down` removes it.
    trap 'log "up failed; stopping what started"; KEEP_DIR=1; cmd_down || true' ERR
    [[ $S3 -eq 1 ]] && start_s3  # before the nodes: they inherit its endpoint and credentials
    local obj_bytes=$((OBJ_MB * 1024 * 1024))
    # setsid: the nodes outlive this script and a Ctrl-C in its terminal; stdin/stdout/stderr go to
    # files so a caller reading this script's output through a pipe is not held open by them.
    setsid "$RAY" start --head --block \
        --port="$PORT" \
        --num-cpus="$CPUS" --num-gpus=0 \
        --resources='{"node_head": 1}' \
        --temp-dir="$RAY_TMP" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
        --ray-client-server-port="$CLIENT_PORT" \
        --dashboard-agent-listen-port=0 \
        --object-store-memory="$obj_bytes" \
        --disable-usage-stats \
        </dev/null >"$DIR/logs/head.log" 2>&1 &
    echo $! >"$DIR/pids/head.pid"
    wait_started head "$(pid_of head)" || false

    local i
    for ((i = 1; i <= WORKERS; i++)); do
        # Same --temp-dir as the head: nodes of one cluster on one machine share the session dir
        # (Ray's own cluster_utils does the same); socket names get a per-raylet suffix
        # (raylet.1, plasma_store.1, ...). Ray picks that suffix by checking which file does not
        # exist yet, so nodes started at the same time can pick the same one and the later raylet
        # dies with "bind: Address already in use": start them one at a time.
        # --include-log-monitor=false: the head's log monitor already tails the shared session's
        # worker logs; a second one per node would print every task's output to the driver twice.
        # --dashboard-agent-listen-port=0 (here and on the head): the default, 52365, is one fixed
        # port per machine; the node that loses the race (to a sibling, or to another local Ray
        # such as a test session's) runs its agent without HTTP, and job submission through it
        # fails. 0 lets each agent bind a free port and publish it in GCS.
        setsid "$RAY" start --block \
            --address="127.0.0.1:$PORT" \
            --num-cpus="$CPUS" --num-gpus="$GPUS" \
            --resources="{\"node_worker_$i\": 1}" \
            --temp-dir="$RAY_TMP" \
            --object-store-memory="$obj_bytes" \
            --include-log-monitor=false \
            --dashboard-agent-listen-port=0 \
            --disable-usage-stats \
            </dev/null >"$DIR/logs/worker_$i.log" 2>&1 &
        echo $! >"$DIR/pids/worker_$i.pid"
        wait_started "worker_$i" "$(pid_of "worker_$i")" || false
    done

    # Connect as a driver exactly as users will (address + token from the env): proves the token
    # works and that every node registered, not just that the processes are alive.
    "$PYTHON" - "$PORT" "$((WORKERS + 1))" "$TIMEOUT" <<'EOF' >&2
import sys
import time

import ray

port, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        break
    if time.monotonic() > deadline:
        sys.exit(f"only {len(alive)} of {want} nodes alive after {timeout:.0f}s")
    time.sleep(0.5)
print(f"{len(alive)} nodes alive", file=sys.stderr)
EOF
    trap - ERR

    env_lines >"$DIR/env"
    log "up: head + $WORKERS worker node(s)$([[ $S3 -eq 1 ]] && echo " + S3 at 127.0.0.1:$S3_PORT"), dir $DIR, dashboard http://127.0.0.1:$DASH_PORT"
    log "use it with:  eval \"\$($SCRIPT_NAME ... up)\"  or  source $DIR/env"
    env_lines
}

cmd_status() {
    local names name pid all_alive=1
    names=$(node_names)
    if [[ -z "$names" ]]; then
        log "no cluster recorded in $DIR"
        return 1
    fi
    [[ -f "$DIR/pids/s3.pid" ]] && names="$names s3"
    for name in $names; do
        pid=$(pid_of "$name")
        if is_alive "$pid"; then echo "$name pid=$pid alive"; else echo "$name pid=$pid dead"; all_alive=0; fi
    done
    if is_alive "$(pid_of head)" && [[ -f "$DIR/env" ]]; then
        # shellcheck disable=SC1091
        (source "$DIR/env" && "$RAY" status --address "127.0.0.1:$PORT") || all_alive=0
    fi
    [[ $all_alive -eq 1 ]]
}

cmd_down() {
    local names name pid roots="" tree
    names=$(node_names)
    for name in $names; do
        pid=$(pid_of "$name")
        is_alive "$pid" && roots="$roots $pid"
    done
    pid=$(pid_of s3)
    if is_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local s3_deadline=$((SECONDS + 10))
        while is_alive "$pid" && ((SECONDS < s3_deadline)); do sleep 0.2; done
        is_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
        log "down: stopped the S3 server"
    fi
    if [[ -n "$roots" ]]; then
        # Snapshot the whole tree first: a raylet's workers are its children, not the ray start
        # process's, and they get re-parented when the raylet exits.
        tree=$(process_tree $roots)
        # Workers before the head, so the head does not spend the wait reporting dead nodes.
        for name in $names; do
            [[ "$name" == head ]] && continue
            pid=$(pid_of "$name")
            is_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
        done
        local deadline=$((SECONDS + 10))
        for name in $names; do
            [[ "$name" == head ]] && continue
            pid=$(pid_of "$name")
            while is_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        done
        pid=$(pid_of head)
        is_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true

        # `ray start --block` stops its node's processes on SIGTERM; give it time, then force.
        deadline=$((SECONDS + 8))
        local left
        while :; do
            left=""
            while read -r p st; do
                [[ -n "$p" && "$(start_time "$p")" == "$st" ]] && left="$left $p"
            done <<<"$tree"
            [[ -z "$left" ]] && break
            if ((SECONDS >= deadline)); then
                log "force-killing leftover pids:$left"
                kill -KILL $left 2>/dev/null || true
                sleep 0.5
                break
            fi
            sleep 0.3
        done
    fi
    # Safety net for anything that escaped the tree (e.g. a process started mid-shutdown): only
    # processes whose command line names this cluster's own session dir.
    local stray=""
    if [[ -d "$DIR" ]]; then
        for p in $(ls /proc | grep -E '^[0-9]+$'); do
            [[ "$p" == "$$" ]] && continue
            tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -- "$RAY_TMP/session_" && stray="$stray $p"
        done
    fi
    if [[ -n "$stray" ]]; then
        log "killing stray processes of this cluster:$stray"
        kill -KILL $stray 2>/dev/null || true
    fi

    rm -f "$DIR"/pids/*.pid 2>/dev/null || true
    if [[ $KEEP_DIR -eq 0 && -f "$DIR/$MARKER" ]]; then
        rm -rf "$DIR"
    fi
    if [[ -n "$roots" ]]; then log "down: stopped cluster in $DIR"; else log "down: nothing running in $DIR"; fi
}

# A lost machine: every process of one worker node dies at the same instant, with no chance to
# say goodbye (SIGKILL, the tree snapshotted first so re-parented workers are not missed). The
# cluster notices through its health checks; `down` later skips what is already dead.
cmd_kill() {
    local pid tree left=""
    pid=$(pid_of "$NODE")
    [[ -n "$pid" ]] || die "no node $NODE recorded in $DIR (nodes: $(node_names | tr '\n' ' '))"
    is_alive "$pid" || die "$NODE (pid $pid) is not running"
    tree=$(process_tree "$pid")
    while read -r p st; do
        [[ -n "$p" ]] && left="$left $p"
    done <<<"$tree"
    kill -KILL $left 2>/dev/null || true
    log "kill: SIGKILLed $NODE:$left"
}

case "$CMD" in
    up) cmd_up ;;
    kill) cmd_kill ;;
    status) cmd_status ;;
    down) cmd_down ;;
    -h|--help|help) usage ;;
    *) usage >&2; log "error: unknown command '$CMD'"; exit 2 ;;
esac
