"""A job's VM from start to finish: create (prologue) and destroy (epilogue, reap).

``create`` records what it is about to make in the job's state record before
making it, so that a prologue killed at any instant leaves enough behind for
``destroy`` (run from any later process) to remove everything.  A stop request
(vmwn.interrupt) is acted on only at the waiting points here, each reached with
everything started so far in the record.
"""

import contextlib
import dataclasses
import os
import time

from . import (disk, guestfiles, interrupt, jobnet, keys, netpolicy, ports, seed, share,
               state as statemod, usage, warm)
from .console import Console, console_tail, guest_failure
from .domain import (domain_name, domain_name_of, guest_hostname, render as render_domain,
                     without_filesystems)
from .errors import SiteError, TransientError, VmwnError
from .logsetup import job_logger

PORT_ATTEMPTS = 4


def create(cfg, spec, deadline, on_phase=None):
    """Build the job's VM and wait until its SSH server accepts the job's key.

    ``deadline`` is a ``time.monotonic()`` value.  ``on_phase(name, seconds)``
    is told the duration of each phase.  On any failure everything made so far
    is removed before the error propagates.  (The prologue does the same in
    two halves: :func:`prepare` in the mom, :func:`boot` in the job's warden.)
    """
    return _made(cfg, spec, deadline, on_phase, boot_too=True)


def prepare(cfg, spec, deadline, on_phase=None):
    """Everything but the boot: keys, seed, overlay and the state record (phase
    "prepared").  On any failure everything made so far is removed."""
    return _made(cfg, spec, deadline, on_phase, boot_too=False)


def _made(cfg, spec, deadline, on_phase, boot_too):
    log = job_logger(__name__, spec.job_id)
    env = spec.env
    missing = env.missing()
    if missing:
        raise SiteError(f"environment {env.name} is not installed on this node "
                        f"(missing {missing[0]})",
                        f"the site should run 'vmwn image build {env.name}' on it")
    unsealed = disk.unsealed_base(env)
    if unsealed:
        raise SiteError(f"base file {unsealed[0]} of environment {env.name} is "
                        f"{unsealed[1]}: a job could change what every later job boots",
                        f"run 'vmwn image build {env.name}' or chown root:root and "
                        "chmod 0644 it")
    if statemod.exists(cfg, spec.job_id):
        log.info("removing what an earlier attempt of this job left")
        destroy(cfg, spec.job_id)
    timer = _Phases(on_phase)
    progress = []
    try:
        try:
            st = _prepare(cfg, spec, timer, log, deadline)
        except OSError as e:
            raise SiteError(f"cannot write job {spec.job_id}'s files: "
                            f"{e.strerror or e}", "free space or fix permissions in [site] "
                            "state_dir and overlay_dir") from None
        if not boot_too:
            st.phase = "prepared"
            statemod.save(cfg, st)
            return st
        _boot(cfg, env, st, deadline, timer, log, progress)
        st.phase = "running"
        statemod.save(cfg, st)
        log.info("VM %s of %s ready on %s:%d", st.domain, env.name, st.bind_address, st.port)
        return st
    except BaseException as e:
        log.warning("create failed (%s); removing what was made", _short(e))
        _clean_up(cfg, spec.job_id, progress, log)
        raise


def _clean_up(cfg, job_id, progress, log):
    """Remove what a failed create made.  Never raises: the caller's error is the
    one the user must see, and a failure here is logged (with the job id) instead."""
    try:
        destroy(cfg, job_id)
        return
    except Exception as e:  # noqa: BLE001 - the original error must propagate
        if progress:
            log.error("cleanup after failed create also failed: %s", _short(e))
            return
        first = e
    try:  # libvirt never got the domain: the files alone are the job's remains
        _remove_files(cfg, job_id, disk.overlay_path(cfg, job_id), log)
    except Exception as e:  # noqa: BLE001 - the original error must propagate
        log.error("cleanup after failed create also failed: %s; then removing its files: %s",
                  _short(first), _short(e))


