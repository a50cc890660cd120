#!/usr/bin/env bash
# Make the environment the project needs on a Debian/Ubuntu machine: a Docker Engine
# and a Redis server of its own (private data root, socket, port), or the ones the
# user already runs (DOCKER_HOST / REDIS_URL). Idempotent: a second run reuses what
# runs and cleans what a dead daemon left behind.
#
# Writes the resulting DOCKER_HOST and REDIS_URL to $ORCH_RUN_DIR/env (sourceable).
set -euo pipefail

STATE_DIR=${ORCH_STATE_DIR:-/var/lib/orchestrator-dev}
RUN_DIR=${ORCH_RUN_DIR:-/run/orchestrator-dev}
REDIS_PORT=${ORCH_REDIS_PORT:-6391}
# The machine's own project daemon is the depth-1 sandbox: its networks come from 10.213.0.0/16.
DEPTH=${ORCH_DEPTH:-1}

# Our own socket and port in DOCKER_HOST / REDIS_URL (say, from an earlier run's env file) mean
# "the project's daemons", which this script manages, not "a user's".
[ "${DOCKER_HOST:-}" = "unix://$RUN_DIR/docker.sock" ] && unset DOCKER_HOST
[ "${REDIS_URL:-}" = "redis://127.0.0.1:$REDIS_PORT/0" ] && unset REDIS_URL

