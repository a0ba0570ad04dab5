"""``vmwn check --boot ENV``: boot one VM the way a job's is booted, and check what a job needs.

The check goes the product's own way and no other: a ``spec.JobSpec`` sized
by ``spec.size``, ``lifecycle.create`` (keys, seed, overlay, virtiofsd in the
mounted mode, the domain, the wait for SSH), then, as the check's user in a
child process (``privs.run_as``, as the job starter runs as the job's user):
an SSH login with the job's key and the guest's pinned host key,
``transfer.prepare`` (the copy mode's stage-in; the guest's mount table) and
one command built by the job starter's ``build_command``; in the copy mode
``transfer.harvest``; last ``lifecycle.destroy``.

The working directory is real: a fresh directory (mode 0700, owned by the
check's user) that the check makes and removes.  The environment's data mode
is the configured one.  What is checked:

- the working directory is in the guest at the host's path (mounted: a
  virtio-fs mount there), and the job's command starts in it;
- a file the host put there is read in the guest, and a file the guest writes
  there reaches the host (at once when mounted, by the harvest when copied)
  owned by the check's user and group;
- the guest presents the host key vmwn generated for it and takes the job's key;
- teardown leaves no domain, virtiofsd, overlay, seed, key, state directory,
  working directory or temporary launcher behind.

Every failure is one line (problem: fix) in the returned list; whatever was
made is removed on every path, an interrupt (SIGINT, SIGTERM, SIGHUP) included.
"""

import dataclasses
import logging
import os
import pwd
import signal
import stat
import sys
import tempfile
import time

from ..errors import SiteError, UserError, VmwnError

log = logging.getLogger(__name__)

# The check's own identity when no --user is given: an account of that name
# if the node has one, else these ids with no account, so that no real user's
# files or processes share them.  (nobody cannot be it: guests have their own.)
CHECK_USER = "vmwncheck"
CHECK_UID = 60999
CHECK_ID_SPAN = 1000
DEFAULT_PARENT = "/tmp"
IN_NAME = "vmwn-check-in"     # written on the host, read in the guest
OUT_NAME = "vmwn-check-out"   # written in the guest, looked for on the host
GUEST_TIMEOUT = 120.0
HARVEST_TIMEOUT = 60.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who the check's job runs as."""
    user: str
    uid: int
    gid: int
    group: str
    account: bool  # the node has an account of this name

    def describe(self):
        what = "" if self.account else "; no account on this node"
        return f"{self.user} (uid {self.uid}, gid {self.gid}{what})"


def identity(name=None):
    """The check's user: the account ``name`` (--user), else :data:`CHECK_USER`."""
    import grp
    if name:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise SiteError(f"--user {name}: no such account on this node",
                            "name an existing unprivileged account, or leave --user out "
                            f"to run the check as {CHECK_USER}") from None
        if pw.pw_uid == 0:
            raise SiteError(f"--user {name}: the check's job runs as an unprivileged user, "
                            "as every job does", "name an unprivileged account")
    else:
        try:
            pw = pwd.getpwnam(CHECK_USER)
        except KeyError:
            pw = None
        if pw is None or pw.pw_uid == 0:
            return Identity(CHECK_USER, *([_free_id()] * 2), CHECK_USER, False)
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        raise SiteError(f"the primary group {pw.pw_gid} of {pw.pw_name} has no name",
                        "give it one in /etc/group, or name another account with "
                        "--user") from None
    return Identity(pw.pw_name, pw.pw_uid, pw.pw_gid, group, True)


def _free_id():
    import grp
    for i in range(CHECK_UID, CHECK_UID - CHECK_ID_SPAN, -1):
        try:
            pwd.getpwuid(i)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(i)
            continue
        except KeyError:
            return i
    raise SiteError(f"no id from {CHECK_UID - CHECK_ID_SPAN + 1} to {CHECK_UID} is free "
                    "for the check's user", "name an unprivileged account with --user")


@dataclasses.dataclass
class _Made:
    """What this check made (the teardown's list), and what it learnt."""
    job_id: str
    workdir: str = ""
    launcher_dir: str = ""
    created: bool = False  # lifecycle.create was called: a domain may exist
    shares: list = dataclasses.field(default_factory=list)
    phases: list = dataclasses.field(default_factory=list)