def _prepare(cfg, spec, timer, log, deadline):
    env = spec.env
    mounted = env.data == "mounted"
    home = _home_of(spec) if mounted else None
    paths = share.plan(spec.workdir, home, cfg.site["shared_paths"]) if mounted else []
    share.check_mountable(paths)  # before anything is made for a job refused here
    jdir = statemod.make_job_dir(cfg, spec.job_id)
    net = seednet = None
    if len(spec.nodes) > 1:  # the job's guests on its nodes share a network of their own
        net = jobnet.plan(spec.job_id, spec.nodes, spec.node_index,
                          cfg.site["job_network_port"], cfg.site["job_network_mtu"])
    name = domain_name_of(spec.job_id, net.index if net else None)
    if net:  # every node derives every guest's host key and the job's login key alike
        secret = keys.read_secret(cfg.site["job_secret"])
        hostkey_of = [keys.derive(secret, f"host\0{spec.job_id}\0{i}",
                                  f"vmwn-host:{domain_name_of(spec.job_id, i)}")
                      for i in range(len(spec.nodes))]
        hostkey = hostkey_of[net.index]
        userkey = keys.derive(secret, f"user\0{spec.job_id}",
                              f"vmwn-job:{domain_name(spec.job_id)}")
        seednet = dict(address=f"{net.address}/{jobnet.SUBNET.prefixlen}", mtu=net.mtu,
                      hosts=[(a, n, hostkey_of[i].public_line) for i, (a, n) in enumerate(
                          jobnet.hosts(spec.job_id, len(spec.nodes),
                                       lambda i: guest_hostname(spec.job_id, i)))])
    else:
        hostkey = keys.generate(f"vmwn-host:{name}")
        userkey = keys.generate(f"vmwn-job:{name}")
    key_path = keys.write_private(os.path.join(jdir, "id_ed25519"), userkey, spec.uid, spec.gid)
    shares = share.shares_for(jdir, paths)
    ctx = seed.context(job_id=spec.job_id, instance_id=name,
                       hostname=guest_hostname(spec.job_id, net.index if net else None),
                       user=spec.user,
                       uid=spec.uid, gid=spec.gid, group=spec.group, shell=env.ssh_user_shell,
                       workdir=spec.workdir, hostkey=hostkey, userkey=userkey,
                       mounts=[(s.tag, s.path) for s in shares], home=home,
                       groups=seed.supplementary_groups(spec.user, spec.gid), jobnet=seednet)
    ud, md = seed.render(cfg.site["template_dir"], ctx)
    seed_path = seed.build_iso(os.path.join(jdir, "seed.iso"), ud, md,
                               timeout=_left(deadline))
    # A prepared guest was saved without a card on a job's network.
    gen = warm.choose(cfg, env, spec.vcpus, spec.memory_mib, log) if env.image and not net \
        else None
    if gen and not warm.pad_seed(seed_path):
        log.info("cold boot: the job's seed is larger than the prepared guest's seed disk")
        gen = None
    if gen:
        log.info("restoring the prepared guest of %s (%s)", env.name,
                 os.path.basename(gen.path))
    os.chown(seed_path, spec.uid, spec.gid)  # read by the job's QEMU; it holds the job's keys
    os.chmod(seed_path, 0o400)
    timer.mark("keys and seed")
    overlay = disk.overlay_path(cfg, spec.job_id) if env.image else ""
    output_dir = spec.workdir if env.output_dir == "workdir" else env.output_dir
    with ports.locked(cfg):
        port = ports.pick(cfg)
        st = statemod.JobState(
            job_id=spec.job_id, domain=name, env=env.name, user=spec.user, uid=spec.uid,
            gid=spec.gid, group=spec.group, bind_address=cfg.site["bind_address"], port=port,
            host_key_public=hostkey.public_line, key_path=key_path, workdir=spec.workdir,
            host_workdir=spec.host_workdir, output_dir=output_dir, overlay=overlay,
            seed=seed_path, console_log=os.path.join(jdir, "console.log"),
            vcpus=spec.vcpus, memory_mib=spec.memory_mib, job_name=spec.job_name,
            data=env.data, shares=[dataclasses.asdict(s) for s in shares],
            control_dir=guestfiles.control_dir(spec.user, mounted),
            warm=gen.path if gen else "", batch=spec.batch,
            jobnet=net.as_dict() if net else {},
            guests=[[node, guest_hostname(spec.job_id, i)] for i, node in enumerate(spec.nodes)]
            if net else [])
        statemod.save(cfg, st)  # recorded before anything outside the job dir exists
    timer.mark("port")
    if net:
        jobnet.up(net)
        timer.mark("job network")
    if env.image:
        disk.check_room(cfg, env.image, spec.job_id)
        _give_overlay(cfg, st, env, deadline)
        timer.mark("overlay")
    log.info("prepared seed, key and overlay; SSH port %d", port)
    return st


