#!/usr/bin/env bash
# Build the project's images with normal Dockerfiles. When their base image cannot be
# pulled (no registry reachable), make it offline from Debian's packages (debootstrap +
# docker import) and tag it with the name the Dockerfiles expect.
#
#   scripts/build-images.sh            desktop and sandbox images
#   scripts/build-images.sh --test     also the small test image (busybox, FROM scratch)
#   scripts/build-images.sh --graphical
#                                      also the graphical desktop flavor (or ORCH_BUILD_GRAPHICAL=1;
#                                      about 1.1 GB and 100 s more: not for `make up`)
# Flags combine. Tags: ORCH_DESKTOP_IMAGE, ORCH_SANDBOX_IMAGE, ORCH_TEST_IMAGE, ORCH_GRAPHICAL_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=${ORCH_STATE_DIR:-/var/lib/orchestrator-dev}
BASE_IMAGE=${ORCH_BASE_IMAGE:-debian:bookworm-slim}
DESKTOP_IMAGE=${ORCH_DESKTOP_IMAGE:-orchestrator/desktop:dev}
SANDBOX_IMAGE=${ORCH_SANDBOX_IMAGE:-orchestrator/sandbox:dev}
TEST_IMAGE=${ORCH_TEST_IMAGE:-orchestrator/test-busybox:dev}
GRAPHICAL_IMAGE=${ORCH_GRAPHICAL_IMAGE:-orchestrator/desktop-graphical:dev}
PYTHON=${PYTHON:-python3}
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

build() {  # image, dockerfile, build args...
  local image=$1 dockerfile=$2 out; shift 2
  log "building $image"
  out=$(mktemp)
  # The legacy builder is what Debian's docker.io 20.10 has; BuildKit is not required.
  if ! DOCKER_BUILDKIT=0 docker build -f "$dockerfile" "$@" -t "$image" . >"$out" 2>&1; then
    tail -n 30 "$out" >&2; rm -f "$out"; die "building $image failed"
  fi
  rm -f "$out"
}

# Wheels for the image's Python (Debian bookworm: CPython 3.11.2, which matters for markers such as
# redis's async-timeout), whatever Python runs here: exactly the versions of the runtime lock
# (requirements/runtime.txt, `make lock`), the same ones the venv gets.
build_wheels() {
  local dir=build/wheels arch out
  arch=$(uname -m)
  rm -rf "$dir"; mkdir -p "$dir"
  # The dashboard's xterm.js is package data of the wheel (gitignored, fetched from npm, pinned).
  bash scripts/fetch-web-assets.sh
  out=$(mktemp)
  log "building wheels for the sandbox image"
  # Reproducible: the same sources give the same wheel bytes, so the image's layer cache holds
  # and an unchanged checkout rebuilds to the same image (compose then recreates nothing).
  if ! SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
    "$PYTHON" -m pip wheel -q --no-deps . -w "$dir" >"$out" 2>&1; then
    tail -n 30 "$out" >&2; rm -f "$out"; die "pip wheel . failed"
  fi
  # pip download evaluates a requirement's markers for the Python running here, not for the
  # target (--python-version): evaluate them for bookworm's here, then take the locked set as it
  # is (--no-deps: nothing is resolved anew).
  "$PYTHON" - requirements/runtime.txt "$arch" <<'PY' > build/requirements.txt
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement

bookworm = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": sys.argv[2],
}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(bookworm):
            print(f"{req.name}{req.specifier}")
PY
  if ! "$PYTHON" -m pip download -q -d "$dir" --no-deps --only-binary=:all: --python-version 3.11.2 --implementation cp \
    --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" --platform "manylinux_2_28_$arch" \
    -r build/requirements.txt >"$out" 2>&1; then
    tail -n 30 "$out" >&2; rm -f "$out"; die "pip download of the locked dependencies failed"
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

want_test=0 want_graphical=${ORCH_BUILD_GRAPHICAL:-0}
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --graphical) want_graphical=1 ;;
    *) die "unknown argument '$arg' (known: --test, --graphical)" ;;
  esac
done

ensure_base
build "$DESKTOP_IMAGE" desktop_image/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE"
if [ "$want_graphical" = 1 ]; then
  started=$SECONDS
  build "$GRAPHICAL_IMAGE" desktop_image/Dockerfile.graphical --build-arg "DESKTOP_IMAGE=$DESKTOP_IMAGE"
  log "$GRAPHICAL_IMAGE in $((SECONDS - started)) s"
fi
build_wheels
build "$SANDBOX_IMAGE" sandbox_image/Dockerfile --build-arg "DESKTOP_IMAGE=$DESKTOP_IMAGE"
if [ "$want_test" = 1 ]; then build_test_image; fi
# Rebuilt tags leave their old images dangling (hundreds of MB each): drop those, nothing else.
docker image prune -f --filter label=orchestrator.image >/dev/null
log "done"
