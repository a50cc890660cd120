#!/bin/sh
# The user-namespaced desktop (privilege profile `userns`): the desktop's dockerd, its
# containers and everything a user runs in the desktop live in a user namespace where uid 0
# is the unprivileged uid ORCH_USERNS_BASE of the sandbox (ORCH_USERNS_SIZE ids from there).
#
#   userns-desktop [--supervise]  set up as the container's root (the "outer" side), start the
#                            namespaces and supervise them (desktop-init runs this)
#   userns-desktop --probe   the same set-up, then `true` in the namespaces: does it work here?
#   userns-desktop --inner   (internal) inside the namespaces: /run, DNS, then start-dockerd
#
# The outer side keeps the container's capabilities; nothing in the namespaces can reach it:
# the outer processes are in the parent pid namespace, its /run is covered by a tmpfs, and the
# files it keeps (the namespaces' pid in /run/userns) belong to a uid that is not mapped.
# Every way in (docker exec, later the exec and terminal API) must go through desktop-enter.
#
# Network: a veth pair, its inner end moved into the namespaces' network namespace, NAT on
# the outer end (rootlesskit/slirp4netns measured slower; docs/threat-model.md says why).
# DNS: Docker's resolver on 127.0.0.11 of the outer side, reached through a DNAT.
set -eu

BASE=${ORCH_USERNS_BASE:-}
SIZE=${ORCH_USERNS_SIZE:-65536}
DEPTH=${ORCH_DEPTH:-2}
STATE=/run/userns
LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

log() { printf '%s userns-desktop: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

check_input() {
  case "$BASE" in ''|*[!0-9]*) die "ORCH_USERNS_BASE must be a number, got '$BASE'";; esac
  case "$SIZE" in ''|*[!0-9]*) die "ORCH_USERNS_SIZE must be a number, got '$SIZE'";; esac
  case "$DEPTH" in ''|*[!0-9]*) die "ORCH_DEPTH must be a number, got '$DEPTH'";; esac
  # uid 0 of the machine (or of the sandbox) must never be in the range.
  [ "$BASE" -ge 65536 ] || die "ORCH_USERNS_BASE $BASE is below 65536"
  [ "$SIZE" -ge 65536 ] || die "ORCH_USERNS_SIZE $SIZE is below 65536 (dockerd needs 65536 ids)"
  [ $((BASE + SIZE)) -le 4294967295 ] || die "the uid range ends past 2^32-1"
}

# The veth's /30: the top of this depth's own pool, which the desktop's dockerd then skips
# (it never allocates a network overlapping a route it has).
OCTET=$((212 + DEPTH))
OUTER_IP=10.$OCTET.255.253
INNER_IP=10.$OCTET.255.254

prepare_cgroups() {
  # A private cgroup namespace is what keeps the machine's hierarchy roots (release_agent,
  # other containers' limits, devices.allow of the root) out of reach: refuse without one.
  grep -q ':/$' /proc/self/cgroup || die "the cgroup namespace is not private (CgroupnsMode: private)"
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mount -o remount,rw /sys/fs/cgroup 2>/dev/null || :
    # As start-dockerd does on v2: processes out of the root, controllers delegated.
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || :
    chown -R "$BASE:$BASE" /sys/fs/cgroup
    return
  fi
  # v1: a fresh read-write mount of each hierarchy, rooted at this container's cgroup (the
  # namespace), then handed to the namespaces' root.
  for dir in /sys/fs/cgroup/*; do
    [ -d "$dir" ] && [ ! -L "$dir" ] && mountpoint -q "$dir" || continue
    name=${dir##*/}
    umount -l "$dir" 2>/dev/null || :
    case "$name" in
      unified) mount -t cgroup2 none "$dir" ;;
      systemd) mount -t cgroup -o none,name=systemd cgroup "$dir" ;;
      *) mount -t cgroup -o "$name" cgroup "$dir" ;;
    esac || die "could not mount cgroup $name"
    [ ! -e "$dir/release_agent" ] || die "cgroup $name shows the hierarchy's root (release_agent)"
    chown -R "$BASE:$BASE" "$dir"
  done
}

prepare_files() {
  # /sys read-write before the namespace is made, or a privileged container inside cannot mount sysfs.
  mount -o remount,rw /sys
  mkdir -p /var/lib/docker /run/orchestrator /etc/docker "$(dirname "$LOG")" "$STATE"
  chmod 0700 "$STATE"
  touch "$LOG"
  # Only the tops: what the desktop's dockerd writes below them is its own already.
  chown "$BASE:$BASE" /var/lib/docker /run/orchestrator /etc/docker "$LOG"
  printf 'root:%s:%s\n' "$BASE" "$SIZE" > /etc/subuid
  cp /etc/subuid /etc/subgid
  # The session's env file (workers/runtime/session_env.py) is root's: the namespaces' root's
  # too, so login shells there get it (profile.d). Still no one else's.
  if [ -d /etc/orchestrator ]; then
    chown "$BASE:$BASE" /etc/orchestrator
    [ ! -f /etc/orchestrator/session.env ] || chown "$BASE:$BASE" /etc/orchestrator/session.env
  fi
  # The outer side's docker CLI (docker exec DESKTOP docker ...) reaches the desktop's dockerd.
  ln -sfn /run/orchestrator/docker.sock /var/run/docker.sock
  # The namespaces' resolv.conf: the outer end of the veth when Docker's resolver serves this
  # container (127.0.0.11 is the outer side's loopback), else the same servers.
  if grep -q '^nameserver 127\.0\.0\.11' /etc/resolv.conf; then
    sed "s/^nameserver 127\.0\.0\.11/nameserver $OUTER_IP/" /etc/resolv.conf > "$STATE/resolv.conf"
  else
    cp /etc/resolv.conf "$STATE/resolv.conf"
  fi
  chmod 0755 "$STATE"  # the inner side reads resolv.conf before it covers /run
}

