#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside (never instead of) the main broker on 5672:
# nodes spool-c1@localhost, spool-c2@localhost, spool-c3@localhost, AMQP on 127.0.0.1:5681-5683,
# management API on 15681-15683, Erlang distribution on 25681-25683 (SPOOL_RABBIT_CLUSTER_PORT
# moves the three ranges together). For the cluster tests (tests/test_bus_cluster.py) and for
# trying a cluster by hand; `.ci/services.sh rabbitmq-cluster` calls `start`.
#
#   start    start what is not running, join the nodes into one cluster, wait until
#            `cluster_status` lists three running nodes. Idempotent: with the cluster up it only
#            checks; a node down (killed, or its app stopped) is started again and rejoins.
#   stop     shut the three nodes down and delete what they wrote (queues included): a test
#            cluster, the next `start` builds a fresh one.
#   status   `rabbitmqctl cluster_status` as node 1 sees it.
#   ctl N .. `rabbitmqctl -n spool-cN@localhost ..` with the cluster's cookie.
#   pid N    the pid of node N's Erlang VM (what a test SIGKILLs), empty when it is not running.
#   boot N   start node N's VM if it is not running and wait until its AMQP port answers, without
#            rabbitmqctl (a member of the cluster rejoins it by itself as it boots; the caller
#            checks membership, e.g. through the management API). For a node killed on purpose:
#            under load each rabbitmqctl call is an Erlang VM of its own taking seconds, and some
#            were seen not to exit at all.
#
# Everything lives in one directory (SPOOL_RABBIT_CLUSTER_DIR; default /var/lib/spool-rabbit-cluster
# as root, else ~/.local/state/spool-rabbit-cluster): per node its Mnesia (with the quorum queues'
# logs), logs, config and pid file, and one HOME holding the cluster's own Erlang cookie. The main
# node's cookie (/var/lib/rabbitmq/.erlang.cookie) is neither needed nor touched: the CLI reaches
# these nodes with HOME pointing at the cluster's cookie (`ctl` does that). The nodes run the
# scripts in /usr/lib/rabbitmq/bin directly, because the Debian wrapper in /usr/sbin switches to
# the rabbitmq user when run as root, which drops HOME and with it the cookie, and reads
# /etc/rabbitmq (the main node's config, which names the main node) unless told otherwise.
set -u

BASE_PORT=${SPOOL_RABBIT_CLUSTER_PORT:-5681}
if [ -n "${SPOOL_RABBIT_CLUSTER_DIR:-}" ]; then
  DIR=$SPOOL_RABBIT_CLUSTER_DIR
elif [ "$(id -u)" = 0 ]; then
  DIR=/var/lib/spool-rabbit-cluster
else
  DIR=${XDG_STATE_HOME:-$HOME/.local/state}/spool-rabbit-cluster
fi
NODES=(1 2 3)
BOOT_SECONDS=${SPOOL_RABBIT_CLUSTER_BOOT_SECONDS:-180}

tool() {
  if [ -x "/usr/lib/rabbitmq/bin/$1" ]; then echo "/usr/lib/rabbitmq/bin/$1"; else command -v "$1"; fi
}

node_name() { echo "spool-c$1@localhost"; }
amqp_port() { echo $((BASE_PORT + $1 - 1)); }
http_port() { echo $((BASE_PORT + 10000 + $1 - 1)); }
dist_port() { echo $((BASE_PORT + 20000 + $1 - 1)); }
port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# The environment of node N and of the CLI talking to it.
node_env() {
  local n=$1 d=$DIR/c$1
  echo HOME="$DIR/home" \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_PID_FILE="$d/pid"
}

ctl() {  # N args...
  local n=$1; shift
  env $(node_env "$n") RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS= "$(tool rabbitmqctl)" -q -n "$(node_name "$n")" "$@"
}