def _home_of(spec):
    import pwd
    try:
        return pwd.getpwnam(spec.user).pw_dir
    except KeyError:
        return None


def _shares(st):
    return [share.Share(**d) for d in st.shares]


def boot(cfg, st, env, deadline, on_phase=None):
    """Start the prepared job's domain and wait until its SSH server takes the job's key.

    Raises like create; a failed boot leaves the domain for :func:`undo_boot`
    (a retry) or :func:`destroy`.
    """
    _boot(cfg, env, st, deadline, _Phases(on_phase), job_logger(__name__, st.job_id))


def undo_boot(cfg, st, env):
    """Remove the domain of a failed boot and give the job a fresh overlay to retry on."""
    from . import virt
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        virt.destroy(conn, st.domain)
    finally:
        conn.close()
    share.stop(st, _shares(st))
    if env.image:
        _give_overlay(cfg, st, env, time.monotonic() + 60)


def _give_overlay(cfg, st, env, deadline):
    """A fresh overlay, the job's alone: its QEMU runs as the job's user.  A
    restored guest's overlay is backed by its generation's disk, which holds
    what the prepared guest wrote before it was saved."""
    if st.warm:
        try:
            path = disk.create_overlay(cfg, st.job_id, warm.disk_of(st.warm),
                                       timeout=_left(deadline))
        except SiteError as e:  # a refresh removed the generation since the job chose it
            job_logger(__name__, st.job_id).warning("cold boot: %s", e.problem)
            st.warm = ""
            statemod.save(cfg, st)
    if not st.warm:
        path = disk.create_overlay(cfg, st.job_id, env.image, timeout=_left(deadline))
    os.chown(path, st.uid, st.gid)
    os.chmod(path, 0o600)


def _boot(cfg, env, st, deadline, timer, log, progress=None):
    try:
        _boot_once(cfg, env, st, deadline, timer, log, progress)
    except (SiteError, TransientError) as e:
        if not st.warm:
            raise
        log.warning("warm start failed (%s); booting cold", _short(e))
        _go_cold(cfg, st, env, deadline)
        _boot_once(cfg, env, st, deadline, timer, log, progress)


def _go_cold(cfg, st, env, deadline):
    """Undo a failed restore: no domain, a fresh overlay on the base, an empty console."""
    from . import virt
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        virt.destroy(conn, st.domain)
    finally:
        conn.close()
    share.stop(st, _shares(st))  # a restore that failed may have had them connected
    st.warm = ""
    statemod.save(cfg, st)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(st.console_log)  # the cold boot's announcements must not meet the restore's
    _give_overlay(cfg, st, env, deadline)


def _boot_once(cfg, env, st, deadline, timer, log, progress=None):
    from . import virt
    interrupt.check()
    confined = netpolicy.confines(env)  # confined before it runs
    shares = _shares(st)
    # A restored guest was saved without the shares' devices: they are added
    # before it runs on, and its init waits for them to mount them.
    hotplug = bool(st.warm and shares)
    paused = confined or hotplug
    if shares:  # before the domain: QEMU connects to each socket as it starts
        _start_shares(cfg, st, shares)
        timer.mark("virtiofsd")
        interrupt.check()  # their pids are in the record: destroy finds them
    virt.open_domain_dirs()
    conn = virt.connect(cfg.site["libvirt_uri"])
    if progress is not None:
        progress.append("start")  # from here on a domain may exist
    try:
        for attempt in range(PORT_ATTEMPTS):
            xml = render_domain(cfg, env, job_id=st.job_id, user=st.user,
                                job_name=st.job_name, vcpus=st.vcpus,
                                memory_mib=st.memory_mib, port=st.port,
                                overlay=st.overlay or None, seed=st.seed,
                                console_log=st.console_log, created=st.created,
                                shares=shares, uid=st.uid, gid=st.gid, warm=bool(st.warm),
                                ram=warm.ram_of(st.warm) if st.warm else None,
                                restore=warm.restore_by(st.warm, shares) if st.warm
                                else None, name=st.domain,
                                jobnet=jobnet.Net.from_dict(st.jobnet) if st.jobnet else None)
            devices = []
            if hotplug:
                xml, devices = without_filesystems(xml)
            timer.mark("render")
            try:
                dom = virt.start(conn, xml, paused=paused)
                break
            except virt.ShareUnreachable as e:  # the warden boots again with fresh ones
                raise e.restated(f"{e.problem}; {share.health(shares)}") from None
            except virt.PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
                with ports.locked(cfg):  # something outside vmwn took it: take another
                    st.port = ports.pick(cfg, taken_extra={st.port})
                    statemod.save(cfg, st)
                if shares:
                    # That QEMU connected to each virtiofsd before its port failed, and a
                    # virtiofsd serves one connection only: the retry needs fresh ones.
                    share.stop(st, shares)
                    _start_shares(cfg, st, shares)
                log.info("SSH port taken by another process; retrying on %d", st.port)
        st.uuid = dom.UUIDString()
        st.vm_pid = virt.emulator_pid(st.domain)
        st.vm_start = usage.start_time(st.vm_pid) if st.vm_pid else 0
        if st.warm:  # its memory is in place: QEMU waits for its device state
            virt.load_state(dom, warm.state_of(st.warm), max(1.0, _left(deadline)))
        timer.mark("restore" if st.warm else "define and start")
        for device in devices:
            virt.attach(dom, device)
        if devices:
            timer.mark("shares added")
        if confined:
            netpolicy.confine(env, st.job_id, usage.tree(st.vm_pid) if st.vm_pid else [])
        if paused:
            virt.resume(dom)
        if st.warm:  # the restored guest waits for it to set its clock
            warm.give_clock(st.seed)
        end = min(deadline, time.monotonic() + env.boot_timeout)
        _wait_ready(st, env, dom, end, virt, log)
        timer.mark("boot to SSH")
    finally:
        conn.close()


