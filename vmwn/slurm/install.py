"""Install vmwn's SPANK plugin on a Slurm node (``vmwn-slurm-install``), and take it out.

Run as root on every node (login nodes too: sbatch loads the plugin to check
``--vmwn`` at submission), after vmwn itself is installed (``make install``).
It

- writes the job starter ``PREFIX/libexec/vmwn/slurm-starter`` (the interpreter,
  vmwn.conf and the state directory baked in);
- compiles ``vmwn_spank.c`` against this node's ``slurm/spank.h`` (Debian:
  libslurm-dev) into ``PREFIX/lib/vmwn/slurm/vmwn_spank.so``;
- writes ``PLUGSTACK_DIR/vmwn.conf``, the plugin's line for plugstack.conf
  (``include PLUGSTACK_DIR/*`` there, or copy the line in).

Re-running it is harmless; ``uninstall`` removes the three.  sbatch, srun and
slurmstepd read plugstack.conf each time they start; slurmd must be restarted
once, to run the plugin's job prolog and epilog.
"""

import argparse
import os
import shlex
import sys

from .. import sysfiles
from ..errors import SiteError, VmwnError

STARTER_NAME = "slurm-starter"
PLUGIN_NAME = "vmwn_spank.so"
PLUGSTACK_NAME = "vmwn.conf"
SPANK_H = "/usr/include/slurm/spank.h"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vmwn_spank.c")
_STARTER = """#!/bin/sh
# vmwn job starter for Slurm: vmwn's SPANK plugin execs it in place of a batch
# script that asks for a vmwn environment.  Installed by vmwn-slurm-install; do
# not edit.
exec {python} -I -c '
import sys
config, state_dir = sys.argv[1:3]
del sys.argv[1:3]
from vmwn.slurm.starter import main
sys.exit(main(config_path=config, state_dir=state_dir))
' {config} {state_dir} "$@"
"""


def render_starter(python, config_path, state_dir):
    q = shlex.quote
    return _STARTER.format(python=q(python), config=q(config_path), state_dir=q(state_dir))


def plugstack_line(plugin, python, config_path, starter):
    for what, value in (("plugin", plugin), ("python", python), ("config", config_path),
                        ("starter", starter)):
        if not value or any(c.isspace() for c in value):
            raise SiteError(f"the {what} path {value!r} has white space, which plugstack.conf "
                            "cannot hold", "install vmwn under a path without spaces")
    return f"required {plugin} python={python} config={config_path} starter={starter}\n"


def compile_plugin(out):
    if not os.path.exists(SPANK_H):
        raise SiteError(f"{SPANK_H} is missing, so vmwn's SPANK plugin cannot be built",
                        "install Slurm's headers (Debian: apt install libslurm-dev)")
    sysfiles.compile_c(out, [SOURCE], ["-shared", "-fPIC"], "vmwn's SPANK plugin",
                       "check that libslurm-dev matches the installed Slurm")


def install(opts):
    from .. import config
    cfg = config.load(opts.config)  # a node without vmwn.conf is not ready
    python = os.path.abspath(opts.python or sys.executable)
    libexec = os.path.join(opts.prefix, "libexec", "vmwn")
    libdir = os.path.join(opts.prefix, "lib", "vmwn", "slurm")
    for d in (libexec, libdir, opts.plugstack_dir):
        os.makedirs(d, 0o755, exist_ok=True)
    starter = os.path.join(libexec, STARTER_NAME)
    sysfiles.write(starter, render_starter(python, opts.config, cfg.site["state_dir"]), 0o755)
    plugin = os.path.join(libdir, PLUGIN_NAME)
    compile_plugin(plugin)
    conf = os.path.join(opts.plugstack_dir, PLUGSTACK_NAME)
    sysfiles.write(conf, plugstack_line(plugin, python, opts.config, starter), 0o644)
    return [starter, plugin, conf]


def uninstall(opts):
    done = []
    for path in (os.path.join(opts.plugstack_dir, PLUGSTACK_NAME),
                 os.path.join(opts.prefix, "lib", "vmwn", "slurm", PLUGIN_NAME),
                 os.path.join(opts.prefix, "libexec", "vmwn", STARTER_NAME)):
        if os.path.exists(path):
            os.unlink(path)
            done.append(path)
    return done


def main(argv=None):
    from .. import errors
    p = argparse.ArgumentParser(prog="vmwn-slurm-install",
                                description="Install vmwn's SPANK plugin on a Slurm node.")
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--plugstack-dir", default="/etc/slurm/plugstack.conf.d",
                   help="a directory plugstack.conf includes (its vmwn.conf is the plugin's line)")
    p.add_argument("--config", default="/etc/vmwn/vmwn.conf")
    p.add_argument("--prefix", default="/usr/local")
    p.add_argument("--python", help="the runtime's interpreter (default: this one)")
    opts = p.parse_args(argv)
    try:
        for what in (install if opts.action == "install" else uninstall)(opts):
            print(f"vmwn-slurm-install: {opts.action}ed {what}")
        if opts.action == "install":  # last, where it is read
            print("vmwn-slurm-install: now restart slurmd on this node, so that it runs the "
                  "plugin's job prolog (which keeps a job with --export=NONE in its VM)")
        return 0
    except VmwnError as e:
        print(f"vmwn-slurm-install: {e.line()}", file=sys.stderr)
        return errors.exit_code("cli", e)


if __name__ == "__main__":
    sys.exit(main())
