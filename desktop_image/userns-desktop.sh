#!/bin/sh
# The user-namespaced desktop (privilege profile `userns`): the desktop's dockerd, its
# containers and everything a user runs in the desktop live in a user namespace where uid 0
# is the unprivileged uid ORCH_USERNS_BASE of the sandbox (ORCH_USERNS_SIZE ids from there).
#
#   userns-desktop [--supervise]  set up as the container's root (the "outer" side), start the
#                            namespaces and supervise them (desktop-init runs this)
#   userns-desktop --probe   the same set-up, then `true` in the namespaces: does it work here?
#   userns-desktop --inner   (internal) inside the namespaces: /run, DNS, then start-dockerd (and
#                            start-display for the graphical flavor)
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
DISPLAY_LOG=${DISPLAY_LOG:-/var/log/display.log}

log() { printf '%s userns-desktop: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# ORCH_TRACE_PHASES=1: a line per phase on stderr with its time (bench/phases.py reads them).
mark() { [ -z "${ORCH_TRACE_PHASES:-}" ] || echo "phase $1 $(date +%s%N)" >&2; }

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

cgroup_mounts() {  # the mount points of the cgroup hierarchies under /sys/fs/cgroup, a line each
  # mountinfo, not `mountpoint` per directory: one read, no process per hierarchy.
  while read -r _ _ _ _ mnt rest; do
    case "$mnt" in /sys/fs/cgroup/*) ;; *) continue ;; esac
    fstype=${rest#* - }
    case "${fstype%% *}" in cgroup|cgroup2) echo "$mnt" ;; esac
  done < /proc/self/mountinfo
}

# What the namespaces' root gets of a cgroup it is handed (cgroup v2's delegation set: the
# directory, to make children, and the files that move processes), never the cgroup's own limits
# (memory.limit_in_bytes, pids.max, cpu.cfs_quota_us...): the desktop's root must not lift the
# limits the worker set on its container. $@: the cgroups.
delegate() {
  files=
  for dir in "$@"; do
    files="$files $dir"
    for f in cgroup.procs tasks cgroup.threads cgroup.subtree_control; do
      [ ! -e "$dir/$f" ] || files="$files $dir/$f"
    done
  done
  # shellcheck disable=SC2086  # paths under /sys/fs/cgroup: no spaces
  chown "$BASE:$BASE" $files
}

prepare_cgroups() {
  # A private cgroup namespace is what keeps the machine's hierarchy roots (release_agent,
  # other containers' limits, devices.allow of the root) out of reach: refuse without one.
  private=0
  while IFS= read -r line; do case "$line" in *:/) private=1; break ;; esac; done < /proc/self/cgroup
  [ "$private" = 1 ] || die "the cgroup namespace is not private (CgroupnsMode: private)"
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mount -o remount,rw /sys/fs/cgroup 2>/dev/null || :
    # As start-dockerd does on v2: processes out of the root, controllers delegated.
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || :
    delegate /sys/fs/cgroup /sys/fs/cgroup/init
    return
  fi
  # v1: each hierarchy made writable where it is. With a private cgroup namespace Docker's
  # mounts show this container's cgroup as their root already; they are read-only per mount,
  # which a bind remount lifts: no unmount and fresh mount, and all of them in one mount
  # process (--all with a type filter remounts what is mounted, mount(8)). Each is checked.
  dirs=$(cgroup_mounts)
  mount --all -o remount,bind,rw -t cgroup,cgroup2 || die "could not make the cgroup hierarchies writable"
  mark outer.cgroups.mounted
  for dir in $dirs; do
    [ ! -e "$dir/release_agent" ] || die "cgroup ${dir##*/} shows the hierarchy's root (release_agent)"
    [ -w "$dir" ] || die "cgroup ${dir##*/} is still read-only"
  done
  # shellcheck disable=SC2086
  delegate $dirs
  mark outer.cgroups
}