def _start_shares(cfg, st, shares):
    """Start the shares' virtiofsd and record their pids (destroy stops them)."""
    share.start(st, shares, cfg.site["virtiofsd"])
    st.shares = [dataclasses.asdict(s) for s in shares]
    statemod.save(cfg, st)


# Guests that never announce themselves (stock cloud images) are found by
# probing the SSH banner, from this many seconds after start, with a timeout
# that doubles: probing an sshd that is still starting costs the guest a fork
# per attempt, which under load can starve the boot it waits for.
PROBE_AFTER = 10.0
# Seconds between reads of the console log while the guest boots: a read of a
# small file, and every job waits half of it on average after its guest is ready.
CONSOLE_POLL = 0.005


def _wait_ready(st, env, dom, end, virt, log):
    """Return when the guest's SSH server takes the job's key; raise otherwise.

    A vmwn guest prints ``vmwn-guest: ready`` on its console once sshd listens
    with the job's keys installed; one banner then confirms the forward, and the
    job starter's login (host key pinned) is the proof, so no login is spent
    here.  Guests that never announce themselves are probed.
    """
    from .ssh import Guest, banner_ready
    console = Console(st.console_log)
    start = time.monotonic()
    log.debug("waiting up to %.0f s for the guest's sshd on port %d", end - start, st.port)
    probe_at, probe_timeout, alive_at = start + PROBE_AFTER, 0.5, 0.0
    fix = f"the site should check 'vmwn check --boot {env.name}'"
    while True:
        said = console.poll()
        if said == "ready" and (st.warm or banner_ready(st.bind_address, st.port, timeout=1.0)):
            # Announced, and sshd answers (a unit-ordered guest may still be
            # settling).  A restored guest announces only a listening sshd: a
            # banner would cost it an sshd start before the job's own login.
            return
        if said and said != "ready":  # announced ready, sshd not answering yet: wait on
            raise guest_failure(said, fix)
        now = time.monotonic()
        if now >= probe_at:
            if banner_ready(st.bind_address, st.port, timeout=probe_timeout):
                try:
                    Guest.connect(st, timeout=max(1.0, end - now)).close()
                    return
                except TransientError:
                    pass  # sshd is up but the user's key is not installed yet
            probe_timeout = min(probe_timeout * 2, 4.0)
            probe_at = time.monotonic() + probe_timeout
        if now >= alive_at:
            if not virt.is_active(dom):
                raise TransientError(f"the guest stopped while booting "
                                     f"({console_tail(st.console_log)})", fix)
            alive_at = now + 0.5
        if now >= end:
            raise TransientError(f"the guest did not answer SSH within {env.boot_timeout:.0f} s "
                                 f"({console_tail(st.console_log)})", fix)
        interrupt.sleep(CONSOLE_POLL)


