#!/bin/sh
# Run a command where the desktop's user runs: inside the user namespace of a `userns` desktop
# (as its root, which is an unprivileged uid of the sandbox), as it is in other profiles.
#   docker exec DESKTOP desktop-enter CMD [ARG...]
# Every way into a desktop (docker exec, the exec and terminal API) goes through here: the
# outer side of a userns desktop keeps the container's capabilities and must run nothing of
# the user's.
set -eu
[ "$#" -gt 0 ] || set -- /bin/sh
if [ -n "${ORCH_USERNS_BASE:-}" ]; then
  pid=$(cat /run/userns/pid 2>/dev/null) || { echo "desktop-enter: the desktop's namespaces are not up" >&2; exit 125; }
  # -a: every namespace of pid 1 there (user, mount, pid, net, uts, ipc, cgroup), its root
  # directory and working directory; uid and gid 0 of that namespace.
  exec nsenter -t "$pid" -a -- "$@"
fi
exec "$@"
