"""Install vmwn into an OpenPBS complex (``vmwn-openpbs-install``), and take it out.

Run as root where qmgr reaches the server (inside the complex's network
namespace, if it has one), after vmwn itself is installed on the node (``make
install``: the runtime, /etc/vmwn/vmwn.conf, the templates and the QEMU
launcher).  It

- writes the job starter ``PREFIX/libexec/vmwn/openpbs-starter`` (the
  interpreter, vmwn.conf, the state directory and the mom's PBS_HOME baked in);
- creates the ``vmwn`` resource (``type=string,flag=m``: without flag m the mom
  never sees it);
- creates and imports two site hooks from vmwn/openpbs/hook.py with these values
  written in: ``vmwn_submit`` (queuejob, on the server) and ``vmwn`` (the
  execjob events, pushed by the server to every mom), each with an alarm above
  the runtime's own timeouts.

Re-running it is harmless; ``uninstall`` deletes the hooks and the starter (the
resource is kept while jobs may still name it).
"""

import argparse
import os
import shlex
import sys

from .. import sysfiles
from ..errors import SiteError, VmwnError
from . import hook as hook_module

SUBMIT_HOOK = "vmwn_submit"
MOM_HOOK = "vmwn"
MOM_EVENTS = ("execjob_begin", "execjob_launch", "execjob_epilogue", "execjob_end",
              "execjob_postsuspend", "execjob_preresume", "exechost_periodic")
# The mom hook's place among a node's hooks: after OpenPBS's cgroups hook (order
# 100), whose execjob_begin makes the job's cgroup and whose periodic count of
# resources_used (without the VM) vmwn's count must follow to be the one kept.
MOM_ORDER = 200
# Seconds between two counts of a VM job's CPU and memory (exechost_periodic): how
# late a cput or mem limit may be seen, at one short runtime call per count.
USAGE_FREQ = 15
# Hook alarms (seconds): each above the longest runtime call of its events (hook.TIMEOUTS).
SUBMIT_ALARM = 30
MOM_ALARM = 120
STARTER_NAME = "openpbs-starter"
STARTER_ENTRY = "vmwn.openpbs.starter"
_STARTER = """#!/bin/sh
# vmwn job starter for OpenPBS: vmwn's execjob_launch hook starts it in place of
# a job that asks for a vmwn environment.  Installed by vmwn-openpbs-install; do
# not edit.
exec {python} -I -c '
import sys
config, state_dir, pbs_home = sys.argv[1:4]
del sys.argv[1:4]
from {entry} import main
sys.exit(main(config_path=config, state_dir=state_dir, pbs_home=pbs_home))
' {config} {state_dir} {pbs_home} "$@"
"""


def render_starter(python, config_path, state_dir, pbs_home):
    q = shlex.quote
    return _STARTER.format(python=q(python), entry=STARTER_ENTRY, config=q(config_path),
                           state_dir=q(state_dir), pbs_home=q(pbs_home))


def render_hook(python, config_path, starter):
    """hook.py with this node's values written below its marker."""
    with open(hook_module.__file__, encoding="utf-8") as f:
        src = f.read()
    for name, value in (("PYTHON", python), ("CONFIG", config_path), ("STARTER", starter)):
        old = f'{name} = {getattr(hook_module, name)!r}'.replace("'", '"')
        if old not in src:
            raise SiteError(f"hook.py has no line {old!r}", "reinstall vmwn")
        src = src.replace(old, f"{name} = {value!r}", 1)
    return src


class Qmgr:
    def __init__(self, path):
        self.path = path

    def __call__(self, command, check=True):
        from .. import subp
        cp = subp.run([self.path, "-c", command], timeout=60, check=False)
        if check and cp.returncode != 0:
            raise SiteError(f"qmgr -c {command!r} failed: "
                            f"{' '.join((cp.stderr or cp.stdout).split())[:300]}",
                            "run vmwn-openpbs-install as root where qmgr reaches the server")
        return cp


def _others_can_execute(path):
    """True when a user other than root can run ``path`` (every directory searchable)."""
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & 0o001:
            return False
        d = os.path.dirname(real)
        while d != "/":
            if not os.stat(d).st_mode & 0o001:
                return False
            d = os.path.dirname(d)
        return True
    except OSError:
        return False


