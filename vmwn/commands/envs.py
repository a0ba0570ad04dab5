"""Operator commands about environments: ``envs``, ``render`` and ``check``."""

import json
import os
import sys

from .. import config as configmod
from . import bootcheck
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
                   help="also boot ENV once as a job's VM is booted (its configured data "
                        "mode, a real working directory), check what a job needs of it "
                        "and tear it down")
    p.add_argument("--user", metavar="NAME",
                   help="with --boot: the unprivileged account the check's job runs as "
                        f"(default: {bootcheck.CHECK_USER}, with ids no account has unless "
                        "the node has that account)")
    p.add_argument("--dir", metavar="DIR",
                   help="with --boot: where the check makes its private working directory "
                        f"(default: {bootcheck.DEFAULT_PARENT})")
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
    if (args.user or args.dir) and not args.boot:
        raise UserError("--user and --dir apply to the boot check", "add --boot ENV")
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
        try:
            who = bootcheck.identity(args.user)
        except SiteError as e:
            problems.append(f"boot {args.boot}: {e.line()}")
        else:
            problems += bootcheck.run(cfg, cfg.env(args.boot), who,
                                      parent=args.dir or bootcheck.DEFAULT_PARENT)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        raise SiteError(f"{len(problems)} problem(s) found", "fix the lines above")
    print("all checks passed")
    return 0