def run(cfg, env, who, parent=DEFAULT_PARENT, say=None):
    """Boot ``env`` once as ``who`` (an :class:`Identity`); a list of problem lines."""
    say = say or _say
    name = f"boot {env.name}"
    if os.geteuid() != 0:
        return [f"{name}: booting a VM as a job's needs root, as the prologue has: run "
                f"'vmwn check --boot {env.name}' as root"]
    from .. import interrupt
    made = _Made(job_id=f"check-{os.getpid()}-{int(time.time())}.vmwn")
    problems = []
    stopped = None
    t0 = time.monotonic()
    # Signals are only noted (vmwn.interrupt): the boot stops at its next waiting
    # point with everything it started recorded, and the teardown is never cut short.
    with interrupt.noted(*_SIGNALS):
        try:
            _boot_and_use(cfg, env, who, parent, made, say)
        except interrupt.Interrupted as e:
            stopped = e
        except VmwnError as e:
            problems.append(f"{name}: {e.line()}")
        except Exception as e:  # noqa: BLE001 - a bug: one line here, details with -v
            from ..cli import internal_error_line
            log.debug("boot check failed", exc_info=e)
            problems.append(f"{name}: {internal_error_line(e)}")
        finally:
            problems += _teardown(cfg, made, name)
        stopped = stopped or interrupt.requested()
    if stopped:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        raise KeyboardInterrupt  # vmwn's one line for an interrupted command
    for phase, secs in made.phases:
        say(f"phase {phase:<22} {secs:7.3f} s")
    say(f"phase {'total':<22} {time.monotonic() - t0:7.3f} s")
    if not problems:
        say("teardown: no domain, virtiofsd, overlay, seed, key, state directory or working "
            "directory left: ok")
    return problems


def _say(line):
    print(line, flush=True)


def _boot_and_use(cfg, env, who, parent, made, say):
    from .. import config as configmod, interrupt, lifecycle, spec as specmod, transfer
    made.workdir = _private_dir(parent, who)
    token_in, token_out = os.urandom(12).hex(), os.urandom(12).hex()
    _write_new(os.path.join(made.workdir, IN_NAME), token_in + "\n", who)
    say(f"boot {env.name}: job {made.job_id}, data = {env.data}, as {who.describe()}, "
        f"working directory {made.workdir} (0700)")
    _as_user(who, _can_use, made.workdir, fix="choose a --dir every user can search")
    vcpus, memory = specmod.size(cfg, env, made.job_id)
    try:
        spec = specmod.JobSpec(job_id=made.job_id, user=who.user, uid=who.uid, gid=who.gid,
                               group=who.group, job_name="vmwn-check", env=env, vcpus=vcpus,
                               memory_mib=memory, workdir=made.workdir,
                               host_workdir=made.workdir)
    except UserError as e:  # what a job's submitter would be told; here it is the operator
        raise SiteError(f"no job could run as this check: {e.problem}",
                        "choose another --dir or --user") from None
    cfg = _with_launcher(cfg, made, say)
    made.created = True
    st = lifecycle.create(cfg, spec, time.monotonic() + env.boot_timeout + 30,
                          on_phase=lambda n, s: made.phases.append((n, s)))
    made.shares = [s["path"] for s in st.shares]
    interrupt.check()
    _preload()
    t = time.monotonic()
    seen = _as_user(who, _in_guest, dataclasses.asdict(st), token_out,
                    configmod.parse_bytes(cfg.site["stage_in_max"]), env.ssh_user_shell,
                    fix=f"see 'vmwn check --boot {env.name} -v' and the node's log")
    made.phases.append(("login and job command", time.monotonic() - t))
    interrupt.check()
    say(f"ssh: the guest presented its pinned host key ({seen['fingerprint']}) and took "
        f"the job's key as {who.user}: ok")
    for line in seen["lines"]:
        say(f"guest: {line}")
    _judge_guest(seen, st, who, token_in, env)
    if made.shares:
        say(f"share: {', '.join(made.shares)} mounted in the guest at the same path: ok")
    else:
        say(f"copy: {made.workdir} staged into the guest at the same path: ok")
    if env.data == "copy":
        t = time.monotonic()
        transfer.harvest(cfg, st, timeout=HARVEST_TIMEOUT)
        made.phases.append(("harvest", time.monotonic() - t))
    _judge_host_file(os.path.join(made.workdir, OUT_NAME), token_out, who, env)
    say(f"files: the host's file read in the guest, the guest's file on the host "
        f"({'harvested' if env.data == 'copy' else 'at once'}) owned by "
        f"{who.user}:{who.group}: ok")


