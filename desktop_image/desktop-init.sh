#!/bin/sh
# PID 1's child in the desktop: prepare and supervise dockerd, then stay up until told to stop.
# tini -g forwards SIGTERM to the whole group, so dockerd shuts its containers down cleanly.
set -eu
supervise() {
  # A `userns` desktop (the worker sets ORCH_USERNS_BASE): dockerd in a user namespace.
  if [ -n "${ORCH_USERNS_BASE:-}" ]; then exec userns-desktop; fi
  exec start-dockerd --supervise
}
supervise &
supervisor=$!
trap 'kill -TERM "$supervisor" 2>/dev/null; wait "$supervisor"; exit 0' TERM INT
wait "$supervisor"
