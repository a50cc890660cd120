#!/usr/bin/env bash
# Start the API and one worker (the machine acting as the sandbox) as background processes,
# then run one real session until its desktop's dockerd is ready.
#   scripts/up.sh        start (reusing what already runs) and create a session
#   scripts/up.sh down   stop the API and the worker
# Expects scripts/env.sh and scripts/build-images.sh to have run (make up does that).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${ORCH_RUN_DIR:-/run/orchestrator-dev}
LOG_DIR=${ORCH_LOG_DIR:-$RUN_DIR/logs}
BIN=.venv/bin/orchestrator
export ORCH_API_PORT=${ORCH_API_PORT:-8080}
export ORCH_API_URL=${ORCH_API_URL:-http://127.0.0.1:$ORCH_API_PORT}

log() { printf '[up] %s\n' "$*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  for name in api worker; do
    local pid=$RUN_DIR/$name.pid
    if alive "$pid"; then
      log "stopping $name (pid $(cat "$pid"))"
      kill -TERM "$(cat "$pid")"
      for _ in $(seq 150); do alive "$pid" || break; sleep 0.2; done
    fi
    rm -f "$pid"
  done
}

start() {  # name, command...
  local name=$1 pid=$RUN_DIR/$1.pid; shift
  if alive "$pid"; then log "$name already runs (pid $(cat "$pid"))"; return; fi
  log "starting $name (log: $LOG_DIR/$name.log)"
  nohup "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$pid"
}

if [ "${1:-}" = down ]; then stop; exit 0; fi

[ -f "$RUN_DIR/env" ] || { log "run scripts/env.sh first (make up does)"; exit 1; }
set -a; . "$RUN_DIR/env"; set +a
# A local admin token, made once; the API gets only its hash.
if [ ! -s "$RUN_DIR/token" ]; then
  (umask 077; "$BIN" token new --name local --scope admin > "$RUN_DIR/token.new" && mv "$RUN_DIR/token.new" "$RUN_DIR/token")
fi
export ORCH_TOKEN ORCH_TOKENS
ORCH_TOKEN=$(sed -n 's/^token: *//p' "$RUN_DIR/token")
ORCH_TOKENS=$(sed -n 's/^ORCH_TOKENS: *//p' "$RUN_DIR/token")
mkdir -p "$LOG_DIR"
# The worker below is sandbox "local": sessions wait in its queue even if it reports after the API starts.
ORCH_DEFAULT_SANDBOX=local start api "$BIN" api
start worker "$BIN" worker
for _ in $(seq 150); do curl -fsS "$ORCH_API_URL/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$ORCH_API_URL/healthz" >/dev/null || { tail -n 30 "$LOG_DIR/api.log" >&2; log "the API did not come up"; exit 1; }
log "API at $ORCH_API_URL; creating a session"
"$BIN" sessions create --wait --label created-by=make-up
cat <<TXT

The stack is up. Your admin token is in $RUN_DIR/token. Try:
  export ORCH_API_URL=$ORCH_API_URL DOCKER_HOST=$DOCKER_HOST ORCH_TOKEN=\$(sed -n 's/^token: *//p' $RUN_DIR/token)
  curl -H "Authorization: Bearer \$ORCH_TOKEN" \$ORCH_API_URL/v1/sessions
  $BIN sessions ls
  $BIN events --follow
  docker exec -it desktop-<id> docker info   # the desktop's own dockerd
Logs: $LOG_DIR. Stop everything: make down.
TXT