vm_pid() {  # the node's Erlang VM, if it runs
  local file=$DIR/c$1/pid pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null && grep -q beam "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

prepare() {
  mkdir -p "$DIR/home"
  if [ ! -s "$DIR/home/.erlang.cookie" ]; then
    # One cookie for the three nodes and the CLI, not the main node's.
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F >"$DIR/home/.erlang.cookie"
    chmod 400 "$DIR/home/.erlang.cookie"
  fi
  for n in "${NODES[@]}"; do
    local d=$DIR/c$n
    mkdir -p "$d/mnesia" "$d/log"
    # loopback_users stays the default: guest may connect, from 127.0.0.1 only.
    cat >"$d/rabbitmq.conf" <<CONF
management.tcp.ip = 127.0.0.1
management.tcp.port = $(http_port "$n")
cluster_partition_handling = pause_minority
CONF
    echo "[rabbitmq_management]." >"$d/enabled_plugins"
    : >"$d/rabbitmq-env.conf"
    [ -f "$d/advanced.config" ] || echo "[]." >"$d/advanced.config"
  done
}

start_vm() {  # N: boot node N in the background (its own session, output to its log)
  local n=$1 d=$DIR/c$1
  rm -f "$d/pid"
  echo "rabbitmq-cluster: starting $(node_name "$n") on 127.0.0.1:$(amqp_port "$n")"
  # Distribution on the loopback interface only, as the main node's.
  env $(node_env "$n") RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    setsid "$(tool rabbitmq-server)" >>"$d/log/server.out" 2>&1 </dev/null &
}

wait_vm() {  # N: until the node's app runs and its AMQP port answers
  local n=$1 d=$DIR/c$1
  for _ in $(seq 1 "$BOOT_SECONDS"); do [ -s "$d/pid" ] && break; sleep 1; done
  if ! ctl "$n" wait "$d/pid" --timeout "$BOOT_SECONDS" >/dev/null 2>&1; then
    echo "rabbitmq-cluster: $(node_name "$n") did not start; last lines of $d/log:" >&2
    tail -n 20 "$d/log/server.out" "$d"/log/*.log 2>/dev/null | tail -n 40 >&2
    return 1
  fi
  for _ in $(seq 1 60); do port_open "$(amqp_port "$n")" && return 0; sleep 1; done
  echo "rabbitmq-cluster: $(node_name "$n") runs but 127.0.0.1:$(amqp_port "$n") does not answer" >&2
  return 1
}

# The nodes node 1 knows as members (disk nodes) and as running, from cluster_status's JSON.
members() { ctl 1 cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(" ".join(s.get(sys.argv[1]) or []))' "$1"; }

join() {  # N: make node N a member of node 1's cluster
  local n=$1 first
  first=$(node_name 1)
  echo "rabbitmq-cluster: joining $(node_name "$n") to $first"
  ctl "$n" stop_app >/dev/null || return 1
  ctl "$n" reset >/dev/null || return 1
  if ! ctl "$n" join_cluster "$first" >/dev/null 2>&1; then
    # Node 1 still lists an earlier incarnation of this node (its data deleted by hand).
    ctl 1 forget_cluster_node "$(node_name "$n")" >/dev/null 2>&1
    ctl "$n" join_cluster "$first" >/dev/null || return 1
  fi
  ctl "$n" start_app >/dev/null
}

start() {
  if [ -z "$(tool rabbitmq-server)" ] || [ -z "$(tool rabbitmqctl)" ]; then
    echo "rabbitmq-cluster: rabbitmq-server is not installed (apt-get install -y rabbitmq-server)" >&2
    return 1
  fi
  prepare
  # Every node down is started at once: after all three went down each waits at boot for the
  # others (the last one stopped must be among them), so one at a time would deadlock.
  local n booted=()
  for n in "${NODES[@]}"; do
    if vm_pid "$n" >/dev/null; then
      if ! port_open "$(amqp_port "$n")"; then
        # The VM runs but not the app (`rabbitmqctl stop_app`), or it is still booting:
        # start_app starts it, or returns once the boot under way ended (measured, 3.10).
        echo "rabbitmq-cluster: starting the app of $(node_name "$n")"
        ctl "$n" start_app >/dev/null 2>&1
        booted+=("$n")
      fi
    else
      start_vm "$n"
      booted+=("$n")
    fi
  done
  # Only the nodes started here are waited for: one already serving AMQP is up, and each
  # `rabbitmqctl wait` is an Erlang VM of its own (seconds each on a loaded machine).
  for n in "${booted[@]}"; do wait_vm "$n" || return 1; done
  local disk
  disk=" $(members disk_nodes) "
  for n in "${NODES[@]:1}"; do
    [[ "$disk" == *" $(node_name "$n") "* ]] || join "$n" || {
      echo "rabbitmq-cluster: $(node_name "$n") could not join; '$0 stop' deletes the cluster" >&2
      return 1
    }
  done
  for _ in $(seq 1 60); do
    local running
    running=" $(members running_nodes) "
    local all=1
    for n in "${NODES[@]}"; do [[ "$running" == *" $(node_name "$n") "* ]] || all=0; done
    if [ $all = 1 ]; then
      echo "rabbitmq-cluster: up (${running# }): amqp://guest:guest@127.0.0.1:$(amqp_port 1)/ .. :$(amqp_port 3)/"
      return 0
    fi
    sleep 1
  done
  echo "rabbitmq-cluster: cluster_status does not list three running nodes:$running" >&2
  return 1
}

boot() {  # N
  prepare  # first: its loop sets the caller's n (bash scopes variables dynamically)
  local n=$1
  vm_pid "$n" >/dev/null || start_vm "$n"
  for _ in $(seq 1 "$BOOT_SECONDS"); do port_open "$(amqp_port "$n")" && return 0; sleep 1; done
  echo "rabbitmq-cluster: $(node_name "$n") does not answer on 127.0.0.1:$(amqp_port "$n")" >&2
  return 1
}

stop() {
  local n pid
  for n in "${NODES[@]}"; do
    if vm_pid "$n" >/dev/null; then ctl "$n" shutdown >/dev/null 2>&1 & fi
  done
  wait
  for n in "${NODES[@]}"; do
    # A node that did not shut down is killed: this is a test cluster, its data goes next.
    if pid=$(vm_pid "$n"); then kill -9 "$pid" 2>/dev/null; fi
  done
  [ -d "$DIR" ] && rm -rf "$DIR"
  echo "rabbitmq-cluster: stopped and removed ($DIR)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) ctl 1 cluster_status ;;
  ctl) shift; ctl "$@" ;;
  pid) vm_pid "${2:?node number}" ;;
  boot) boot "${2:?node number}" ;;
  *) echo "usage: $0 start | stop | status | ctl N ARGS... | pid N | boot N" >&2; exit 2 ;;
esac
