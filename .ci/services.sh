#!/usr/bin/env bash
# Make sure the services Spool needs answer: `rabbitmq` (always, with its management plugin) and
# `postgres` (tests); `chromium` is not a service but the browser the dashboard test drives;
# `xrootd` installs the XRootD server the remote-storage tests start.
# Starts a local server that is installed but stopped; installs it with apt when running as root
# on CI (or with SPOOL_INSTALL_SERVICES=1); otherwise says exactly how to get one. Waits until the
# port answers. Usage: .ci/services.sh rabbitmq [postgres] [chromium] [xrootd] [rabbitmq-cluster]
# `rabbitmq-cluster` is a three-node cluster beside the main broker (.ci/rabbitmq-cluster.sh: nodes
# spool-c1..3@localhost on 127.0.0.1:5681-5683); `.ci/services.sh stop rabbitmq-cluster` stops it
# and deletes its data. Nothing here ever stops the main broker.
set -u

port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "services: $1 did not answer on 127.0.0.1:$2 within $3 s" >&2
  return 1
}

may_install() { [ "$(id -u)" = 0 ] && { [ "${CI:-}" = true ] || [ "${SPOOL_INSTALL_SERVICES:-}" = 1 ]; }; }

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  # tests/test_bus_tls.py generates its certificates with the openssl CLI and starts a private
  # node of this rabbitmq-server (with its management plugin) on a TLS listener.
  if ! command -v openssl >/dev/null && may_install; then
    echo "services: installing openssl"
    apt_install openssl || return 1
  fi
  port_open 5672 && return 0
  if ! command -v rabbitmq-server >/dev/null; then
    if may_install; then
      echo "services: installing rabbitmq-server"
      apt_install rabbitmq-server || return 1
    else
      cat >&2 <<'MSG'
services: RabbitMQ is not running on 127.0.0.1:5672 and is not installed. Either
  sudo apt-get install -y rabbitmq-server          (then run this again), or
  docker compose up -d rabbitmq                    (from this repository), or
  export SPOOL_BUS__URL=amqp://user:pw@host:5672/  (a broker elsewhere; skip this check)
MSG
      return 1
    fi
  fi
  echo "services: starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port rabbitmq 5672 90 || return 1
  # The port opens before the broker accepts AMQP sessions; wait for the node to say it is up.
  if command -v rabbitmq-diagnostics >/dev/null; then
    for _ in $(seq 1 60); do rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && break; sleep 1; done
  fi
}

# The management plugin (HTTP API on 15672) is what shows in-flight messages and who holds them in
# `spool status` / `spool queues`. Without it Spool still runs and says what it cannot show, so a
# failure here is a warning, not an error.
ensure_management() {
  port_open 15672 && return 0
  if ! command -v rabbitmq-plugins >/dev/null; then
    echo "services: note: the RabbitMQ management API does not answer on 127.0.0.1:15672 (broker" \
         "elsewhere?); spool status will not show in-flight messages" >&2
    return 0
  fi
  echo "services: enabling rabbitmq_management"
  if ! rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1; then
    echo "services: warning: 'rabbitmq-plugins enable rabbitmq_management' failed (run it as root);" \
         "spool status will not show in-flight messages" >&2
    return 0
  fi
  wait_port rabbitmq-management 15672 60 || true
}

ensure_postgres() {
  port_open 5432 && return 0
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if may_install; then
      echo "services: installing postgresql"
      apt_install postgresql || return 1
    else
      echo "services: PostgreSQL is not running on 127.0.0.1:5432 and is not installed:" \
           "sudo apt-get install -y postgresql, or docker compose up -d postgres" >&2
      return 1
    fi
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$version/main/pg_hba.conf
  # Tests connect as postgres over TCP without a password (trust on loopback only).
  if [ -w "$conf" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$conf"; then
    sed -i '1i host all all 127.0.0.1/32 trust' "$conf"
  fi
  echo "services: starting postgresql $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
  wait_port postgresql 5432 60
}

# Headless Chromium and its chromedriver for tests/test_monitor_browser.py. Missing off CI is only a
# note (the test skips and says why); on CI the test fails without them, so install them there.
have_chromium() {
  command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser; } >/dev/null
}

ensure_chromium() {
  have_chromium && return 0
  if may_install; then
    echo "services: installing chromium chromium-driver"
    apt_install chromium chromium-driver || return 1
  else
    echo "services: note: chromium / chromedriver are not installed; the dashboard browser test will" \
         "skip (sudo apt-get install -y chromium chromium-driver)" >&2
  fi
}

# Debian's XRootD server and client: the remote-storage tests start their own server at test time
# (common/storage/devserver.py: two sites over root:// and https, certificates generated then), so
# here it only has to be installed. Missing off CI is a note (those tests skip and say why).
have_xrootd() { command -v xrootd >/dev/null && command -v xrdcp >/dev/null; }

ensure_xrootd() {
  have_xrootd && return 0
  if may_install; then
    echo "services: installing xrootd-server xrootd-client"
    apt_install xrootd-server xrootd-client || return 1
  else
    echo "services: note: xrootd-server is not installed; the remote-storage tests will skip" \
         "(sudo apt-get install -y xrootd-server xrootd-client)" >&2
  fi
}

# A broker that refuses publishers (memory or disk alarm) makes every test that publishes hang:
# say so now, in one line, instead of after an hour of timeouts.
check_rabbitmq_alarms() {
  command -v rabbitmq-diagnostics >/dev/null || return 0
  if ! out=$(rabbitmq-diagnostics -q check_local_alarms 2>&1); then
    echo "services: RabbitMQ has a resource alarm and blocks publishers: $out" >&2
    echo "services: free disk space (df -h /var/lib/rabbitmq) or memory, then run this again" >&2
    return 1
  fi
}

# In CI the broker is the machine's own and nobody else's: queues that earlier test runs left
# behind (hundreds per run, many of them quorum queues) are deleted before the tests start.
clean_rabbitmq_leftovers() {
  [ "${CI:-}" = "true" ] || return 0
  port_open 15672 || return 0
  python3 "$(dirname "$0")/../tests/broker_cleanup.py" --leftovers || true
}

ensure_rabbitmq_cluster() {
  if ! command -v rabbitmq-server >/dev/null; then
    if may_install; then
      echo "services: installing rabbitmq-server"
      apt_install rabbitmq-server || return 1
    else
      echo "services: rabbitmq-server is not installed: sudo apt-get install -y rabbitmq-server" >&2
      return 1
    fi
  fi
  bash "$(dirname "$0")/rabbitmq-cluster.sh" start
}

if [ "${1:-}" = stop ]; then
  shift
  status=0
  for svc in "$@"; do
    case "$svc" in
      rabbitmq-cluster) bash "$(dirname "$0")/rabbitmq-cluster.sh" stop || status=1 ;;
      *) echo "services: only rabbitmq-cluster is stopped from here, not $svc" >&2; status=1 ;;
    esac
  done
  exit $status
fi

status=0
for svc in "$@"; do
  case "$svc" in
    rabbitmq) { ensure_rabbitmq && ensure_management && check_rabbitmq_alarms; } || status=1
              clean_rabbitmq_leftovers ;;
    postgres) ensure_postgres || status=1 ;;
    chromium) ensure_chromium || status=1 ;;
    xrootd) ensure_xrootd || status=1 ;;
    rabbitmq-cluster) ensure_rabbitmq_cluster || status=1 ;;
    *) echo "services: unknown service $svc" >&2; status=1 ;;
  esac
done
exit $status