def destroy(cfg, job_id, grace=0.0):
    """Remove the job's domain, overlay and state directory; idempotent.

    Works from the state record when there is one, and finds the domain by
    vmwn's metadata too, so a half-recorded job is still removed.  Returns a
    list of what was removed.  The state record is kept if the domain could
    not be destroyed, so a later reap can retry.
    """
    from . import virt
    log = job_logger(__name__, job_id)
    removed = []
    try:
        st = statemod.load(cfg, job_id)
    except statemod.NoSuchJob:
        st = None
    except SiteError:
        st = None  # corrupt record: fall back to names derived from the job id
    name = st.domain if st else domain_name(job_id)
    if st:
        from . import warden
        if warden.stop(st):  # no boot may race the teardown
            removed.append(f"warden {st.warden_pid}")
        st = _reload(cfg, job_id, st)  # with all the warden recorded, up to its end
    overlay = st.overlay if st and st.overlay else disk.overlay_path(cfg, job_id)
    _set_aside(overlay, st.seed if st else "")
    try:
        conn = virt.connect(cfg.site["libvirt_uri"])
        try:
            if virt.destroy(conn, name, grace=grace):
                removed.append(f"domain {name}")
            node = (st.jobnet.get("index", 0) if st.jobnet else 0) if st else None
            for dom in virt.find_job(conn, job_id, node):
                other = dom.name()
                if virt.destroy(conn, other, grace=0):
                    removed.append(f"domain {other}")
        finally:
            conn.close()
    finally:  # libvirt unreachable too: the job has ended, its virtiofsd with it
        if st and st.shares:
            share.stop(st, _shares(st))
    removed += _release_network(cfg, st, job_id, log)
    if st and st.jobnet:
        removed += jobnet.down(jobnet.Net.from_dict(st.jobnet))
    if virt.remove_domain_log(cfg.site["libvirt_uri"], name):
        removed.append(f"libvirt log of {name}")
    for what in removed:
        log.info("removed %s", what)
    return removed + _remove_files(cfg, job_id, overlay, log)


def _set_aside(*paths):
    """Move the job's overlay and seed to names no domain start asks for.  A warden
    killed inside libvirt's createXML leaves that call to libvirtd, which may start
    the domain after the teardown looked for it: such a late start now fails on its
    missing disk or seed, while a QEMU that runs keeps what it opened until it is
    destroyed."""
    for path in paths:
        if path:
            try:
                os.rename(path, disk.aside(path))
            except FileNotFoundError:
                pass


def _release_network(cfg, st, job_id, log):
    """Remove the no-loopback cgroup and its rules once no QEMU is left in it.  Every
    teardown does this, so one that could not is retried by the next; only a job
    whose environment confined it there counts them among what it removed (the
    cgroup is the node's, and another job's teardown may be the one that finds it
    empty)."""
    try:
        released = netpolicy.release(job_id)
    except SiteError as e:  # they match an empty cgroup: the next teardown retries
        log.warning("%s", e.line())
        return []
    env = cfg.environments.get(st.env) if st else None
    if released and env is not None and netpolicy.confines(env):
        return [f"cgroup {netpolicy.CGROUP} and its firewall rules"]
    return []


def _reload(cfg, job_id, st):
    try:
        return statemod.load(cfg, job_id)
    except SiteError:  # NoSuchJob, or a corrupt record: keep what was read before
        return st


def _remove_files(cfg, job_id, overlay, log):
    """Remove the job's overlay (set aside, or still where it was) and state directory
    (the seed with it); returns what was removed."""
    removed = []
    if any([disk.remove(disk.aside(overlay)), disk.remove(overlay)]):
        removed.append(f"overlay {overlay}")
    if statemod.remove(cfg, job_id):
        removed.append(f"state {statemod.job_dir(cfg, job_id)}")
    for what in removed:
        log.info("removed %s", what)
    return removed


def _left(deadline, cap=60.0):
    """Seconds a helper program may take: what is left before the deadline, at most cap.
    A waiting point: raises Interrupted when a stop was requested."""
    interrupt.check()
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransientError("the prologue's deadline passed while preparing the VM",
                             "the node may be overloaded")
    return min(cap, left)


class _Phases:
    def __init__(self, sink):
        self.sink, self.t = sink, time.monotonic()

    def mark(self, name):
        now = time.monotonic()
        if self.sink:
            self.sink(name, now - self.t)
        self.t = now


def _short(e):
    return e.line() if isinstance(e, VmwnError) else (type(e).__name__ + (f": {e}" if str(e) else ""))


__all__ = ["create", "prepare", "boot", "undo_boot", "destroy"]
