#!/usr/bin/env bash
# Bring docker-compose.yml up on the project's dockerd (scripts/stack.sh: registry, push, Redis,
# API, one sandbox), then run one real session until its desktop's dockerd is ready.
#   scripts/up.sh        start (compose reuses what already runs) and create a session
#   scripts/up.sh down   stop the stack (its volumes stay: `scripts/stack.sh down -v` drops them)
# Expects scripts/env.sh and scripts/build-images.sh to have run (make up does that).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${ORCH_RUN_DIR:-/run/orchestrator-dev}
BIN=.venv/bin/orchestrator
export ORCH_API_PORT=${ORCH_API_PORT:-8080}
export ORCH_API_URL=${ORCH_API_URL:-http://127.0.0.1:$ORCH_API_PORT}

log() { printf '[up] %s\n' "$*" >&2; }

[ -f "$RUN_DIR/env" ] || { log "run scripts/env.sh first (make up does)"; exit 1; }
set -a; . "$RUN_DIR/env"; set +a
# The project's daemon is the machine level: the compose sandboxes are depth 1.
unset ORCH_DEPTH

if [ "${1:-}" = down ]; then bash scripts/stack.sh down || log "could not stop the compose stack (is the project dockerd running?)"; exit 0; fi

# A local admin token, made once; the API gets only its hash.
if [ ! -s "$RUN_DIR/token" ]; then
  (umask 077; "$BIN" token new --name local --scope admin > "$RUN_DIR/token.new" && mv "$RUN_DIR/token.new" "$RUN_DIR/token")
fi
export ORCH_TOKEN ORCH_TOKENS
ORCH_TOKEN=$(sed -n 's/^token: *//p' "$RUN_DIR/token")
ORCH_TOKENS=$(sed -n 's/^ORCH_TOKENS: *//p' "$RUN_DIR/token")

bash scripts/stack.sh up --scale "${ORCH_SANDBOXES:-1}"
for _ in $(seq 300); do curl -fsS "$ORCH_API_URL/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$ORCH_API_URL/healthz" >/dev/null || { bash scripts/stack.sh compose logs --tail 30 api >&2; log "the API did not come up"; exit 1; }
log "API at $ORCH_API_URL; waiting for a sandbox (its dockerd starts, it pulls the desktop image)"
# Listed is not enough: a sandbox of an earlier run stays listed (drained) for a day.
for _ in $(seq 600); do
  "$BIN" sandboxes ls --json 2>/dev/null | grep -q '"status": *"available"' && break
  sleep 0.2
done
created=$("$BIN" sessions create --wait --label created-by=make-up | tee /dev/stderr)
sid=$(printf '%s\n' "$created" | sed -n 's/^session \([a-z0-9-]*\) on sandbox .*/\1/p' | head -n 1)
if [ -n "$sid" ]; then
  # A command in the new desktop, through the API (exec): its own dockerd answers.
  "$BIN" sessions exec "$sid" -- docker info --format 'in the desktop: dockerd {{.ServerVersion}}, storage {{.Driver}}'
fi
cat <<TXT

The stack is up (compose project ${COMPOSE_PROJECT_NAME:-orchestrator}). Your admin token is in $RUN_DIR/token. Try:
  export ORCH_API_URL=$ORCH_API_URL ORCH_TOKEN=\$(sed -n 's/^token: *//p' $RUN_DIR/token)
  curl -H "Authorization: Bearer \$ORCH_TOKEN" \$ORCH_API_URL/v1/sessions
  $BIN sessions ls
  $BIN sessions exec ${sid:-ID} -- uname -a
  $BIN events --follow
  $BIN sandboxes ls
  DOCKER_HOST=$DOCKER_HOST bash scripts/stack.sh compose ps
Logs: bash scripts/stack.sh compose logs. Stop everything: make down.
TXT
