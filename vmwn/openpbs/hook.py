"""vmwn's OpenPBS hook: one script, installed as two site hooks by vmwn.openpbs.install.

It runs inside pbs_server (``vmwn_submit``: event ``queuejob``) or pbs_mom
(``vmwn``: the execjob events) on their embedded Python, so it stays tiny and
imports nothing of vmwn: the work is done by vmwn's installed runtime, run as a
subprocess with a timeout below the hook's alarm (``python -I -m
vmwn.openpbs.runtime``), so that no hook can hang a daemon.

- ``queuejob``: ``qsub -v VMWN_ENV=ENV`` becomes ``-l vmwn=ENV``; an environment
  this node does not configure is refused with one line (``qsub: vmwn: ...``).
- ``execjob_begin``: prepares the job's VM and starts its warden, which boots it
  while the mom goes on (the runtime returns in well under a second).
- ``execjob_launch``: the job's program becomes vmwn's job starter for OpenPBS
  (``e.progname``/``e.argv``): ``STARTER batch SHELL`` for a script job (the
  script's path stays on its stdin), ``STARTER exec PROGRAM ARGS...`` for
  ``qsub -- PROGRAM ARGS``.
- ``execjob_epilogue``, ``execjob_end``: stop the warden and destroy the VM
  (idempotent; ``end`` catches jobs whose epilogue never ran).
- ``execjob_postsuspend``, ``execjob_preresume``: pause and resume the VM (the
  mom stops the job's processes with SIGSTOP, which the starter cannot relay).
- ``exechost_periodic`` (every ``freq`` seconds) and ``execjob_epilogue`` (before
  the VM goes): ``resources_used.cput`` and ``mem`` of each vmwn job become what
  its VM and its own processes used.  The mom counts a job's processes by
  session, and QEMU (libvirt's child) is in none of the job's sessions; once a
  hook has set them the mom keeps the hook's values, charges them and kills the
  job at its ``cput``/``mem`` limits as it does a native job.

Jobs without the ``vmwn`` resource are accepted untouched.  The values below
the marker are written by the installer.
"""

import json
import os
import subprocess

# @vmwn-install@ (values written by vmwn.openpbs.install)
PYTHON = "/usr/local/lib/vmwn/bin/python"
CONFIG = "/etc/vmwn/vmwn.conf"
STARTER = "/usr/local/libexec/vmwn/openpbs-starter"
RESOURCE = "vmwn"
ENV_VARIABLE = "VMWN_ENV"
# Seconds a runtime call may take, per event: below the hooks' alarms (install.py).
TIMEOUTS = {"check": 20, "begin": 50, "end": 110, "suspend": 20, "resume": 20,
            "usage": 20}


