# shellcheck shell=bash
# Sourced by the scripts that run apt-get (scripts/setup, scripts/install-docker).
#
#   apt_get ARGS...   apt-get ARGS..., once no other program holds an apt or dpkg lock: waits up
#                     to APT_WAIT_TIMEOUT seconds (default 900, then a clear failure) and says
#                     once per lock what it waits for ("setup: waiting for the apt lists lock
#                     /var/lib/apt/lists/lock held by PID 812 (apt-get update)...").
#
# apt-get's own -o DPkg::Lock::Timeout waits for the dpkg locks only: while another
# `apt-get update` holds the lists lock (a fresh cloud machine runs unattended upgrades at boot)
# apt-get fails at once with exit 100. apt locks with fcntl, which flock(1) does not see: the
# wait is scripts/lib/apt_locks.py. APT_WAIT_LOCKS (space-separated paths) replaces the list of
# locks, for tests. Runs $python when the sourcing script set it (scripts/setup does), else python3.

apt_wait_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
apt_wait_locks=${APT_WAIT_LOCKS:-/var/lib/apt/lists/lock /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/cache/apt/archives/lock}
apt_wait_who=${apt_wait_who:-$(basename "$0")}

apt_wait_for_locks() {
    # shellcheck disable=SC2086  # the list is split on spaces on purpose
    "${python:-python3}" "$apt_wait_dir/apt_locks.py" wait "${APT_WAIT_TIMEOUT:-900}" "$apt_wait_who" $apt_wait_locks
}

# Another program may take a lock between the wait and apt-get's own attempt (apt-get exits
# 100 at once): then wait again, a few times.
apt_get() {
    local attempt rc
    for attempt in 1 2 3 4 5; do
        apt_wait_for_locks || return 1
        rc=0
        apt-get -o DPkg::Lock::Timeout=600 "$@" || rc=$?
        # shellcheck disable=SC2086
        if [ "$rc" != 100 ] || [ "$attempt" = 5 ] \
            || ! "${python:-python3}" "$apt_wait_dir/apt_locks.py" held $apt_wait_locks; then
            return "$rc"
        fi
    done
}
