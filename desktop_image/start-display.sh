#!/bin/sh
# The graphical flavor's screen: Xvnc (X server and VNC server in one process) on display :0,
# the window manager and a terminal, under a restart loop. desktop-init runs it (under the
# `userns` profile userns-desktop --inner does, inside the namespaces, as their root: the
# desktop's user owns the screen). docs/graphical.md has the design.
#
#   start-display --supervise   run the display, restarting it when Xvnc dies (foreground)
#
# Environment:
#   ORCH_DISPLAY_SIZE     WIDTHxHEIGHT (default 1280x800)
#   ORCH_VNC_PORT         the VNC port on the desktop's loopback (default 5900)
#   ORCH_INIT_UPTIME      when desktop-init started (/proc/uptime seconds; display.ready counts from it)
#   DISPLAY_LOG           log of the loop and of Xvnc (default /var/log/display.log)
#
# When the display answers, /run/orchestrator/display.ready gets one JSON line (written to a
# temporary name, then renamed): the worker reads it from its side of that directory, as it
# reaches docker.sock there. It is removed when the display dies, rewritten when it is back.
#
# No VNC password: Xvnc listens on the desktop's loopback only (-localhost), which is reached
# from outside through the worker's road into the desktop's network namespace, never a
# published port; a password file here would be readable by the desktop's user, who owns the
# screen anyway. X itself listens on its unix socket only (-nolisten tcp).
set -eu

SIZE=${ORCH_DISPLAY_SIZE:-1280x800}
DEPTH=24
VNC_PORT=${ORCH_VNC_PORT:-5900}
DISPLAY=:0
MARKER=/run/orchestrator/display.ready
LOG=${DISPLAY_LOG:-/var/log/display.log}
export DISPLAY HOME="${HOME:-/root}"

log() { printf '%s start-display: %s\n' "$(date -u +%FT%TZ)" "$*" >> "$LOG"; }
die() { log "error: $*"; printf 'start-display: %s\n' "$*" >&2; exit 1; }
uptime_ms() { read -r up _ < /proc/uptime; UP_MS=$(( ${up%.*} * 1000 + 10 * $(( 1${up#*.} - 100 )) )); }

check_input() {
  case "$SIZE" in *[!0-9x]*|x*|*x|*x*x*|[!0-9]*) die "ORCH_DISPLAY_SIZE must be WIDTHxHEIGHT, got '$SIZE'";; esac
  case "$SIZE" in *x*) ;; *) die "ORCH_DISPLAY_SIZE must be WIDTHxHEIGHT, got '$SIZE'";; esac
  w=${SIZE%x*} h=${SIZE#*x}
  [ "${#w}" -le 5 ] && [ "${#h}" -le 5 ] && [ "$w" -ge 320 ] && [ "$w" -le 7680 ] && [ "$h" -ge 200 ] && [ "$h" -le 4320 ] \
    || die "ORCH_DISPLAY_SIZE $SIZE is out of 320x200..7680x4320"
  case "$VNC_PORT" in ''|*[!0-9]*) die "ORCH_VNC_PORT must be a number, got '$VNC_PORT'";; esac
  [ "$VNC_PORT" -ge 1024 ] && [ "$VNC_PORT" -le 65535 ] || die "ORCH_VNC_PORT $VNC_PORT is out of 1024..65535"
}

write_marker() {  # $1: ms from Xvnc's start to an answer; $2: restarts so far; $3 $4 $5: width height depth
  uptime_ms
  since=null
  case "${ORCH_INIT_UPTIME:-}" in
    *.*) since=$(( UP_MS - ${ORCH_INIT_UPTIME%.*} * 1000 - 10 * $(( 1${ORCH_INIT_UPTIME#*.} - 100 )) )) ;;
  esac
  printf '{"display":"%s","width":%s,"height":%s,"depth":%s,"vnc_port":%s,"since_init_ms":%s,"start_ms":%s,"restarts":%s}\n' \
    "$DISPLAY" "$3" "$4" "$5" "$VNC_PORT" "$since" "$1" "$2" > "$MARKER.tmp"
  mv -f "$MARKER.tmp" "$MARKER"
}

session() {  # the window manager and the terminal, each respawned while the display lives
  # No core X fonts in the image: "fixed" is one the X server has built in.
  ( while :; do evilwm -fn fixed >> "$LOG" 2>&1 || :; sleep 1; done ) &
  ( cd "$HOME" 2>/dev/null || cd /
    while :; do
      xterm -ls -fa 'DejaVu Sans Mono' -fs 11 -geometry 100x30+10+10 -title terminal >> "$LOG" 2>&1 || :
      sleep 1
    done ) &
}

supervise() {
  stopping=0 xvnc= restarts=0 delay=1
  trap 'stopping=1; [ -z "$xvnc" ] || kill -TERM "$xvnc" 2>/dev/null || :' TERM INT
  while :; do
    rm -f "$MARKER" "$MARKER.tmp" /tmp/.X0-lock /tmp/.X11-unix/X0
    uptime_ms; began=$UP_MS
    log "starting Xvnc $DISPLAY ${SIZE}x$DEPTH, VNC on 127.0.0.1:$VNC_PORT"
    # -AcceptSetDesktopSize=0: a VNC client cannot resize the screen under an agent's coordinates.
    Xvnc "$DISPLAY" -geometry "$SIZE" -depth "$DEPTH" -rfbport "$VNC_PORT" -localhost=1 -interface 127.0.0.1 \
      -SecurityTypes None -nolisten tcp -AlwaysShared=1 -AcceptSetDesktopSize=0 -desktop orchestrator -dpi 96 \
      >> "$LOG" 2>&1 &
    xvnc=$!
    # The display answers when orch-screen reads its size and depth through Xlib (at most 30 s).
    answer=
    tries=0
    while [ "$tries" -lt 1500 ] && kill -0 "$xvnc" 2>/dev/null; do
      if answer=$(orch-screen geometry --plain 2>/dev/null); then break; fi
      answer=; tries=$((tries + 1)); sleep 0.02
    done
    if [ -n "$answer" ]; then
      session
      uptime_ms
      # shellcheck disable=SC2086  # three numbers
      write_marker "$((UP_MS - began))" "$restarts" $answer
      log "display ready in $((UP_MS - began)) ms ($answer)"
      delay=1
    else
      log "the display did not answer"
      kill -TERM "$xvnc" 2>/dev/null || :
    fi
    status=0
    wait "$xvnc" || status=$?
    if [ "$stopping" = 1 ]; then wait "$xvnc" 2>/dev/null || :; rm -f "$MARKER"; log "stopped"; exit 0; fi
    rm -f "$MARKER"
    # The session's clients die with their display; their loops go too.
    kill -TERM $(jobs -p) 2>/dev/null || :
    restarts=$((restarts + 1))
    log "Xvnc exited with status $status; restarting in ${delay}s"
    sleep "$delay"
    delay=$((delay * 2)); [ "$delay" -le 16 ] || delay=16
  done
}

case "$LOG" in */*) mkdir -p "${LOG%/*}" ;; esac
case "${1:---supervise}" in
  --supervise) check_input; supervise ;;
  *) die "usage: start-display [--supervise]" ;;
esac
