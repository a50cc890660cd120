#!/bin/sh
# Start this level's own dockerd. One script for every level (sandbox and desktop):
# the only input that differs between levels is ORCH_DEPTH.
#
#   start-dockerd --supervise   preflight, then run dockerd under a restart loop (foreground)
#   start-dockerd --check       preflight only
#   start-dockerd --supervise --gated
#                               the same, but the first dockerd starts only once a line (or
#                               end-of-file: refused) arrives on fd 4 (userns-desktop: the
#                               network is connected); the preparations run meanwhile
#
# Environment:
#   ORCH_DEPTH            nesting level of this dockerd (networks from 10.(212+depth).0.0/16)
#   ORCH_EXTERNAL_SOCKET  extra unix socket for the level above (default
#                         /run/orchestrator/docker.sock, inside a bind mount it can read)
#   DOCKERD_LOG           log file of the restart loop and dockerd (default /var/log/dockerd.log)
#   ORCH_REGISTRY         this level's registry (host:port, plain HTTP; several: comma-separated),
#                         listed in insecure-registries so the daemon can pull from it
#   DOCKERD_EXTRA_ARGS    appended to dockerd's command line
set -eu

DEPTH=${ORCH_DEPTH:-1}
DATA_ROOT=/var/lib/docker
EXTERNAL_SOCKET=${ORCH_EXTERNAL_SOCKET:-/run/orchestrator/docker.sock}
LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

parent() { case "$1" in */*) PARENT=${1%/*}/ ;; *) PARENT=. ;; esac; }  # dirname, in the shell

log() { printf '%s start-dockerd: %s\n' "$(date -u +%FT%TZ)" "$*" | tee -a "$LOG" >&2; }
die() { log "error: $*"; exit 1; }
# ORCH_TRACE_PHASES=1: a line per phase on stderr with its time (bench/phases.py reads them).
mark() { [ -z "${ORCH_TRACE_PHASES:-}" ] || echo "phase $1 $(date +%s%N)" >&2; }

preflight() {
  case "$DEPTH" in ''|*[!0-9]*) die "ORCH_DEPTH must be a number, got '$DEPTH'";; esac
  [ "$DEPTH" -ge 0 ] && [ "$DEPTH" -le 43 ] || die "ORCH_DEPTH $DEPTH is out of range 0..43"
  # overlay2 cannot stack on the container's own overlay root: the data root must be a
  # real filesystem (a Docker volume), or the inner daemon silently degrades to vfs.
  is_mountpoint "$DATA_ROOT" || die "refusing to start: $DATA_ROOT is not a mount point (mount a volume there)"
}

# The mount points of this mount namespace, read once (mountinfo: no process per question).
# Its paths escape a space as \040: ours have none.
MOUNTS=
read_mounts() {
  MOUNTS=
  while read -r _ _ _ _ mnt _; do MOUNTS="$MOUNTS $mnt "; done < /proc/self/mountinfo
}
is_mountpoint() { [ -n "$MOUNTS" ] || read_mounts; case "$MOUNTS" in *" $1 "*) return 0 ;; esac; return 1; }

remove_stale_state() {
  # A killed daemon leaves pid files behind and the next dockerd refuses to start.
  rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid "$DATA_ROOT/docker.pid" \
    /var/run/docker.sock "$EXTERNAL_SOCKET"
}

# access(2) answers for the mount too (EROFS on a read-only one): no probe directory to make.
cgroup_v1_writable() { [ -w "$1" ]; }

prepare_cgroup_v1() {
  # Without privileged mode the hierarchies are read-only binds: replace each with a
  # fresh read-write mount, or the inner dockerd's containers fail to create cgroups.
  for dir in /sys/fs/cgroup/*; do
    [ -d "$dir" ] && [ ! -L "$dir" ] && is_mountpoint "$dir" || continue
    cgroup_v1_writable "$dir" && continue
    name=${dir##*/}
    umount -l "$dir" 2>/dev/null || true
    case "$name" in
      unified) mount -t cgroup2 none "$dir" ;;
      systemd) mount -t cgroup -o none,name=systemd cgroup "$dir" ;;
      *) mount -t cgroup -o "$name" cgroup "$dir" ;;
    esac || log "warning: could not remount cgroup $name read-write"
  done
}

