#!/usr/bin/env bash
# Run docker-compose.yml the way a user would, with whichever compose this machine has
# (`docker compose`, v2, or Debian's `docker-compose`, v1), at any level (the machine, or
# inside a desktop: nothing here knows which).
#
#   scripts/stack.sh up [--scale N]   registry first, push the project's images to it, then the rest
#   scripts/stack.sh push             start the registry and push the images only
#   scripts/stack.sh down [-v]        stop the stack (-v: also remove its volumes)
#   scripts/stack.sh compose ARGS...  any compose command, with the same files and project
#
# Knobs: .env (see .env.example) or the environment: COMPOSE_PROJECT_NAME (default orchestrator),
# COMPOSE_FILE (default: docker-compose.yml, plus docker-compose.caps.yml where this machine's
# capability bounding set makes --privileged fail), ORCH_REGISTRY_PORT, ORCH_*_IMAGE.
set -euo pipefail
cd "${ORCH_STACK_DIR:-$(dirname "$0")/..}"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

# .env values, unless the environment already sets them (compose itself reads .env too).
if [ -f .env ]; then
  while IFS='=' read -r key value; do
    case "$key" in ''|\#*) continue ;; esac
    [ -n "${!key+x}" ] || export "$key=$value"
  done < .env
fi
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-orchestrator}
REGISTRY_PORT=${ORCH_REGISTRY_PORT:-5000}
DESKTOP_IMAGE=${ORCH_DESKTOP_IMAGE:-orchestrator/desktop:dev}
SANDBOX_IMAGE=${ORCH_SANDBOX_IMAGE:-orchestrator/sandbox:dev}

privileged_refused() {
  # runc refuses --privileged when the bounding set lacks a capability Docker knows (38 of them).
  local bounding
  bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
  (( (0x$bounding & 0x3fffffffff) != 0x3fffffffff ))
}
if [ -z "${COMPOSE_FILE:-}" ]; then
  COMPOSE_FILE=docker-compose.yml
  if privileged_refused; then
    log "this machine refuses --privileged: adding docker-compose.caps.yml"
    COMPOSE_FILE=$COMPOSE_FILE:docker-compose.caps.yml
  fi
  export COMPOSE_FILE
fi

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  die "neither \`docker compose\` nor \`docker-compose\` is installed (scripts/env.sh installs one)"
fi
compose() { "${COMPOSE[@]}" "$@"; }

push() {
  compose up -d registry
  local tries=0
  until compose exec -T registry curl -fsS http://127.0.0.1:5000/v2/ >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 150 ] || { compose logs registry >&2; die "the registry did not answer within 30 s"; }
    sleep 0.2
  done
  local image remote started
  for image in "$DESKTOP_IMAGE" "$SANDBOX_IMAGE"; do
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image is missing: run scripts/build-images.sh"
    # A daemon pushes over plain HTTP to loopback without any configuration.
    remote=127.0.0.1:$REGISTRY_PORT/$image
    started=$(date +%s)
    docker tag "$image" "$remote"
    docker push -q "$remote" >/dev/null || { docker rmi "$remote" >/dev/null; die "pushing $remote failed"; }
    docker rmi "$remote" >/dev/null  # the tag only: the image stays
    log "pushed $image to this level's registry ($(( $(date +%s) - started )) s)"
  done
}

case "${1:-}" in
  up)
    shift
    scale=1
    if [ "${1:-}" = --scale ]; then scale=${2:?--scale needs a number}; fi
    push
    compose up -d --scale "sandbox=$scale"
    ;;
  push) push ;;
  down)
    shift
    compose down "$@"
    ;;
  compose)
    shift
    compose "$@"
    ;;
  *) die "usage: stack.sh up [--scale N] | push | down [-v] | compose ARGS..." ;;
esac
