#!/bin/sh
# A sandbox: its own dockerd (started by start-dockerd, the very script the desktops use) on
# the volume at /var/lib/docker, and the worker that drives it, each supervised: a crash of
# either is logged and restarted. Depth comes from ORCH_DEPTH; desktops run one level deeper.
#
# Images for its desktops: any *.tar under $ORCH_IMAGE_DIR (default /images) is loaded into
# this dockerd at start when its images are missing (`docker save` output).
set -eu
IMAGE_DIR=${ORCH_IMAGE_DIR:-/images}
WORKER_LOG=${ORCH_WORKER_LOG:-/var/log/worker.log}
export DOCKER_HOST=unix:///var/run/docker.sock
# Replicas of one compose service differ by hostname: that names the sandbox unless set.
export ORCH_SANDBOX_ID="${ORCH_SANDBOX_ID:-$(hostname)}"

log() { printf '%s sandbox-init: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

start-dockerd --supervise &
dockerd_supervisor=$!
worker_supervisor=

stop() {
  log "stopping"
  [ -n "$worker_supervisor" ] && kill -TERM "$worker_supervisor" 2>/dev/null || :
  kill -TERM "$dockerd_supervisor" 2>/dev/null || :
  wait
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

for tarball in "$IMAGE_DIR"/*.tar; do
  [ -f "$tarball" ] || continue
  log "loading $tarball"
  docker load -q -i "$tarball" >&2 || log "warning: loading $tarball failed"
done

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
    log "the worker exited with status $status; restarting in ${delay}s"
    [ $(( $(date +%s) - started )) -gt 30 ] && delay=1
    sleep "$delay"
    delay=$((delay * 2)); [ "$delay" -le 16 ] || delay=16
  done
}
supervise_worker &
worker_supervisor=$!
wait
