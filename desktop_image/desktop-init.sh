#!/bin/sh
# PID 1's child in the desktop: prepare and supervise dockerd, then stay up until told to stop.
# tini -g forwards SIGTERM to the whole group, so dockerd shuts its containers down cleanly.
set -eu
[ -z "${ORCH_TRACE_PHASES:-}" ] || echo "phase init $(date +%s%N)" >&2
. /usr/local/lib/orchestrator/session-env.sh
# A `userns` desktop (the worker sets ORCH_USERNS_BASE in the container's Env; the session's
# env file never holds it): dockerd in a user namespace. Decided before the session's env loads.
daemon=/usr/local/bin/start-dockerd
[ -z "${ORCH_USERNS_BASE:-}" ] || daemon=/usr/local/bin/userns-desktop
# The flavor and its screen, also the worker's (the container's Env), also read before the
# session's env loads, and exported again after it, so a session variable never changes them.
flavor=${ORCH_DESKTOP_FLAVOR:-minimal} size=${ORCH_DISPLAY_SIZE:-}
case "$flavor" in
  minimal) ;;
  graphical)
    [ -x /usr/local/bin/start-display ] || {
      echo "desktop-init: the graphical flavor needs the graphical image (no start-display here)" >&2; exit 1; } ;;
  *) echo "desktop-init: ORCH_DESKTOP_FLAVOR must be minimal or graphical, got '$flavor'" >&2; exit 1 ;;
esac
# The user's home lives on the session's volume beside the desktop's Docker data, so a stop
# and a start (a new container) keep it: /root is bound to <volume>/.orchestrator-home, seeded
# once from the image's /root. The directory is written by the desktop's user, who may be
# hostile: nothing of theirs runs yet at this point (a new container), and a symlink or
# anything but a directory there is refused rather than followed.
# Without a volume there (start-dockerd refuses that desktop below) there is no home to keep.
home_store=/var/lib/docker/.orchestrator-home
if ! awk '$5 == "/var/lib/docker" { found = 1 } END { exit !found }' /proc/self/mountinfo; then
  :
elif [ -L "$home_store" ] || { [ -e "$home_store" ] && [ ! -d "$home_store" ]; }; then
  echo "desktop-init: $home_store is not a directory; refusing to use it as the home" >&2; exit 1
else
  if [ ! -d "$home_store" ]; then
    rm -rf "$home_store.new" && mkdir -m 0700 "$home_store.new" && cp -a /root/. "$home_store.new/" \
      && mv "$home_store.new" "$home_store" || { echo "desktop-init: could not seed the home" >&2; exit 1; }
  fi
  mount --bind "$home_store" /root || { echo "desktop-init: could not mount the home from the volume" >&2; exit 1; }
fi
# When this desktop started (seconds since boot, which every namespace shares): display.ready
# counts from here.
read -r ORCH_INIT_UPTIME _ < /proc/uptime
own() { export ORCH_DESKTOP_FLAVOR="$flavor" ORCH_INIT_UPTIME; [ -z "$size" ] || export ORCH_DISPLAY_SIZE="$size"; }
# The session's env (a root-only file, never the container's Env) reaches dockerd and what it
# runs; loaded in the child, so a session variable never changes this script.
(load_session_env && own && exec "$daemon" --supervise) &
supervisor=$!
# The display runs where the user does: here outside the userns profile; under it, inside the
# namespaces (userns-desktop --inner starts it there).
display=
if [ "$flavor" = graphical ] && [ -z "${ORCH_USERNS_BASE:-}" ]; then
  (load_session_env && own && exec /usr/local/bin/start-display --supervise) &
  display=$!
fi
trap 'kill -TERM "$supervisor" $display 2>/dev/null; wait "$supervisor"; exit 0' TERM INT
wait "$supervisor"