prepare_cgroup_v2() {
  mount -o remount,rw /sys/fs/cgroup 2>/dev/null || true
  # The root cgroup of the namespace may not have processes and enabled controllers at
  # once: move everything into a child, then delegate all controllers (bounded retries,
  # since processes can appear while we move them).
  mkdir -p /sys/fs/cgroup/init
  tries=0
  until {
    xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
  }; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || { log "warning: could not enable cgroup v2 controllers"; break; }
    sleep 0.1
  done
}

prepare_proc_sys() {
  # dockerd needs IP forwarding. Under the caps and userns profiles the worker sets it per
  # container (HostConfig.Sysctls) and /proc/sys stays read-only, as Docker mounts it: never
  # remount it (a read-write /proc/sys is core_pattern for anyone root here).
  forward=
  read -r forward < /proc/sys/net/ipv4/ip_forward 2>/dev/null || :
  [ "$forward" != 1 ] || return 0
  echo 1 > /proc/sys/net/ipv4/ip_forward 2>/dev/null \
    || log "warning: IP forwarding is off and /proc/sys is read-only; nested networking may be limited"
}

prepare_cgroups() {
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then prepare_cgroup_v2; else prepare_cgroup_v1; fi
}

write_daemon_json() {
  octet=$((212 + DEPTH))
  registries=
  # Split on commas and blanks by the shell itself (no tr), without globbing the pieces.
  set -f; old_ifs=$IFS; IFS=", 	
"
  for registry in ${ORCH_REGISTRY:-}; do
    IFS=$old_ifs
    [ -n "$registry" ] || continue
    case "$registry" in *[!A-Za-z0-9.:_-]*) die "ORCH_REGISTRY: '$registry' is not host:port";; esac
    registries="$registries${registries:+, }\"$registry\""
  done
  IFS=$old_ifs; set +f
  [ -d /etc/docker ] || mkdir -p /etc/docker
  # Each level takes its own /16 so nested networks never overlap; docker0 takes its first /24.
  printf '%s\n' "{
  \"default-address-pools\": [{\"base\": \"10.$octet.0.0/16\", \"size\": 24}],
  \"bip\": \"10.$octet.0.1/24\",
  \"storage-driver\": \"overlay2\",
  \"shutdown-timeout\": 10,
  \"insecure-registries\": [$registries],
  \"log-driver\": \"json-file\",
  \"log-opts\": {\"max-size\": \"10m\", \"max-file\": \"2\"}
}" > /etc/docker/daemon.json
}

gate() {  # --gated: wait for the go on fd 4, then close it (nothing started later holds it)
  read -r _ <&4 || die "the namespaces' network was not connected (the outer side gave up)"
  exec 4<&-
  mark dockerd.gate
}

supervise() {  # $1: 1 to wait for the gate before the first dockerd (--gated)
  stopping=0 child= gated=${1:-0}
  trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null || :' TERM INT
  delay=1
  parent "$EXTERNAL_SOCKET"; [ -d "$PARENT" ] || mkdir -p "$PARENT"
  while :; do
    remove_stale_state
    log "starting dockerd (depth $DEPTH, pool 10.$((212 + DEPTH)).0.0/16)"
    [ "$gated" = 0 ] || { gate; gated=0; }
    read -r started _ < /proc/uptime  # seconds since boot (no date process)
    # shellcheck disable=SC2086
    dockerd --host unix:///var/run/docker.sock --host "unix://$EXTERNAL_SOCKET" \
      ${DOCKERD_EXTRA_ARGS:-} >>"$LOG" 2>&1 &
    child=$!
    status=0
    wait "$child" || status=$?
    # wait returns early when a trapped signal arrives; wait again for dockerd itself.
    if [ "$stopping" = 1 ]; then wait "$child" 2>/dev/null || :; log "stopped"; exit 0; fi
    log "dockerd exited with status $status; restarting in ${delay}s"
    # Back off on crash loops, but a daemon that ran a while restarts fast.
    read -r now _ < /proc/uptime
    [ $(( ${now%.*} - ${started%.*} )) -gt 30 ] && delay=1
    sleep "$delay"
    delay=$((delay * 2)); [ "$delay" -le 16 ] || delay=16
  done
}

parent "$LOG"; [ -d "$PARENT" ] || mkdir -p "$PARENT"
case "${1:---supervise}" in
  --check) preflight ;;
  --supervise)
    mark dockerd.script; preflight; prepare_proc_sys; prepare_cgroups; write_daemon_json; mark dockerd.prepared
    if [ "${2:-}" = --gated ]; then supervise 1; else supervise 0; fi ;;
  *) die "usage: start-dockerd [--supervise|--check]" ;;
esac