def install(opts):
    from .. import config
    cfg = config.load(opts.config)  # a node without vmwn.conf is not ready
    python = os.path.abspath(opts.python or sys.executable)
    if not os.path.exists(cfg.site["emulator"]):
        raise SiteError(f"vmwn's QEMU launcher {cfg.site['emulator']} is missing",
                        "install vmwn on this node first ('make install' or vmwn-install)")
    libexec = os.path.join(opts.prefix, "libexec", "vmwn")
    share = os.path.join(opts.prefix, "share", "vmwn", "openpbs")
    os.makedirs(libexec, 0o755, exist_ok=True)
    os.makedirs(share, 0o755, exist_ok=True)
    starter = os.path.join(libexec, STARTER_NAME)
    sysfiles.write(starter,
                   render_starter(python, opts.config, cfg.site["state_dir"], opts.pbs_home),
                   0o755)
    hook_file = os.path.join(share, "vmwn_hook.py")
    sysfiles.write(hook_file, render_hook(python, opts.config, starter), 0o644)
    if not _others_can_execute(python):
        print(f"vmwn-openpbs-install: warning: the job starter runs as the job's user, but "
              f"{python} is not executable by other users: pass --python with a runtime "
              "under a world-searchable path", file=sys.stderr)
    qmgr = Qmgr(opts.qmgr)
    if qmgr("list resource vmwn", check=False).returncode != 0:
        qmgr("create resource vmwn type=string,flag=m")
    else:
        qmgr("set resource vmwn flag=m")
    for name, events, alarm in ((SUBMIT_HOOK, ("queuejob",), SUBMIT_ALARM),
                                (MOM_HOOK, MOM_EVENTS, MOM_ALARM)):
        if qmgr(f"list hook {name}", check=False).returncode != 0:
            qmgr(f"create hook {name}")
        qmgr(f"set hook {name} event = '{','.join(events)}'")
        qmgr(f"set hook {name} alarm = {alarm}")
        if "exechost_periodic" in events:
            qmgr(f"set hook {name} freq = {USAGE_FREQ}")
            qmgr(f"set hook {name} order = {MOM_ORDER}")
        qmgr(f"set hook {name} fail_action = none")
        qmgr(f"import hook {name} application/x-python default {hook_file}")
        qmgr(f"set hook {name} enabled = true")
    return [starter, hook_file, f"resource vmwn, hooks {SUBMIT_HOOK} and {MOM_HOOK}"]


def uninstall(opts):
    qmgr = Qmgr(opts.qmgr)
    done = []
    for name in (SUBMIT_HOOK, MOM_HOOK):
        if qmgr(f"list hook {name}", check=False).returncode == 0:
            qmgr(f"delete hook {name}")
            done.append(f"hook {name}")
    for path in (os.path.join(opts.prefix, "libexec", "vmwn", STARTER_NAME),
                 os.path.join(opts.prefix, "share", "vmwn", "openpbs", "vmwn_hook.py")):
        if os.path.exists(path):
            os.unlink(path)
            done.append(path)
    return done


def main(argv=None):
    from .. import errors
    p = argparse.ArgumentParser(prog="vmwn-openpbs-install",
                                description="Install vmwn's hooks into an OpenPBS complex.")
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--pbs-exec", default="/opt/pbs",
                   help="OpenPBS's PBS_EXEC (qmgr is PBS_EXEC/bin/qmgr)")
    p.add_argument("--pbs-home", default="/var/spool/pbs", help="the mom's PBS_HOME")
    p.add_argument("--config", default="/etc/vmwn/vmwn.conf")
    p.add_argument("--prefix", default="/usr/local")
    p.add_argument("--python", help="the runtime's interpreter (default: this one)")
    opts = p.parse_args(argv)
    opts.qmgr = os.path.join(opts.pbs_exec, "bin", "qmgr")
    try:
        for what in (install if opts.action == "install" else uninstall)(opts):
            print(f"vmwn-openpbs-install: {opts.action}ed {what}")
        return 0
    except VmwnError as e:
        print(f"vmwn-openpbs-install: {e.line()}", file=sys.stderr)
        return errors.exit_code("cli", e)


if __name__ == "__main__":
    sys.exit(main())
