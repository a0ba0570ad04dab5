# vmwn_job_dir STATE_DIR JOB_ID: true when vmwn may have made something for the
# job, that is when STATE_DIR/<head>-<digest> exists, named as
# vmwn.state.safe_name names it (the head: the id with [ ] @ as _, at most 40
# characters, no leading dots; the digest: the first 8 hex digits of the id's
# SHA-256).  The name is computed, not listed: job users may search state_dir
# but not read it.  An id with other characters, or no sha256sum, counts as
# true and Python decides.  Pasted into the job starter and the epilogue step
# by 'vmwn install'; tests/test_gates.py holds it to safe_name.
vmwn_job_dir() {
    case $2 in
    '' | *[!A-Za-z0-9._@\[\]-]*) return 0 ;;
    *[\[\]@]*) _h=$(printf '%s' "$2" | tr '[]@' '___') ;;
    *) _h=$2 ;;
    esac
    while [ ${#_h} -gt 40 ]; do _h=${_h%?}; done
    while case $_h in .*) true ;; *) false ;; esac; do _h=${_h#.}; done
    [ -n "$_h" ] || _h=job
    _s=$(printf '%s' "$2" | sha256sum 2>/dev/null)
    _s=${_s%%[!0-9a-f]*}
    [ ${#_s} -eq 64 ] || return 0
    _s=${_s%????????????????????????????????????????????????????????}
    [ -e "$1/$_h-$_s" ] || [ -L "$1/$_h-$_s" ]
}
