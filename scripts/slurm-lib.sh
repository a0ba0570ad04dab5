# Shell functions scripts/slurm-up and scripts/slurm-down share (sourced by both,
# after they have set var, etc, run, conf and host).  Not part of vmwn.

cli() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root SLURM_CONF="$conf" "$@" </dev/null; }
ours() {  # ours NAME: pid of this cluster's daemon NAME (exe /usr/sbin/NAME, started
    # with -f $conf, or with SLURM_CONF=$conf (slurmdbd), or on $var/mysql (mariadbd))
    local pid cand args
    cand=$(cat "$run/$1.pid" "$run/mysql/$1.pid" 2>/dev/null || true)
    for pid in $cand $(pgrep -x "$1"); do
        [ -r /proc/"$pid"/cmdline ] || continue
        # /usr/sbin/slurmd is an alternatives link (to slurmd-wlm on Debian).
        [ "$(readlink /proc/"$pid"/exe 2>/dev/null | sed 's/ (deleted)$//')" = "$(readlink -f /usr/sbin/"$1")" ] || continue
        # Read whole, then match: 'tr | grep -q' fails under pipefail when grep
        # leaves before tr has written all.
        args=$( { tr '\0' '\n' </proc/"$pid"/cmdline; } 2>/dev/null) || continue
        # slurmdbd is told its config by SLURM_CONF (an environment not always readable)
        args="$args"$'\n'"$( { tr '\0' '\n' </proc/"$pid"/environ; } 2>/dev/null || true)"
        if grep -qxF -e "$conf" -e "SLURM_CONF=$conf" -e "--datadir=$var/mysql" <<<"$args"; then
            echo "$pid"; return 0
        fi
    done
    return 1
}
running() {  # running PID: PID exists and is no zombie (killed orphans stay zombies
    # until init reaps them, which can take seconds)
    local st
    st=$(cat /proc/"$1"/stat 2>/dev/null) || return 1
    st=${st##*) }
    [ -n "$st" ] && [ "${st%% *}" != Z ]
}
stop_pids() {  # stop_pids PID...: TERM the PIDs together, KILL those alive after 10 s
    local i p alive
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for i in $(seq 120); do
        alive=""
        for p in "$@"; do running "$p" && alive="$alive $p"; done
        [ -n "$alive" ] || return 0
        [ "$i" != 100 ] || kill -KILL $alive 2>/dev/null || true
        sleep 0.1
    done
    return 0
}
# The job cgroups slurmd's steps made on this node.  cgroup v1:
# <controller>/slurm_NODE/uid_U/job_J/... (Debian builds Slurm for several
# slurmd per host, which names the root after the node; plain builds: slurm/).
# cgroup v2: system.slice/NODE_slurmstepd.scope/job_J/... (or
# slurmstepd.scope), below the cgroup slurmd started in.
job_cgroups() {
    local d
    if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
        d=$(find /sys/fs/cgroup -maxdepth 6 -type d \( -name "${host}_slurmstepd.scope" \
            -o -name slurmstepd.scope \) -prune 2>/dev/null || true)
    else
        d=$(ls -d /sys/fs/cgroup/*/slurm_"$host" /sys/fs/cgroup/*/slurm 2>/dev/null || true)
    fi
    [ -z "$d" ] || find $d -mindepth 1 -type d -path '*/job_*' 2>/dev/null || true
}
sweep_jobs() {  # end what runs in job cgroups (no slurmd runs them any more), remove them
    local dirs pids d
    # Not while any slurmd runs (another cluster's, of the same node name).
    for d in $(pgrep -x slurmd); do running "$d" && return 0; done
    dirs=$(job_cgroups)
    [ -n "$dirs" ] || return 0
    # A job killed while suspended is frozen: thaw it, or SIGKILL never lands.
    for d in $dirs; do
        [ ! -w "$d/freezer.state" ] || echo THAWED 2>/dev/null > "$d/freezer.state" || true
        [ ! -w "$d/cgroup.freeze" ] || echo 0 2>/dev/null > "$d/cgroup.freeze" || true
    done
    pids=$(for d in $dirs; do cat "$d/cgroup.procs" 2>/dev/null || true; done | sort -un)
    stop_pids $pids
    # Deepest first: a job id that comes again must find no cgroup of the old job.
    for d in $(printf '%s\n' $dirs | awk '{print length($0), $0}' | sort -rn | cut -d' ' -f2); do
        rmdir "$d" 2>/dev/null || true
    done
    return 0
}