log() { printf '[env] %s\n' "$*" >&2; }
die() { printf '[env] error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"; }

install_missing() {
  local pkgs=()
  if [ -z "${DOCKER_HOST:-}" ]; then
    command -v dockerd >/dev/null || pkgs+=(docker.io)
    command -v iptables >/dev/null || pkgs+=(iptables)
  fi
  if [ -z "${REDIS_URL:-}" ]; then command -v redis-server >/dev/null || pkgs+=(redis-server); fi
  command -v redis-cli >/dev/null || pkgs+=(redis-tools)
  command -v debootstrap >/dev/null || pkgs+=(debootstrap)
  command -v docker >/dev/null || pkgs+=(docker.io)
  [ -x /bin/busybox ] || pkgs+=(busybox-static)
  command -v python3 >/dev/null || pkgs+=(python3)
  python3 -c 'import ensurepip' 2>/dev/null || pkgs+=(python3-venv)
  command -v curl >/dev/null || pkgs+=(curl)
  command -v ip >/dev/null || pkgs+=(iproute2)
  # The dashboard's browser test drives Debian's chromium (no browser download).
  if [ "$WITH_TEST_DEPS" = 1 ]; then command -v chromium >/dev/null || pkgs+=(chromium); fi
  # The command stream's test of a producer in another language runs a Node.js program (npm redis).
  if [ "$WITH_TEST_DEPS" = 1 ]; then
    command -v node >/dev/null || pkgs+=(nodejs)
    command -v npm >/dev/null || pkgs+=(npm)
  fi
  command -v make >/dev/null || pkgs+=(make)
  if [ ${#pkgs[@]} -gt 0 ]; then
    need_root
    log "installing: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || die "apt-get install ${pkgs[*]} failed"
  fi
}

# Compose v2 is not in Debian 12: take the plugin from Debian 13's package (a static Go binary,
# pinned by checksum). Where that cannot be fetched, Debian 12's docker-compose (v1) reads our
# compose file too.
COMPOSE_DEB=pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb
COMPOSE_DEB_SHA256=47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea
install_compose() {
  docker compose version >/dev/null 2>&1 && return
  need_root
  local tmp plugin_dir=/usr/local/lib/docker/cli-plugins
  tmp=$(mktemp -d)
  log "installing compose v2 (Debian's docker-compose 2.26 package)"
  if [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] \
    && curl -fsS --max-time 120 -o "$tmp/compose.deb" "${ORCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}/$COMPOSE_DEB" \
    && echo "$COMPOSE_DEB_SHA256  $tmp/compose.deb" | sha256sum -c --quiet - \
    && dpkg-deb -x "$tmp/compose.deb" "$tmp/root"; then
    mkdir -p "$plugin_dir"
    install -m 0755 "$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" "$plugin_dir/docker-compose"
  fi
  rm -rf "$tmp"
  docker compose version >/dev/null 2>&1 && return
  command -v docker-compose >/dev/null && return
  log "compose v2 unavailable: installing Debian's docker-compose (v1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
    || die "apt-get install docker-compose failed"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

docker_ok() { DOCKER_HOST="$1" timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_dockerd() {
  if [ -n "${DOCKER_HOST:-}" ]; then
    docker_ok "$DOCKER_HOST" || die "DOCKER_HOST=$DOCKER_HOST is set but does not answer"
    log "using the user's Docker at $DOCKER_HOST"
    echo "$DOCKER_HOST"; return
  fi
  local sock=$RUN_DIR/docker.sock pid=$RUN_DIR/docker.pid host
  host=unix://$sock
  if pid_alive "$pid" && docker_ok "$host"; then
    log "dockerd already runs (pid $(cat "$pid"))"; echo "$host"; return
  fi
  need_root
  if pid_alive "$pid"; then
    log "dockerd pid $(cat "$pid") does not answer; stopping it"
    kill "$(cat "$pid")" 2>/dev/null || true
    for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.2; done
    pid_alive "$pid" && kill -9 "$(cat "$pid")" 2>/dev/null || true
  fi
  # A dead daemon leaves its pid file and socket, and the next one refuses to start over them.
  rm -f "$pid" "$sock"
  mkdir -p "$RUN_DIR" "$STATE_DIR/docker" "$STATE_DIR/docker-exec"
  local pool=10.$((212 + DEPTH)).0.0/16 bip=10.$((212 + DEPTH)).0.1/24
  cat > "$RUN_DIR/daemon.json" <<JSON
{"default-address-pools": [{"base": "$pool", "size": 24}], "bip": "$bip",
 "log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "2"}}
JSON
  log "starting dockerd (data root $STATE_DIR/docker, socket $sock, pool $pool)"
  nohup dockerd --config-file "$RUN_DIR/daemon.json" --data-root "$STATE_DIR/docker" \
    --exec-root "$STATE_DIR/docker-exec" --host "$host" --pidfile "$pid" \
    >>"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
  local child=$!
  for _ in $(seq 300); do
    docker_ok "$host" && { log "dockerd ready"; echo "$host"; return; }
    kill -0 "$child" 2>/dev/null || break  # it died: say why now, not after the timeout
    sleep 0.1
  done
  grep -v '\[core\]' "$RUN_DIR/dockerd.log" | tail -n 15 >&2 || true
  die "dockerd did not come up (log: $RUN_DIR/dockerd.log)"
}

redis_ok() { timeout 5 redis-cli -u "$1" ping 2>/dev/null | grep -q PONG; }

start_redis() {
  if [ -n "${REDIS_URL:-}" ]; then
    redis_ok "$REDIS_URL" || die "REDIS_URL=$REDIS_URL is set but does not answer"
    log "using the user's Redis at $REDIS_URL"; echo "$REDIS_URL"; return
  fi
  local url=redis://127.0.0.1:$REDIS_PORT/0 pid=$RUN_DIR/redis.pid
  if pid_alive "$pid" && redis_ok "$url"; then
    log "redis already runs (pid $(cat "$pid"))"; echo "$url"; return
  fi
  need_root
  pid_alive "$pid" && { kill "$(cat "$pid")" 2>/dev/null || true; sleep 0.5; }
  rm -f "$pid"
  mkdir -p "$RUN_DIR" "$STATE_DIR/redis"
  log "starting redis on 127.0.0.1:$REDIS_PORT (AOF on, dir $STATE_DIR/redis)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$STATE_DIR/redis" \
    --appendonly yes --appendfsync always --daemonize yes --pidfile "$pid" \
    --logfile "$RUN_DIR/redis.log" --save '' >/dev/null
  for _ in $(seq 100); do redis_ok "$url" && { log "redis ready"; echo "$url"; return; }; sleep 0.1; done
  die "redis did not answer within 10 s (log: $RUN_DIR/redis.log)"
}

stop_all() {
  for name in redis docker; do
    local pid=$RUN_DIR/$name.pid
    if pid_alive "$pid"; then
      log "stopping $name (pid $(cat "$pid"))"
      kill "$(cat "$pid")" 2>/dev/null || true
      for _ in $(seq 100); do pid_alive "$pid" || break; sleep 0.2; done
    fi
  done
}

WITH_TEST_DEPS=0
[ "${2:-}" = --test ] && WITH_TEST_DEPS=1

case "${1:-up}" in
  up)
    install_missing
    install_compose
    docker_host=$(start_dockerd)
    redis_url=$(start_redis)
    mkdir -p "$RUN_DIR"
    printf 'export DOCKER_HOST=%s\nexport REDIS_URL=%s\nexport ORCH_DEPTH=%s\n' \
      "$docker_host" "$redis_url" "$DEPTH" > "$RUN_DIR/env"
    cat "$RUN_DIR/env"
    ;;
  down) stop_all ;;
  *) die "usage: $0 [up [--test]|down]" ;;
esac
