#!/usr/bin/env bash
# Build the project's images with normal Dockerfiles. When their base image cannot be
# pulled (no registry reachable), make it offline from Debian's packages (debootstrap +
# docker import) and tag it with the name the Dockerfiles expect.
#
#   scripts/build-images.sh            desktop image
#   scripts/build-images.sh --test     also the small test image (busybox, FROM scratch)
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=${ORCH_STATE_DIR:-/var/lib/orchestrator-dev}
BASE_IMAGE=${ORCH_BASE_IMAGE:-debian:bookworm-slim}
DESKTOP_IMAGE=${ORCH_DESKTOP_IMAGE:-orchestrator/desktop:dev}
TEST_IMAGE=${ORCH_TEST_IMAGE:-orchestrator/test-busybox:dev}
DEBIAN_MIRROR=${ORCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

ensure_base() {
  have_image "$BASE_IMAGE" && return
  log "pulling $BASE_IMAGE"
  if timeout 120 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  # The tarball is cached outside Docker's data root so a wiped daemon rebuilds in seconds.
  local tarball=$STATE_DIR/base/${BASE_IMAGE//[:\/]/_}.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || die "debootstrap is missing (scripts/env.sh installs it)"
    local root
    root=$(mktemp -d "${TMPDIR:-/tmp}/orch-rootfs.XXXXXX")
    log "no registry: making $BASE_IMAGE offline with debootstrap (about a minute)"
    if ! debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1; then
      tail -n 20 "$root.log" >&2; rm -rf "$root"; die "debootstrap failed"
    fi
    # Same trims as the official slim image: no apt lists, no caches.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root.log"
    mkdir -p "$(dirname "$tarball")"
    tar -C "$root" -c . > "$tarball.tmp" && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  log "importing $tarball as $BASE_IMAGE"
  docker import --change 'CMD ["bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

build_desktop() {
  log "building $DESKTOP_IMAGE"
  local out
  out=$(mktemp)
  # The legacy builder is what Debian's docker.io 20.10 has; BuildKit is not required.
  if ! DOCKER_BUILDKIT=0 docker build -f desktop_image/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      -t "$DESKTOP_IMAGE" . >"$out" 2>&1; then
    tail -n 30 "$out" >&2; rm -f "$out"; die "building $DESKTOP_IMAGE failed"
  fi
  rm -f "$out"
}

# A few-MB image for tests: a static busybox FROM scratch, loaded into inner daemons.
build_test_image() {
  have_image "$TEST_IMAGE" && return
  [ -x /bin/busybox ] || die "/bin/busybox is missing (apt-get install busybox-static)"
  local ctx
  ctx=$(mktemp -d)
  mkdir -p "$ctx/bin"
  cp /bin/busybox "$ctx/bin/busybox"
  for applet in sh echo cat sleep hostname wget; do ln -s busybox "$ctx/bin/$applet"; done
  log "importing $TEST_IMAGE"
  tar -C "$ctx" -c . | docker import --change 'CMD ["/bin/sh"]' - "$TEST_IMAGE" >/dev/null
  rm -rf "$ctx"
}

ensure_base
build_desktop
if [ "${1:-}" = "--test" ]; then build_test_image; fi
log "done"