def _private_dir(parent, who):
    """A fresh directory in ``parent``, the check's user's alone (0700)."""
    try:
        d = tempfile.mkdtemp(prefix="vmwn-check-", dir=parent)
    except OSError as e:
        raise SiteError(f"cannot make the check's working directory in {parent}: "
                        f"{e.strerror or e}", "choose another --dir") from None
    try:
        os.chown(d, who.uid, who.gid)
        os.chmod(d, 0o700)
        s = os.lstat(d)
    except OSError as e:
        _remove_tree(d)
        raise SiteError(f"cannot give the check's working directory {d} to {who.user}: "
                        f"{e.strerror or e}", "choose a --dir on a file system where root "
                        "may change owners") from None
    if (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) != (who.uid, who.gid, 0o700):
        _remove_tree(d)
        raise SiteError(f"the check's working directory {d} is {s.st_uid}:{s.st_gid} "
                        f"{stat.S_IMODE(s.st_mode):04o}, not {who.uid}:{who.gid} 0700",
                        "choose a --dir on a file system that keeps owners and modes")
    return d


def _write_new(path, text, who):
    """Create ``path`` (never through anything already there) for ``who``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
        os.fchown(fd, who.uid, who.gid)
    finally:
        os.close(fd)


def _as_user(who, func, *args, fix):
    """``func(*args)`` as the check's user; its ``{"problem": ...}`` becomes a SiteError."""
    from .. import privs
    out = privs.run_as(who.user, who.uid, who.gid, func, *args, timeout=GUEST_TIMEOUT)
    if isinstance(out, dict) and out.get("problem"):
        raise SiteError(out["problem"], out.get("fix") or fix)
    return out


def _can_use(workdir):
    """As the check's user: the working directory can be entered and read."""
    try:
        os.chdir(workdir)
        with open(IN_NAME, encoding="utf-8") as f:
            f.read()
    except OSError as e:
        return {"problem": f"the check's user cannot use its working directory {workdir} "
                           f"({e.strerror or e})"}
    return None


def _with_launcher(cfg, made, say):
    """``cfg``, or a copy whose launcher is a temporary one when none is installed
    yet (a new node before 'make install'): the same program vmwn-install writes."""
    from .. import emulator, state
    path = cfg.site["emulator"]
    if os.access(path, os.X_OK):
        return cfg
    try:
        made.launcher_dir = tempfile.mkdtemp(prefix=".check-", dir=state.ensure_root(cfg))
        os.chmod(made.launcher_dir, 0o711)  # libvirt runs the launcher as the job's user
        launcher = os.path.join(made.launcher_dir, "qemu")
        emulator.build(launcher, cfg.site["qemu"])
    except OSError as e:
        raise SiteError(f"launcher {path} is not installed and a temporary one cannot be "
                        f"written in {cfg.site['state_dir']} ({e.strerror or e})",
                        "run 'make install' (or vmwn-install) first") from None
    say(f"warning: launcher {path}: not installed yet ('make install' or vmwn-install "
        "writes it); this boot uses a temporary copy")
    return dataclasses.replace(cfg, site=dict(cfg.site, emulator=launcher))


def _preload():
    """Import before the fork what the child needs: as the check's user it may not be
    able to read the Python installation."""
    import base64  # noqa: F401
    import encodings.idna  # noqa: F401
    import hashlib  # noqa: F401
    import shlex  # noqa: F401
    import tarfile  # noqa: F401
    import paramiko  # noqa: F401
    import paramiko.sftp_client  # noqa: F401
    from .. import guestfiles, ssh, state, transfer  # noqa: F401
    from .. import jobrun  # noqa: F401
    paramiko.Ed25519Key  # noqa: B018