inner_pid() {  # the namespaces' pid 1 (tini), a child of unshare: $1 is unshare's pid
  mine=$(readlink /proc/self/ns/pid)
  tries=0
  while [ "$tries" -lt 500 ]; do
    for child in $(cat "/proc/$1/task/$1/children" 2>/dev/null); do
      ns=$(readlink "/proc/$child/ns/pid" 2>/dev/null) || continue
      [ "$ns" != "$mine" ] && { echo "$child"; return 0; }
    done
    kill -0 "$1" 2>/dev/null || return 1
    tries=$((tries + 1)); sleep 0.01
  done
  return 1
}

set_sysctl() {  # HostConfig.Sysctls sets them; this is for daemons that do not
  [ "$(cat "/proc/sys/$1" 2>/dev/null)" = "$2" ] || echo "$2" > "/proc/sys/$1" 2>/dev/null \
    || log "warning: could not set $1=$2"
}

connect_network() {  # $1: the namespaces' pid
  ip link add ud0 type veth peer name ud1
  ip link set ud1 netns "$1"
  ip addr add "$OUTER_IP/30" dev ud0
  ip link set ud0 up
  nsenter -t "$1" -n sh -c "ip link set lo up && ip link set ud1 name eth0 && ip addr add $INNER_IP/30 dev eth0 \
    && ip link set eth0 up && ip route add default via $OUTER_IP"
  set_sysctl net/ipv4/ip_forward 1
  iptables -t nat -A POSTROUTING -s "$INNER_IP/32" ! -o ud0 -j MASQUERADE
  # Docker's resolver listens on 127.0.0.11 at ports of its choosing; its own DNAT only
  # covers this side's locally made packets, so the namespaces get one of their own.
  if grep -q "^nameserver $OUTER_IP" "$STATE/resolv.conf"; then
    set_sysctl net/ipv4/conf/ud0/route_localnet 1
    rules=$(iptables-save -t nat)
    for proto in udp tcp; do
      port=$(printf '%s\n' "$rules" | sed -n "s/.*-A DOCKER_OUTPUT -d 127\.0\.0\.11\/32 -p $proto .*--to-destination 127\.0\.0\.11:\([0-9]*\).*/\1/p" | head -n1)
      [ -n "$port" ] || { log "warning: no Docker resolver for $proto"; continue; }
      iptables -t nat -A PREROUTING -i ud0 -d "$OUTER_IP" -p "$proto" --dport 53 -j DNAT --to-destination "127.0.0.11:$port"
    done
  fi
}

start_namespaces() {  # $@: what pid 1 of the namespaces runs (under tini)
  # --cgroup: a cgroup namespace of the user namespace's own, rooted where this process is (the
  # container's cgroup, the root of its private namespace, so every path reads the same), lets a
  # Docker-in-Docker inside mount cgroup v1 for its dockerd: the mount shows the desktop's
  # cgroup as its root, never the machine's (no release_agent there).
  unshare --user --map-users="$BASE,0,$SIZE" --map-groups="$BASE,0,$SIZE" --setuid 0 --setgid 0 \
    --mount --pid --fork --mount-proc --net --uts --ipc --cgroup \
    tini -g -- "$@" &
  unshare_pid=$!
  pid=$(inner_pid "$unshare_pid") || { wait "$unshare_pid" || :; die "the namespaces did not start"; }
  echo "$pid" > "$STATE/pid"
  connect_network "$pid"
  touch "$STATE/ready"
}

outer() {
  check_input
  started=$(date +%s%N)
  prepare_cgroups
  prepare_files
  rm -f "$STATE/pid" "$STATE/ready"
  trap 'kill -TERM "$pid" 2>/dev/null || :' TERM INT
  start_namespaces /usr/local/bin/userns-desktop --inner
  log "namespaces up in $(( ($(date +%s%N) - started) / 1000000 )) ms (uids $BASE..$((BASE + SIZE - 1)), pid $pid)"
  status=0
  # wait returns early when a trapped signal arrives; wait again for the namespaces.
  wait "$unshare_pid" || status=$?
  kill -0 "$unshare_pid" 2>/dev/null && { wait "$unshare_pid" || status=$?; }
  exit "$status"
}

inner() {
  tries=0
  until [ -e "$STATE/ready" ]; do  # the outer side connects the network first
    tries=$((tries + 1)); [ "$tries" -lt 1000 ] || die "the network was not connected within 10 s"
    sleep 0.01
  done
  # The container's /run belongs to the machine's root: a tmpfs of our own, with the shared
  # socket directory moved back into it.
  mkdir -p /tmp/.orchestrator
  mount --bind /run/orchestrator /tmp/.orchestrator
  mount --bind "$STATE/resolv.conf" /etc/resolv.conf
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
  mkdir -p /run/orchestrator
  mount --move /tmp/.orchestrator /run/orchestrator
  rmdir /tmp/.orchestrator
  exec start-dockerd --supervise
}

probe() {
  check_input
  prepare_cgroups
  prepare_files
  start_namespaces sh -c 'until [ -e /run/userns/ready ]; do sleep 0.01; done; mount -t tmpfs tmpfs /run && mkdir /sys/fs/cgroup/memory/orch-probe 2>/dev/null; [ ! -d /sys/fs/cgroup/memory ] || rmdir /sys/fs/cgroup/memory/orch-probe'
  wait "$unshare_pid"
}

case "${1:-}" in
  ''|--supervise) outer ;;
  --inner) inner ;;
  --probe) probe ;;
  *) die "usage: userns-desktop [--supervise|--probe]" ;;
esac