prepare_files() {
  # /sys read-write before the namespace is made, or a privileged container inside cannot mount sysfs.
  mount -o remount,rw /sys
  case "$LOG" in */*) log_dir=${LOG%/*}/ ;; *) log_dir=. ;; esac
  mkdir -p /var/lib/docker /run/orchestrator /etc/docker "$log_dir" "$STATE"
  : >> "$LOG"
  # Only the tops: what the desktop's dockerd writes below them is its own already. The
  # session's env file (workers/runtime/session_env.py) is root's: the namespaces' root's too,
  # so login shells there get it (profile.d). Still no one else's.
  owned="/var/lib/docker /run/orchestrator /etc/docker $LOG"
  [ ! -d /etc/orchestrator ] || owned="$owned /etc/orchestrator"
  [ ! -f /etc/orchestrator/session.env ] || owned="$owned /etc/orchestrator/session.env"
  # The graphical flavor's log (start-display runs as the namespaces' root).
  if [ "${ORCH_DESKTOP_FLAVOR:-minimal}" = graphical ]; then : >> "$DISPLAY_LOG"; owned="$owned $DISPLAY_LOG"; fi
  # shellcheck disable=SC2086  # fixed paths, no spaces
  chown "$BASE:$BASE" $owned
  # The namespaces' root gets its home (shells, ~/.docker): the image's few files, once. -h and
  # -R without -L: no symlink is followed (what is there was written by the namespaces' root).
  [ "$(stat -c %u /root)" = "$BASE" ] || chown -R -h "$BASE:$BASE" /root
  printf 'root:%s:%s\n' "$BASE" "$SIZE" > /etc/subuid
  printf 'root:%s:%s\n' "$BASE" "$SIZE" > /etc/subgid
  # The outer side's docker CLI (docker exec DESKTOP docker ...) reaches the desktop's dockerd.
  [ -L /var/run/docker.sock ] || ln -sfn /run/orchestrator/docker.sock /var/run/docker.sock
  # The state directory is readable: the inner side reads resolv.conf before it covers /run.
  chmod 0755 "$STATE"
  # start_namespaces's hand-over.
  rm -f "$STATE/up" "$STATE/go"
  mkfifo -m 0600 "$STATE/up" "$STATE/go"
  mark outer.files
}

resolv_conf() {  # the namespaces' resolv.conf; DOCKER_DNS=1 when Docker's resolver serves here
  # The outer end of the veth when Docker's resolver serves this container (127.0.0.11 is the
  # outer side's loopback), else the same servers.
  DOCKER_DNS=
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      'nameserver 127.0.0.11'|'nameserver 127.0.0.11 '*|'nameserver 127.0.0.11	'*)
        DOCKER_DNS=1; line="nameserver $OUTER_IP${line#nameserver 127.0.0.11}" ;;
    esac
    printf '%s\n' "$line"
  done < /etc/resolv.conf > "$STATE/resolv.conf"
}

inner_pid() {  # PID: the namespaces' pid 1 (tini), a child of unshare; $1 is unshare's pid
  # Called once the namespaces' side has said it runs (start_namespaces), so tini is there.
  children=
  read -r children < "/proc/$1/task/$1/children" || :  # (no newline at its end)
  for child in $children; do
    # The one that is pid 1 of a pid namespace below this one: "NSpid: <here> 1".
    while read -r key here there; do
      [ "$key" = NSpid: ] || continue
      [ "$there" = 1 ] && { PID=$child; return 0; }
      break
    done < "/proc/$child/status" 2>/dev/null || :
  done
  return 1
}

sysctl_is() {  # HostConfig.Sysctls sets them (/proc/sys is read-only here): check, never write
  value=
  read -r value < "/proc/sys/$1" 2>/dev/null || :
  [ "$value" = "$2" ] || log "warning: $1 is '$value', not $2 (HostConfig.Sysctls)"
}

resolver_port() {  # $1: udp or tcp. PORT: where Docker's resolver listens on 127.0.0.11 (its DNAT's target)
  # /proc/net/{udp,tcp} of this network namespace: 127.0.0.11 is 0B00007F there, the port in
  # hex; for tcp only a listener (state 0A). No iptables-save (a process and the whole table).
  while read -r _ local _ state _; do
    case "$local" in 0B00007F:*) ;; *) continue ;; esac
    [ "$1" = udp ] || [ "$state" = 0A ] || continue
    PORT=$((0x${local#*:})); return 0
  done < "/proc/net/$1"
  return 1
}

connect_network() {  # $1: the namespaces' pid
  # The veth's inner end made in the namespaces' network namespace as eth0 (one ip process for
  # this side, one for theirs).
  ip -batch - <<IP
link add ud0 type veth peer name eth0 netns $1
addr add $OUTER_IP/30 dev ud0
link set ud0 up
IP
  nsenter -t "$1" -n ip -batch - <<IP
link set lo up
addr add $INNER_IP/30 dev eth0
link set eth0 up
route add default via $OUTER_IP
IP
}

prepare_nat() {  # the veth's NAT, before the veth exists (the rules name it): iptables-restore
  sysctl_is net/ipv4/ip_forward 1
  # Docker's resolver listens on 127.0.0.11 at ports of its choosing; its own DNAT only
  # covers this side's locally made packets, so the namespaces get one of their own. All the
  # rules in one iptables-restore (one process, one transaction).
  rules="-A POSTROUTING -s $INNER_IP/32 ! -o ud0 -j MASQUERADE"
  if [ -n "$DOCKER_DNS" ]; then
    sysctl_is net/ipv4/conf/all/route_localnet 1
    for proto in udp tcp; do
      resolver_port "$proto" || { log "warning: no Docker resolver for $proto"; continue; }
      rules="$rules
-A PREROUTING -i ud0 -d $OUTER_IP/32 -p $proto -m $proto --dport 53 -j DNAT --to-destination 127.0.0.11:$PORT"
    done
  fi
  printf '*nat\n%s\nCOMMIT\n' "$rules" | iptables-restore --noflush
  mark outer.nat
}

# The two sides' hand-over, on two fifos opened once and unlinked at once (nothing else can
# open them): the namespaces' side writes a line on its fd 3 as soon as it runs; this side,
# once the network is connected, writes one on their fd 4, which start-dockerd --gated reads
# before dockerd starts. Blocking reads, no polling; a side that dies closes its ends, and the
# other reads end-of-file instead of waiting out a timeout. (tini keeps its copies: the ends of
# two pipes whose other ends are closed once the hand-over is done, reaching nothing.)
start_namespaces() {  # $@: what pid 1 of the namespaces runs (under tini); prepare made the fifos
  # --cgroup: a cgroup namespace of the user namespace's own, rooted where this process is (the
  # container's cgroup, the root of its private namespace, so every path reads the same), lets a
  # Docker-in-Docker inside mount cgroup v1 for its dockerd: the mount shows the desktop's
  # cgroup as its root, never the machine's (no release_agent there).
  unshare --user --map-users="$BASE,0,$SIZE" --map-groups="$BASE,0,$SIZE" --setuid 0 --setgid 0 \
    --mount --pid --fork --mount-proc --net --uts --ipc --cgroup \
    tini -g -- "$@" 3>"$STATE/up" 4<"$STATE/go" &
  unshare_pid=$!
  # In the order the child opens them, or both wait.
  exec 5<"$STATE/up" 6>"$STATE/go"
  rm -f "$STATE/up" "$STATE/go"
  read -r _ <&5 || { exec 5<&- 6>&-; wait "$unshare_pid" || :; die "the namespaces did not start"; }
  exec 5<&-
  inner_pid "$unshare_pid" || die "the namespaces' pid 1 is not a child of unshare"
  pid=$PID
  mark outer.pid
  echo "$pid" > "$STATE/pid"
  connect_network "$pid"
  mark outer.network
  echo go >&6
  exec 6>&-
}

prepare() {  # the cgroups, the files and the NAT, concurrently (independent of each other)
  mkdir -p "$STATE"
  resolv_conf
  prepare_cgroups &
  cgroups=$!
  prepare_nat &
  nat=$!
  prepare_files
  wait "$cgroups" || exit 1  # it said why
  wait "$nat" || die "could not set up the NAT for the namespaces"
}

outer() {
  check_input
  started=$(date +%s%N)
  mark outer.start
  prepare
  mark outer.prepared
  rm -f "$STATE/pid"
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
  mark inner.start
  echo up >&3  # start_namespaces: the outer side connects the network meanwhile
  exec 3>&-
  # The container's /run belongs to the machine's root: a tmpfs of our own, with the shared
  # socket directory moved back into it.
  # (/mnt, an empty directory of the image, holds it meanwhile: nothing to make and remove.)
  [ -d /mnt ] || mkdir /mnt
  mount --bind /run/orchestrator /mnt
  mount --bind "$STATE/resolv.conf" /etc/resolv.conf
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
  mkdir /run/orchestrator
  mount --move /mnt /run/orchestrator
  mark inner.mounts
  # The graphical flavor (desktop-init checked it): the display here too, as the namespaces'
  # root, beside dockerd and without the gate (it needs no network); tini -g stops both.
  if [ "${ORCH_DESKTOP_FLAVOR:-minimal}" = graphical ]; then /usr/local/bin/start-display --supervise 4<&- & fi
  # Its preparations now too; dockerd itself once the network is connected (fd 4).
  exec start-dockerd --supervise --gated
}

probe() {
  check_input
  prepare
  start_namespaces sh -c 'echo up >&3 && exec 3>&- && read -r _ <&4 && exec 4<&- && mount -t tmpfs tmpfs /run && mkdir /sys/fs/cgroup/memory/orch-probe 2>/dev/null; [ ! -d /sys/fs/cgroup/memory ] || rmdir /sys/fs/cgroup/memory/orch-probe'
  wait "$unshare_pid"
}

case "${1:-}" in
  ''|--supervise) outer ;;
  --inner) inner ;;
  --probe) probe ;;
  *) die "usage: userns-desktop [--supervise|--probe]" ;;
esac
