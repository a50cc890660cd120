#!/bin/sh
# PID 1's child in the desktop: prepare and supervise dockerd, then stay up until told to stop.
# tini -g forwards SIGTERM to the whole group, so dockerd shuts its containers down cleanly.
set -eu
start-dockerd --supervise &
supervisor=$!
trap 'kill -TERM "$supervisor" 2>/dev/null; wait "$supervisor"; exit 0' TERM INT
wait "$supervisor"
