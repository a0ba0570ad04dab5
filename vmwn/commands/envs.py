"""Operator commands about environments: ``envs``, ``render`` and ``check``."""

import json
import os
import sys
import time

from .. import config as configmod
from ..errors import SiteError, UserError, VmwnError


def register(sub):
    p = sub.add_parser("envs", help="list the environments this node can build")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("render", help="print the domain XML for a job; touches nothing")
    p.add_argument("env")
    p.add_argument("--job-id", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--job-name", default="")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", help="such as 512M or 2G")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("check", help="validate configuration, templates, images and libvirt")
    p.add_argument("--boot", metavar="ENV",
                   help="also boot ENV once, run id and uname -a in it, tear it down")
    p.set_defaults(func=cmd_check)


def cmd_envs(args):
    cfg = configmod.load(args.config)
    rows = []
    for env in sorted(cfg.environments.values(), key=lambda e: e.name):
        rows.append(dict(name=env.name, description=env.description, accel=env.accel,
                         vcpus=env.vcpus, max_vcpus=env.max_vcpus, memory_mib=env.memory_mib,
                         max_memory_mib=env.max_memory_mib, available=not env.missing(),
                         missing=env.missing()))
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'NAME':<12} {'AVAILABLE':<10} {'ACCEL':<6} {'VCPUS':<6} {'MEMORY':<12} DESCRIPTION")
    for r in rows:
        avail = "yes" if r["available"] else "no"
        vcpus = f"{r['vcpus']}/{r['max_vcpus']}"
        memory = f"{r['memory_mib']}/{r['max_memory_mib']}M"
        print(f"{r['name']:<12} {avail:<10} {r['accel']:<6} {vcpus:<6} {memory:<12} "
              f"{r['description']}")
        for m in r["missing"]:
            print(f"{'':<12} missing: {m}")
    return 0


def cmd_render(args):
    from .. import disk, domain, state
    cfg = configmod.load(args.config)
    env = cfg.env(args.env)
    vcpus = args.vcpus or env.vcpus
    memory = configmod.parse_size_mib(args.memory) if args.memory else env.memory_mib
    if not 1 <= vcpus <= env.max_vcpus:
        raise UserError(f"{vcpus} vCPUs is outside 1..{env.max_vcpus} for {env.name}",
                        "ask for fewer vCPUs")
    if not 1 <= memory <= env.max_memory_mib:
        raise UserError(f"{memory} MiB is outside 1..{env.max_memory_mib} for {env.name}",
                        "ask for less memory")
    jdir = state.job_dir(cfg, args.job_id)
    xml = domain.render(cfg, env, job_id=args.job_id, user=args.user, job_name=args.job_name,
                        vcpus=vcpus, memory_mib=memory, port=cfg.site["port_range"][0],
                        overlay=disk.overlay_path(cfg, args.job_id) if env.image else None,
                        seed=os.path.join(jdir, "seed.iso"),
                        console_log=os.path.join(jdir, "console.log"))
    sys.stdout.write(xml)
    return 0


def cmd_check(args):
    cfg = configmod.load(args.config)
    problems = []
    print(f"configuration: {', '.join(cfg.files)}: ok ({len(cfg.environments)} environments)")
    from .. import domain
    for env in cfg.environments.values():
        try:
            domain.render(cfg, env, job_id="0.check", user="check", job_name="check",
                          port=cfg.site["port_range"][0])
            print(f"template {env.name}: ok")
        except VmwnError as e:
            problems.append(f"template {env.name}: {e.line()}")
        missing = env.missing()
        if missing:
            # Not an error: a node offers (and advertises) only what it has built.
            line = (f"environment {env.name}: not installed, missing {', '.join(missing)} "
                    f"(run 'vmwn image build {env.name}')")
            if env.name == args.boot:
                problems.append(line)
            else:
                print(f"warning: {line}")
        else:
            print(f"images {env.name}: ok")
    from .. import virt
    try:
        conn = virt.connect(cfg.site["libvirt_uri"])
        try:
            v = conn.getLibVersion()
            print(f"libvirt {cfg.site['libvirt_uri']}: ok (libvirt {v // 1000000}."
                  f"{v // 1000 % 1000}.{v % 1000})")
            for accel in sorted({e.accel for e in cfg.environments.values()}):
                try:
                    conn.getDomainCapabilities(None, "x86_64", None, accel, 0)
                    print(f"accelerator {accel}: ok")
                except Exception as e:  # libvirtError: the hypervisor lacks it
                    problems.append(f"accelerator {accel}: {' '.join(str(e).split())}")
        finally:
            conn.close()
    except SiteError as e:
        problems.append(e.line())
    if args.boot and not problems:
        problems += boot_check(cfg, cfg.env(args.boot))
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        raise SiteError(f"{len(problems)} problem(s) found", "fix the lines above")
    print("all checks passed")
    return 0


def boot_check(cfg, env):
    """Boot ``env`` once as an unprivileged guest user; returns a list of problems."""
    from .. import lifecycle, state, virt
    from ..spec import JobSpec
    from ..ssh import Guest
    job_id = f"check-{os.getpid()}-{int(time.time())}.vmwn"
    phases = []
    spec = JobSpec(job_id=job_id, user="vmwncheck", uid=60999, gid=60999,
                   group="vmwncheck", job_name="vmwn-check", env=env,
                   vcpus=env.vcpus, memory_mib=env.memory_mib,
                   workdir="/tmp/vmwn-check", host_workdir="/nonexistent")
    problems = []
    t0 = time.monotonic()
    try:
        st = lifecycle.create(cfg, spec, time.monotonic() + env.boot_timeout + 30,
                              on_phase=lambda n, s: phases.append((n, s)))
        t = time.monotonic()
        with Guest.connect(st) as g:
            status, out, err = g.run("id; uname -a")
        phases.append(("run id and uname -a", time.monotonic() - t))
        sys.stdout.write(out.decode("utf-8", "replace"))
        if status != 0 or b"uid=60999(vmwncheck)" not in out:
            problems.append(f"guest command failed (status {status}): "
                            f"{err.decode('utf-8', 'replace').strip()[:200]}")
    except VmwnError as e:
        problems.append(f"boot {env.name}: {e.line()}")
    finally:
        t = time.monotonic()
        lifecycle.destroy(cfg, job_id)
        phases.append(("destroy and cleanup", time.monotonic() - t))
    for name, secs in phases:
        print(f"phase {name:<22} {secs:7.3f} s")
    print(f"phase {'total':<22} {time.monotonic() - t0:7.3f} s")
    if state.exists(cfg, job_id) or os.path.exists(state.job_dir(cfg, job_id)):
        problems.append(f"state left behind in {state.job_dir(cfg, job_id)}")
    from .. import disk
    if os.path.exists(disk.overlay_path(cfg, job_id)):
        problems.append("overlay left behind")
    conn = virt.connect(cfg.site["libvirt_uri"])
    try:
        if virt.find_job(conn, job_id):
            problems.append("domain left behind")
    finally:
        conn.close()
    return problems

