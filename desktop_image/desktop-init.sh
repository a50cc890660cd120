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
# The session's env (a root-only file, never the container's Env) reaches dockerd and what it
# runs; loaded in the child, so a session variable never changes this script.
(load_session_env && exec "$daemon" --supervise) &
supervisor=$!
trap 'kill -TERM "$supervisor" 2>/dev/null; wait "$supervisor"; exit 0' TERM INT
wait "$supervisor"
