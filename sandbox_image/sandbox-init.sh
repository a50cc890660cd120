#!/bin/sh
# A sandbox: its own dockerd (started by start-dockerd, the very script the desktops use) on
# the volume at /var/lib/docker, and the worker that drives it, each supervised: a crash of
# either is logged and restarted. Depth comes from ORCH_DEPTH; desktops run one level deeper.
# The worker pulls the desktop image from this level's registry (ORCH_REGISTRY) when missing.
set -eu
WORKER_LOG=${ORCH_WORKER_LOG:-/var/log/worker.log}
export DOCKER_HOST=unix:///var/run/docker.sock
# The sandbox's id, unless set: the hostname of its first start (replicas of one compose service
# differ by hostname), kept on its dockerd's volume, so a recreated container (compose keeps
# anonymous volumes) is the same sandbox, with the same queue, sessions and desktops.
ID_FILE=/var/lib/docker/orchestrator/sandbox-id
if [ -z "${ORCH_SANDBOX_ID:-}" ]; then
  if [ -s "$ID_FILE" ]; then
    ORCH_SANDBOX_ID=$(cat "$ID_FILE")
  else
    ORCH_SANDBOX_ID=$(hostname)
    mkdir -p "${ID_FILE%/*}" && printf '%s\n' "$ORCH_SANDBOX_ID" > "$ID_FILE"
  fi
fi
export ORCH_SANDBOX_ID
# Desktops reach the internet only (workers/firewall.py): no private range, none of this
# sandbox's networks (Redis, the API, the registry), no IPv6. The rules go in before dockerd
# starts: it restarts desktops (restart policies) at once, long before the worker is up, and
# the worker waits for Redis. No firewall, no sandbox. The worker re-applies the same rules.
export ORCH_FIREWALL=${ORCH_FIREWALL:-1}

log() { printf '%s sandbox-init: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

# What root here could reach of the machine (docs/threat-model.md, "A hostile sandbox"), said at
# every start. The least-privilege sandbox (docker-compose.yml) has a cgroup namespace of its
# own; in the machine's, mounting cgroup v1 gives the machine's release_agent: refused, unless
# this sandbox runs in a user namespace that is not the machine's (root here is not root there)
# or an operator named an unsafe overlay (ORCH_SANDBOX_UNSAFE, set by it).
check_privilege() {
  read -r inside outside count < /proc/self/uid_map
  if [ "$inside $outside $count" != "0 0 4294967295" ]; then
    log "privilege: in a user namespace of its own (uid 0 is $outside outside): confined by it"
    return
  fi
  caps=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
  if [ -n "${ORCH_SANDBOX_UNSAFE:-}" ]; then
    log "UNSAFE: sandbox privilege ${ORCH_SANDBOX_UNSAFE} (capabilities $caps): root here is root on the machine"
    return
  fi
  if grep -qv ':/$' /proc/self/cgroup; then
    log "refusing to start: this sandbox shares the machine's cgroup namespace, where root here reaches the machine's release_agent. Give it a private one (compose v2 reads \`cgroup: private\` in docker-compose.yml; or the daemon's default-cgroupns-mode private), or name an unsafe overlay (ORCH_SANDBOX_PRIVILEGE=caps|privileged)"
    exit 1
  fi
  # The 17 of docker-compose.yml (workers/privilege.py USERNS_CAPS): anything more is said.
  case "$caps" in
    00000000a82c35fb) log "privilege: least (17 capabilities, private cgroup namespace)" ;;
    *) log "warning: capabilities $caps are more than the least-privilege sandbox's (00000000a82c35fb)" ;;
  esac
}
check_privilege

case "$(printf %s "$ORCH_FIREWALL" | tr '[:upper:]' '[:lower:]')" in  # as orchestrator/config.py reads it
  1|true|yes|on)
    python3 -m workers.firewall || { log "the desktops' firewall could not be loaded: not starting"; exit 1; } ;;
  *) log "warning: ORCH_FIREWALL=$ORCH_FIREWALL: desktops reach everything this sandbox reaches" ;;
esac

# Each desktop's /run/orchestrator is its directory under this one, bind-mounted: on a small
# tmpfs, what a desktop writes there is bounded memory (charged to the desktop's cgroup), not
# the sandbox's disk. Sockets need an inode each and no blocks. Before dockerd, which restarts
# the desktops of an earlier run at once (their directories are made again by the bind).
SOCKET_DIR=${ORCH_SOCKET_DIR:-/run/orchestrator/desktops}
SOCKET_DIR_OPTIONS=size=4m,nr_inodes=65536,mode=0755,nosuid,nodev,noexec
if ! mountpoint -q "$SOCKET_DIR"; then
  mkdir -p "$SOCKET_DIR"
  mount -t tmpfs -o "$SOCKET_DIR_OPTIONS" orchestrator-sockets "$SOCKET_DIR" \
    || log "warning: no tmpfs at $SOCKET_DIR: a desktop can fill the sandbox's disk through its socket directory"
fi

start-dockerd --supervise &
dockerd_supervisor=$!
worker_supervisor=

# The worker first (SIGTERM drains it: jobs queued and running finish), dockerd after it.
stop() {
  log "stopping: draining the worker, then dockerd"
  if [ -n "$worker_supervisor" ]; then
    kill -TERM "$worker_supervisor" 2>/dev/null || :
    wait "$worker_supervisor" 2>/dev/null || :
  fi
  kill -TERM "$dockerd_supervisor" 2>/dev/null || :
  wait
  log "stopped"
  exit 0
}
trap stop TERM INT

tries=0
until docker version >/dev/null 2>&1; do
  tries=$((tries + 1))
  kill -0 "$dockerd_supervisor" 2>/dev/null || { log "start-dockerd exited"; wait "$dockerd_supervisor"; exit 1; }
  [ "$tries" -lt 600 ] || { log "dockerd did not answer within 60 s"; exit 1; }
  sleep 0.1
done
log "dockerd ready (depth ${ORCH_DEPTH:-1})"

supervise_worker() {
  delay=1
  while :; do
    started=$(date +%s)
    log "starting the worker (log: $WORKER_LOG)"
    orchestrator worker >>"$WORKER_LOG" 2>&1 &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM
    status=0
    wait "$child" || status=$?
    if [ "$status" -eq 0 ]; then
      # Only a completed drain ends the worker cleanly: the sandbox is done.
      log "the worker exited cleanly (drained): stopping the sandbox"
      kill -TERM $$
      exit 0
    fi
    log "the worker exited with status $status; restarting in ${delay}s"
    [ $(( $(date +%s) - started )) -gt 30 ] && delay=1
    sleep "$delay"
    delay=$((delay * 2)); [ "$delay" -le 16 ] || delay=16
  done
}
supervise_worker &
worker_supervisor=$!
wait
