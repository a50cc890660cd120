"""The one way into a desktop for the user's commands (exec now, terminals later): through
``desktop-enter``, which under the ``userns`` profile runs the command inside the desktop's
user namespace as its root (an unprivileged uid of the sandbox), and as is under the others.
Nothing of the user's ever runs on the outer side of a userns desktop, which keeps the
container's capabilities.

Inside, a small POSIX sh wrapper loads the session's env (root's file, as login shells do),
then the request's env over it, changes to the working directory, and drops to the requested
user, then execs the command. Its arguments carry everything: none of it is a docker exec
option, because those apply to the outer side (its Env, WorkingDir and User are not the user
namespace's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ENTER = "desktop-enter"

# $1 cwd ('' for the user's home, or /), $2 user ('' for root), $3 the number of NAME=VALUE
# pairs that follow, then the argv. `export "$1"` assigns, never evaluates.
WRAPPER = r"""
cwd=$1 user=$2 n=$3
shift 3
if [ -r /etc/orchestrator/session.env ] && [ -r /usr/local/lib/orchestrator/session-env.sh ]; then
  . /usr/local/lib/orchestrator/session-env.sh
  load_session_env
fi
while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n - 1)); done
if [ -n "$user" ]; then
  entry=$(getent passwd "$user") || { echo "exec: no user $user in the desktop" >&2; exit 126; }
  home=$(printf '%s' "$entry" | cut -d: -f6)
  export HOME="${home:-/}" USER="$(printf '%s' "$entry" | cut -d: -f1)"
  if [ -n "$cwd" ]; then cd -- "$cwd" || exit 126; else cd -- "$HOME" 2>/dev/null || cd /; fi
  exec setpriv --reuid="$(printf '%s' "$entry" | cut -d: -f3)" --regid="$(printf '%s' "$entry" | cut -d: -f4)" \
    --init-groups -- "$@"
fi
if [ -n "$cwd" ]; then cd -- "$cwd" || exit 126; else cd /root 2>/dev/null || cd /; fi
exec "$@"
"""


def enter_argv(argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, user: str | None) -> list[str]:
    """The docker exec Cmd that runs ``argv`` in the desktop as its user would."""
    pairs = [f"{name}={value}" for name, value in env.items()]
    return [ENTER, "/bin/sh", "-c", WRAPPER, "orchestrator-exec", cwd or "", user or "", str(len(pairs)), *pairs, *argv]
