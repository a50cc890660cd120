# shellcheck shell=sh
# Login shells in the desktop (`docker exec -it desktop-<id> bash -l`, `sh -l`) get the
# session's env, as the processes desktop-init starts do. A plain `docker exec` inherits only
# the container's Env, which holds none of it. The file is root's: other users get nothing.
if [ -r /etc/orchestrator/session.env ] && [ -r /usr/local/lib/orchestrator/session-env.sh ]; then
  . /usr/local/lib/orchestrator/session-env.sh
  load_session_env
fi
