# shellcheck shell=sh
# The session's env, as the worker writes it into the desktop before its first start
# (workers/runtime/session_env.py): /etc/orchestrator/session.env, root-only, one variable a
# line, NAME=BASE64 (the base64 of the value's bytes, so a value may hold anything but NUL).
#
# Sourced by desktop-init and by login shells (/etc/profile.d/orchestrator-session-env.sh);
# POSIX sh (dash, bash). The file is parsed, never evaluated: a name must match
# [A-Za-z_][A-Za-z0-9_]*, a value is only decoded and assigned. The loader's own variables
# are _senv_file, _senv_n, _senv_line, _senv_name and _senv_value: a session variable with one
# of those names is lost.

# load_session_env [FILE]: export every variable of FILE (default: the session's env file).
# A missing or unreadable file (no env, or not root) exports nothing. A malformed line, or a
# variable the shell refuses (bash's readonly UID, say), is skipped with a warning on stderr
# that names its line number, never its value.
load_session_env() {
  _senv_file=${1:-/etc/orchestrator/session.env}
  _senv_n=0
  if [ -r "$_senv_file" ]; then
    while IFS= read -r _senv_line || [ -n "$_senv_line" ]; do
      _senv_n=$((_senv_n + 1))
      _senv_name=${_senv_line%%=*}
      case $_senv_name in
        '' | [0-9]* | *[!A-Za-z0-9_]*) _senv_name= ;;
      esac
      if [ -z "$_senv_name" ] || [ "$_senv_name" = "$_senv_line" ]; then
        printf 'session-env: line %s of %s is malformed: skipped\n' "$_senv_n" "$_senv_file" >&2
        continue
      fi
      # The x keeps trailing newlines, which command substitution strips. An absolute path:
      # a PATH the session set a line earlier must not choose the decoder.
      if ! _senv_value=$(printf '%s' "${_senv_line#*=}" | /usr/bin/base64 -d 2>/dev/null && echo x); then
        printf 'session-env: line %s of %s is not base64: skipped\n' "$_senv_n" "$_senv_file" >&2
        continue
      fi
      # `command`: a refused export (a readonly variable) is an error to report, not one that
      # ends a POSIX shell.
      command export "$_senv_name=${_senv_value%x}" 2>/dev/null ||
        printf 'session-env: line %s of %s: the shell refused %s: skipped\n' "$_senv_n" "$_senv_file" "$_senv_name" >&2
    done < "$_senv_file"
  fi
  unset _senv_file _senv_n _senv_line _senv_name _senv_value
}