# The check's job: where it started, who it is, the host's file, a file of its own.
_SCRIPT = ('echo "vmwn-check pwd $(pwd)"; echo "vmwn-check id $(id)"; '
           'echo "vmwn-check in $(cat -- {inp} 2>&1)"; '
           'if printf %s {token} > {out}; then echo "vmwn-check out ok"; fi; '
           'echo "vmwn-check uname $(uname -a)"')


def _in_guest(st_fields, token, max_bytes, shell):
    """As the check's user: what the job starter does, with the check's command."""
    import base64
    import hashlib
    import posixpath
    import shlex
    from .. import guestfiles, ssh, transfer
    from ..state import JobState
    from .. import jobrun
    st = JobState.from_json(st_fields)
    copy = st.data == "copy"
    try:
        guest = ssh.Guest.connect(st)
    except VmwnError as e:
        return {"problem": f"SSH to the guest as {st.user} failed: {e.problem}",
                "fix": e.fix}
    except Exception as e:  # noqa: BLE001 - one line, no trace
        return {"problem": f"SSH to the guest as {st.user} failed: {type(e).__name__}: "
                           f"{' '.join(str(e).split())}", "fix": "see the node's log"}
    try:
        key = guest.client.get_transport().get_remote_server_key()
        if f"{key.get_name()} {key.get_base64()}" != " ".join(
                st.host_key_public.split()[:2]):
            return {"problem": "the guest's SSH server presented a host key other than "
                               "the one vmwn generated for it",
                    "fix": "report this as a bug in vmwn (ssh.py must pin the key)"}
        fingerprint = "SHA256:" + base64.b64encode(
            hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
        ctl = st.control_dir or guestfiles.control_dir(st.user, False)
        prep = transfer.prepare(guest, ctl, [], workdir=st.workdir if copy else None,
                                host_dir=st.host_workdir if copy else None,
                                max_bytes=max_bytes, home=posixpath.dirname(ctl),
                                shell=shell, mounts=bool(st.shares), umask=0o077)
        missing = jobrun.unmounted(prep.proc_mounts, [s["path"] for s in st.shares])
        if missing:
            return {"problem": f"the guest did not mount {missing[0]} from the host over "
                               f"virtio-fs (environment {st.env}, data = mounted)",
                    "fix": "give the environment a guest with virtio-fs, or set data = "
                           "copy for it"}
        script = _SCRIPT.format(inp=shlex.quote(IN_NAME), out=shlex.quote(OUT_NAME),
                                token=shlex.quote(token))
        command = jobrun.build_command(guestfiles.pidfile(ctl), st.workdir, [],
                                        [shell, "-c", script], umask=0o077)
        status, out, err = guest.run(command, timeout=GUEST_TIMEOUT / 2)
    except VmwnError as e:
        return {"problem": f"the check's job in the guest failed: {e.problem}", "fix": e.fix}
    except Exception as e:  # noqa: BLE001 - paramiko's, the guest gone: one line, no trace
        return {"problem": "the check's job in the guest failed: "
                           f"{type(e).__name__}: {' '.join(str(e).split())}",
                "fix": "see the node's log; the guest may have stopped"}
    finally:
        guest.close()
    text = out.decode("utf-8", "replace")
    seen = {"status": status, "fingerprint": fingerprint, "lines": [],
            "err": " ".join(err.decode("utf-8", "replace").split())[:200]}
    for line in text.splitlines():
        if line.startswith("vmwn-check "):
            k, _, v = line[len("vmwn-check "):].partition(" ")
            seen[k] = v
            if k in ("id", "uname"):
                seen["lines"].append(v)
    return seen


def _judge_guest(seen, st, who, token_in, env):
    fix = f"check the environment's image ('vmwn image build {env.name}')"
    if seen["status"] != 0 or "pwd" not in seen:
        raise SiteError(f"the check's job in the guest failed (status {seen['status']}"
                        f"{': ' + seen['err'] if seen['err'] else ''})", fix)
    if seen["pwd"] != st.workdir:
        raise SiteError(f"the check's job started in {seen['pwd']!r}, not in its working "
                        f"directory {st.workdir} ({seen['err'] or 'no message'})", fix)
    if not seen.get("id", "").startswith(f"uid={who.uid}({who.user}) gid={who.gid}("):
        raise SiteError(f"the check's job ran as {seen.get('id')!r} in the guest, not as "
                        f"{who.user} ({who.uid}:{who.gid})", fix)
    if seen.get("in") != token_in:
        raise SiteError(f"the guest does not see the host's file {IN_NAME} in "
                        f"{st.workdir} ({seen.get('in') or 'empty'})",
                        "set data = copy for the environment, or see its guest's "
                        "virtio-fs" if env.data == "mounted" else fix)
    if seen.get("out") != "ok":
        raise SiteError(f"the check's job cannot write in its working directory {st.workdir} "
                        f"in the guest ({seen['err'] or 'no message'})",
                        "check [site] virtiofsd and user namespaces "
                        "(user.max_user_namespaces > 0)" if env.data == "mounted" else fix)


def _judge_host_file(path, token, who, env):
    how = "over virtio-fs" if env.data == "mounted" else "by the harvest"
    fix = ("virtiofsd must serve the share as the job's user: check [site] virtiofsd and "
           "user namespaces" if env.data == "mounted" else
           "check the node's log for the harvest")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SiteError(f"the file the guest wrote did not reach the host {how} ({path}: "
                        f"{e.strerror})", fix) from None
    try:
        s = os.fstat(fd)
        data = os.read(fd, 4096) if stat.S_ISREG(s.st_mode) else b""
    finally:
        os.close(fd)
    if (s.st_uid, s.st_gid) != (who.uid, who.gid):
        raise SiteError(f"the file the guest wrote reached the host owned by "
                        f"{s.st_uid}:{s.st_gid}, not by {who.user} ({who.uid}:{who.gid})", fix)
    if data != token.encode():
        raise SiteError(f"the file the guest wrote reached the host {how} with other "
                        f"contents ({path})", fix)


def _teardown(cfg, made, name):
    """Remove everything ``made`` lists, then look for anything left; problem lines."""
    problems = []
    t = time.monotonic()
    if made.created:
        from .. import lifecycle
        try:
            lifecycle.destroy(cfg, made.job_id)
        except VmwnError as e:
            problems.append(f"{name}: teardown: {e.line()}")
    for d in (made.workdir, made.launcher_dir):
        if d:
            _remove_tree(d)
    if made.created:
        made.phases.append(("destroy and cleanup", time.monotonic() - t))
    left = leftovers(cfg, made)
    if left:
        problems.append(f"{name}: teardown left {', '.join(left)}: remove them ('vmwn reap' "
                        "removes a check's domain and files) and report this as a bug in vmwn")
    return problems


def leftovers(cfg, made):
    """What of the check is still on the node: [] after a clean teardown."""
    from .. import disk, share, state, virt
    from ..domain import domain_name
    found = []
    if made.created:
        try:
            conn = virt.connect(cfg.site["libvirt_uri"])
        except VmwnError as e:
            found.append(f"possibly a domain ({e.problem})")
        else:
            try:
                doms = {d.name() for d in virt.find_job(conn, made.job_id)}
                if virt.lookup(conn, domain_name(made.job_id)):
                    doms.add(domain_name(made.job_id))
                found += [f"domain {d}" for d in sorted(doms)]
            finally:
                conn.close()
    for what, path in (("state directory", state.job_dir(cfg, made.job_id)),
                       ("overlay", disk.overlay_path(cfg, made.job_id)),
                       ("working directory", made.workdir),
                       ("launcher", made.launcher_dir)):
        if path and os.path.lexists(path):
            found.append(f"{what} {path}")
    if made.workdir:
        found += [f"virtiofsd {pid}" for pid in
                  share.serving(state.job_dir(cfg, made.job_id), [made.workdir])]
    return found


def _remove_tree(path):
    """Remove ``path`` and all below it, never following a symlink (shutil's fd walk)."""
    import shutil
    shutil.rmtree(path, ignore_errors=True)
