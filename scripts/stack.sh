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
# ORCH_SANDBOX_PRIVILEGE (below), COMPOSE_FILE (default: docker-compose.yml, plus the overlay
# ORCH_SANDBOX_PRIVILEGE names), ORCH_REGISTRY_PORT, ORCH_*_IMAGE.
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
GRAPHICAL_IMAGE=${ORCH_GRAPHICAL_IMAGE:-orchestrator/desktop-graphical:dev}

# The sandboxes' privilege (docs/threat-model.md, "A hostile sandbox"): ORCH_SANDBOX_PRIVILEGE
#   auto, least  docker-compose.yml alone: 17 capabilities, private cgroup namespace, seccomp
#                (at every level: in a userns desktop too, confined by its namespace there)
#   caps         UNSAFE: + docker-compose.caps.yml (every capability, unconfined)
#   privileged   UNSAFE: + docker-compose.privileged.yml (--privileged)
# A COMPOSE_FILE of your own replaces all of this.
SANDBOX_PRIVILEGE=${ORCH_SANDBOX_PRIVILEGE:-auto}
if [ -z "${COMPOSE_FILE:-}" ]; then
  case "$SANDBOX_PRIVILEGE" in
    auto | least) COMPOSE_FILE=docker-compose.yml ;;
    caps | privileged)
      COMPOSE_FILE=docker-compose.yml:docker-compose.$SANDBOX_PRIVILEGE.yml
      log "UNSAFE: ORCH_SANDBOX_PRIVILEGE=$SANDBOX_PRIVILEGE: root in a sandbox is root of this level's machine"
      ;;
    *) die "ORCH_SANDBOX_PRIVILEGE must be auto, least, caps or privileged, got '$SANDBOX_PRIVILEGE'" ;;
  esac
  export COMPOSE_FILE
fi

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
  # v1 knows no `cgroup:` key and refuses the file with it: it reads a copy without it, and the
  # sandbox's cgroup namespace is the daemon's default (private on cgroup v2, or with the
  # daemon's default-cgroupns-mode private). sandbox-init refuses to start in the machine's.
  v1_files=
  IFS=: read -ra files <<< "$COMPOSE_FILE"
  for file in "${files[@]}"; do
    copy=${TMPDIR:-/tmp}/stack-$COMPOSE_PROJECT_NAME-v1-${file//\//_}
    grep -v '^    cgroup: private$' "$file" > "$copy"
    v1_files=$v1_files${v1_files:+:}$copy
  done
  export COMPOSE_FILE=$v1_files
  COMPOSE+=(--project-directory .)
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
  local image remote started images=("$DESKTOP_IMAGE" "$SANDBOX_IMAGE")
  # The graphical flavor is opt-in (build-images.sh --graphical): pushed when it was built, so
  # the sandboxes' workers pull it before their first graphical desktop (workers/prepare.py).
  if docker image inspect "$GRAPHICAL_IMAGE" >/dev/null 2>&1; then
    images+=("$GRAPHICAL_IMAGE")
  else
    log "no $GRAPHICAL_IMAGE here (scripts/build-images.sh --graphical): graphical sessions will fail image_missing"
  fi
  for image in "${images[@]}"; do
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