def runtime(action, payload, timeout=None):
    """Run ``vmwn.openpbs.runtime ACTION`` with ``payload`` (JSON) on stdin:
    (exit status, its last line on stdout or stderr).  A runtime that does not
    answer in time is killed (its process group)."""
    timeout = timeout or TIMEOUTS[action]
    try:
        p = subprocess.Popen([PYTHON, "-I", "-m", "vmwn.openpbs.runtime", action, CONFIG],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True,
                             cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                           "LANG": "C.UTF-8"})
    except OSError as e:
        return 127, f"vmwn: cannot run {PYTHON}: {e.strerror}: reinstall vmwn on this host"
    try:
        out, err = p.communicate(json.dumps(payload).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            pass
        p.communicate()
        return 124, (f"vmwn: {action} did not finish within {timeout} s: the site should "
                     "look at the node's syslog")
    text = (out or err).decode("utf-8", "replace").strip().splitlines()
    return p.returncode, (text[-1] if text else "")


def _text(value):
    return "" if value is None else str(value)


def requested(job):
    """The environment the job asks for ("" for none)."""
    try:
        return _text(job.Resource_List[RESOURCE]).strip()
    except Exception:  # noqa: BLE001 - a hook never raises into the daemon
        return ""


def _variables(job):
    """The job's Variable_List as a dict (the server's copy)."""
    v = job.Variable_List
    if v is None:
        return {}
    try:
        return {str(k): _text(v[k]) for k in v.keys()}
    except Exception:  # noqa: BLE001 - an older pbs: "A=1,B=2" text
        out = {}
        for item in _text(v).split(","):
            k, sep, val = item.partition("=")
            if sep:
                out[k] = val
        return out


def describe(job, pbs_home):
    """What the runtime needs of the job to build its VM (all text)."""
    res = job.Resource_List
    return {"job_id": _text(job.id), "env": requested(job), "user": _text(job.euser),
            "group": _text(job.egroup), "job_name": _text(job.Job_Name),
            "queue": _text(job.queue), "ncpus": _text(res["ncpus"]),
            "mem": _text(res["mem"]), "workdir": _variables(job).get("PBS_O_WORKDIR", ""),
            "pbs_home": pbs_home}


def _seconds(value):
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def charge(pbs, jobs):
    """Set ``resources_used`` of the vmwn jobs among ``jobs`` ({id: job}) from the
    runtime's ``usage``: never lower than what is there already."""
    wanted = {}
    for jid, job in jobs.items():
        if requested(job):
            wanted[_text(jid)] = _seconds(getattr(job, "session_id", None))
    if not wanted:
        return
    rc, line = runtime("usage", {"jobs": wanted})
    try:
        used = json.loads(line) if rc == 0 else None
    except ValueError:
        used = None
    if not isinstance(used, dict):
        pbs.logmsg(pbs.LOG_ERROR, f"vmwn: usage not read: {line}")
        return
    for jid, u in used.items():
        job = jobs.get(jid)
        if job is None:
            continue
        ru = job.resources_used
        ru["cput"] = pbs.duration(max(_seconds(u.get("cput")), _seconds(ru["cput"])))
        ru["mem"] = pbs.size(f"{_seconds(u.get('mem_kb'))}kb")


def on_queuejob(pbs, e):
    job = e.job
    name = requested(job)
    if not name:
        name = _variables(job).get(ENV_VARIABLE, "").strip()
        if not name:
            e.accept()
            return
        job.Resource_List[RESOURCE] = name
    rc, line = runtime("check", {"env": name})
    if rc != 0:
        e.reject(line or f"vmwn: environment {name!r} cannot be checked: the site should "
                 "look at the server's log")
    e.accept()


def on_launch(pbs, e):
    if not requested(e.job):
        e.accept()
        return
    argv = [_text(a) for a in e.argv]
    prog = _text(e.progname)
    if argv:  # qsub -- PROGRAM ARGS: argv[0] is the program (measured)
        new = [STARTER, "exec", prog] + argv[1:]
    else:  # a script job (argv is empty): the shell reads the script's path on stdin
        new = [STARTER, "batch", prog]
    e.progname = STARTER
    e.argv = new
    e.accept()


def run(pbs):
    e = pbs.event()
    kind = e.type
    if kind == pbs.QUEUEJOB:
        return on_queuejob(pbs, e)
    if kind == pbs.EXECJOB_LAUNCH:
        return on_launch(pbs, e)
    if kind == pbs.EXECHOST_PERIODIC:
        charge(pbs, {_text(k): v for k, v in dict(e.job_list).items()})
        e.accept()
        return
    job = e.job
    if not requested(job):
        e.accept()
        return
    pbs_home = _text(pbs.pbs_conf.get("PBS_HOME"))
    if kind == pbs.EXECJOB_BEGIN:
        rc, line = runtime("begin", describe(job, pbs_home))
        if rc != 0:  # the runtime records a refusal the starter shows; this is worse
            pbs.logmsg(pbs.LOG_ERROR, f"vmwn: {line}")
            e.reject(line)
    elif kind in (pbs.EXECJOB_EPILOGUE, pbs.EXECJOB_END):
        if kind == pbs.EXECJOB_EPILOGUE:  # the last count, while the VM is still there
            charge(pbs, {_text(job.id): job})
        rc, line = runtime("end", {"job_id": _text(job.id), "pbs_home": pbs_home})
        if rc != 0:
            pbs.logmsg(pbs.LOG_ERROR, f"vmwn: {line}")
    elif kind in (pbs.EXECJOB_POSTSUSPEND, pbs.EXECJOB_PRERESUME):
        action = "suspend" if kind == pbs.EXECJOB_POSTSUSPEND else "resume"
        rc, line = runtime(action, {"job_id": _text(job.id)})
        if rc != 0:
            pbs.logmsg(pbs.LOG_ERROR, f"vmwn: {line}")
    e.accept()


try:
    import pbs as _pbs
except ImportError:  # imported as vmwn.openpbs.hook (tests, documentation)
    _pbs = None
if _pbs is not None and __name__ != "vmwn.openpbs.hook":
    run(_pbs)
