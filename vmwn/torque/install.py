"""Install vmwn's hooks into a Torque node, and take them out again.

``make install`` calls ``python -m vmwn.torque.install install``: the dispatchers become
pbs_mom's prologue, epilogue and their .parallel forms; vmwn's steps go into
``mom_priv/prologue.d`` and ``epilogue.d`` beside any site steps; the job starter
goes to PREFIX/libexec/vmwn and is named in ``mom_priv/config``, beside the
QEMU launcher libvirt runs for each job's VM (vmwn.emulator); a sample
vmwn.conf is installed unless the site has one.  Everything is root-owned and
written atomically, re-running is harmless, and ``uninstall`` removes only what
install put there.  A prologue, epilogue or ``$job_starter`` that is not vmwn's
is never overwritten: the site must move it into the steps directory first.
"""

import argparse
import dataclasses
import logging
import os
import re
import shlex
import sys

from .. import emulator, keeper, relay, sysfiles
from ..errors import SiteError, VmwnError
from .hooks import dispatch

log = logging.getLogger(__name__)

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data_dir():
    """Where the steps, templates and sample vmwn.conf are: the source tree, or
    PREFIX/share/vmwn of the environment a wheel was installed into."""
    if os.path.isdir(os.path.join(_CHECKOUT, "prologue.d")):
        return _CHECKOUT
    import sysconfig
    return os.path.join(sysconfig.get_path("data"), "share", "vmwn")


SOURCE_DIR = _data_dir()
STEP_NAME = "50-vmwn"
BUNDLED_TEMPLATES = ("domain.xml.j2", "meta-data.j2", "user-data.j2")
STEP_SOURCES = {"prologue.d": "prologue.d/50-vmwn", "epilogue.d": "epilogue.d/50-vmwn"}
STARTER_NAME = "job-starter"
EMULATOR_NAME = "qemu"
STARTER_ENTRY = "vmwn.torque.hooks.starter"
CONFIG_COMMENT = "# vmwn job starter (added by vmwn install, removed by vmwn uninstall)"

STARTER_MARK = "# vmwn job starter ($job_starter)"
_STARTER = """#!/bin/sh
# vmwn job starter ($job_starter): runs the job in its VM, or on the host when
# the job has none.  Installed by vmwn; do not edit.
PYTHON={python}
VMWN_PATH={pythonpath}
CONFIG={config}
STATE_DIR={state_dir}
PBS_HOME={pbs_home}

{job_dir_fn}
# A job vmwn made nothing for, that names no environment, starts exactly as
# pbs_mom would have started it, without a Python start.  Anything else
# (no job id, a shell that is not an absolute executable path) is Python's.
if [ $# -gt 0 ] && [ -n "$PBS_JOBID" ] && [ -z "$VMWN_ENV" ] &&
        case $1 in /*) [ -f "$1" ] && [ -x "$1" ] ;; *) false ;; esac &&
        ! vmwn_job_dir "$STATE_DIR" "$PBS_JOBID"; then
    exec "$@"
fi
exec "$PYTHON" -Es -c '
import sys
config, state_dir, pbs_home, path = sys.argv[1:5]
del sys.argv[1:5]
sys.path[:0] = [p for p in path.split(":") if p]
from {entry} import main
sys.exit(main(config_path=config, state_dir=state_dir, pbs_home=pbs_home))
' "$CONFIG" "$STATE_DIR" "$PBS_HOME" "$VMWN_PATH" "$@"
"""
JOB_DIR_SH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks", "jobdir.sh")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things go, as the node will see them (``dest`` adds DESTDIR)."""
    destdir: str
    pbs_home: str
    sysconfdir: str
    prefix: str

    @property
    def mom_priv(self):
        return os.path.join(self.pbs_home, "mom_priv")

    @property
    def config(self):
        return os.path.join(self.sysconfdir, "vmwn", "vmwn.conf")

    @property
    def starter(self):
        return os.path.join(self.prefix, "libexec", "vmwn", STARTER_NAME)

    @property
    def emulator(self):
        return os.path.join(self.prefix, "libexec", "vmwn", EMULATOR_NAME)

    @property
    def keeper(self):
        return emulator.beside(self.emulator, keeper.NAME)

    @property
    def relay(self):
        return emulator.beside(self.emulator, relay.NAME)

    @property
    def templates(self):
        return os.path.join(self.prefix, "share", "vmwn", "templates")

    @property
    def mom_config(self):
        return os.path.join(self.mom_priv, "config")

    @property
    def starter_line(self):
        return f"$job_starter {self.starter}"

    def dest(self, path):
        return self.destdir.rstrip("/") + path if self.destdir else path


def _check_path(name, value):
    if not value.startswith("/") or any(c in value for c in "\n\r\0'\"\\$`"):
        raise SiteError(f"--{name} {value!r} must be an absolute path without quotes, "
                        "backslashes, $ or newlines", f"fix --{name}")
    return os.path.normpath(value)


def layout(opts):
    destdir = opts.destdir or ""
    if destdir and not destdir.startswith("/"):
        destdir = os.path.abspath(destdir)
    return Layout(destdir=destdir, pbs_home=_check_path("pbs-home", opts.pbs_home),
                  sysconfdir=_check_path("sysconfdir", opts.sysconfdir),
                  prefix=_check_path("prefix", opts.prefix))


def _makedirs(path, mode):
    if not os.path.isdir(path):
        os.makedirs(path, mode=mode)
        os.chmod(path, mode)
        sysfiles.own_root(path)


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def render_step(source_text, python, config_path, pbs_home, pythonpath=None, qstat="",
                state_dir=None):
    """A step script with the site's interpreter, configuration path, PBS_HOME, qstat
    and state directory."""
    if source_text.startswith("#!/bin/sh"):
        return _render_sh_step(source_text, python, config_path, pbs_home, pythonpath, qstat,
                               state_dir)
    paths = [p for p in (pythonpath or "").split(os.pathsep) if p]
    out = []
    for i, line in enumerate(source_text.splitlines()):
        if i == 0 and line.startswith("#!"):
            line = f"#!{python} -Es"
        elif line.startswith("CONFIG = "):
            line = f"CONFIG = {config_path!r}"
        elif line.startswith("PBS_HOME = "):
            line = f"PBS_HOME = {pbs_home!r}"
        elif line.startswith("import sys") and paths:
            line = f"{line}\nsys.path[:0] = {paths!r}"
        out.append(line)
    return "\n".join(out) + "\n"


def _render_sh_step(source_text, python, config_path, pbs_home, pythonpath, qstat="",
                    state_dir=None):
    """Shell steps carry the same settings as shell assignments, quoted."""
    from ..config import SITE_KEYS
    values = {"PYTHON": python, "CONFIG": config_path, "PBS_HOME": pbs_home, "QSTAT": qstat,
              "VMWN_PATH": ":".join(p for p in (pythonpath or "").split(os.pathsep) if p),
              "STATE_DIR": state_dir or SITE_KEYS["state_dir"].default}
    out = []
    for line in source_text.splitlines():
        if line == "# @vmwn_job_dir@":
            out.append(job_dir_function().rstrip("\n"))
            continue
        name = line.split("=", 1)[0]
        if "=" in line and name in values and line == line.lstrip():
            line = f"{name}={shlex.quote(values.pop(name))}"
        out.append(line)
    return "\n".join(out) + "\n"


def render_starter(python, config_path, pythonpath=None, state_dir=None, pbs_home=None):
    """The job starter, with what it must know without reading vmwn.conf baked in.

    A job without a VM must run whatever state vmwn.conf is in, so where job
    records live (``state_dir``) and PBS_HOME are fixed at install time.
    """
    from ..config import SITE_KEYS
    q = shlex.quote
    return _STARTER.format(
        python=q(python), config=q(config_path), entry=STARTER_ENTRY,
        pythonpath=q(":".join(p for p in (pythonpath or "").split(os.pathsep) if p)),
        state_dir=q(state_dir or SITE_KEYS["state_dir"].default),
        pbs_home=q(pbs_home or SITE_KEYS["pbs_home"].default), job_dir_fn=job_dir_function())


def job_dir_function():
    """The shell function the starter and the epilogue step use to skip Python."""
    with open(JOB_DIR_SH, encoding="utf-8") as f:
        return f.read()


def others_can_execute(path):
    """True when a user other than root can run ``path`` (every directory searchable)."""
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & 0o001:
            return False
        d = os.path.dirname(real)
        while True:
            if not os.stat(d).st_mode & 0o001:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def _is_ours_step(path):
    text = _read(path)
    # vmwn.hooks: where the hooks lived before the Torque package had its own.
    return text is not None and ("from vmwn.torque.hooks." in text or "from vmwn.hooks." in text)


def _is_ours_starter(path):
    text = _read(path)
    return text is not None and (STARTER_MARK in text  # a Python starter is 0.1's
                                 or f"from {STARTER_ENTRY} import main" in text
                                 or "from vmwn.hooks.starter import main" in text)


def _is_ours_binary(path, name):
    """True for a program vmwn compiled (its usage line names it)."""
    try:
        with open(path, "rb") as f:
            return f"usage: vmwn-{name}".encode() in f.read(1 << 20)
    except OSError:
        return False


def _starter_lines(text):
    return [ln for ln in (text or "").splitlines() if ln.split(None, 1)[:1] == ["$job_starter"]]


def _preflight(lay):
    """Refuse before changing anything when a file install would overwrite is the site's."""
    for hook in dispatch.HOOKS:
        p = lay.dest(os.path.join(lay.mom_priv, hook))
        if os.path.lexists(p) and not dispatch.is_dispatcher(p):
            raise SiteError(f"{p} exists and is not vmwn's dispatcher",
                            f"move it into {os.path.join(lay.mom_priv, dispatch.HOOKS[hook][0])}/"
                            " (it keeps running there as a step) and install again")
    for line in _starter_lines(_read(lay.dest(lay.mom_config))):
        if line.split(None, 1)[1:] != [lay.starter]:
            raise SiteError(f"{lay.mom_config} already names a job starter ({line})",
                            "remove that line (vmwn's starter runs jobs without a VM "
                            "unchanged) and install again")
    if os.path.lexists(lay.dest(lay.starter)) and not _is_ours_starter(lay.dest(lay.starter)):
        raise SiteError(f"{lay.starter} exists and is not vmwn's", "remove it or choose --prefix")
    if os.path.lexists(lay.dest(lay.emulator)) and not emulator.is_ours(lay.dest(lay.emulator)):
        raise SiteError(f"{lay.emulator} exists and is not vmwn's", "remove it or choose --prefix")
    for name, where in ((keeper.NAME, lay.keeper), (relay.NAME, lay.relay)):
        if os.path.lexists(lay.dest(where)) and not _is_ours_binary(lay.dest(where), name):
            raise SiteError(f"{where} exists and is not vmwn's", "remove it or choose --prefix")


def install(opts):
    """Install everything; returns the list of paths written."""
    lay = layout(opts)
    python = os.path.abspath(opts.python or sys.executable)
    srcdir = opts.srcdir or SOURCE_DIR
    _preflight(lay)
    written = _install_templates(lay, srcdir)
    written += _install_config(lay, opts)
    mom_priv = lay.dest(lay.mom_priv)
    _makedirs(mom_priv, 0o751)
    for steps_dir, source in STEP_SOURCES.items():
        d = os.path.join(mom_priv, steps_dir)
        _makedirs(d, 0o755)
        text = _read(os.path.join(srcdir, source))
        if text is None:
            raise SiteError(f"{os.path.join(srcdir, source)} is missing",
                            "run install from a vmwn source tree")
        p = os.path.join(d, STEP_NAME)
        sysfiles.write(p, render_step(text, python, lay.config, lay.pbs_home, opts.pythonpath,
                                      _qstat(opts), _state_dir(lay)), 0o755)
        written.append(p)
    for hook, (steps_dir, _) in dispatch.HOOKS.items():
        p = os.path.join(mom_priv, hook)
        sysfiles.write(p, dispatch.render(hook, os.path.join(lay.mom_priv, steps_dir)), 0o755)
        written.append(p)
    starter = lay.dest(lay.starter)
    starter_python = os.path.abspath(opts.starter_python or python)
    _makedirs(os.path.dirname(starter), 0o755)
    sysfiles.write(starter, render_starter(starter_python, lay.config, opts.pythonpath,
                                           _state_dir(lay), lay.pbs_home), 0o755)
    written.append(starter)
    # Its default QEMU is the one libvirt probes (domains name theirs in VMWN_QEMU).
    emulator.build(lay.dest(lay.emulator), _site_value(lay, "qemu"))
    written.append(lay.dest(lay.emulator))
    keeper.build(lay.dest(lay.keeper))  # the warden's small successor (vmwn.keeper)
    written.append(lay.dest(lay.keeper))
    if relay.buildable():  # the job's relay in C (vmwn.relay)
        relay.build(lay.dest(lay.relay))
        written.append(lay.dest(lay.relay))
    else:
        print(f"vmwn install: warning: no {relay.LIBSSH_H}, so the job starter keeps "
              "paramiko resident for each VM job's life (about 27 MiB more per job): "
              "install libssh-dev and install again", file=sys.stderr)
    written += _install_dropin(lay)
    if not lay.destdir and not others_can_execute(starter_python):
        print(f"vmwn install: warning: the job starter runs as the job's user, but "
              f"{starter_python} is not executable by other users: pass --starter-python "
              "with an interpreter under a world-searchable path", file=sys.stderr)
    if not _imports_pbs(python):
        print(f"vmwn install: warning: pbs_python is not importable by {python}: jobs that "
              "ask with qsub -v VMWN_ENV are refused and VMs are not charged to their jobs; "
              "build it against this node's libtorque (scripts/build-pbs-python in vmwn's "
              "source tree)", file=sys.stderr)
    written += _add_starter_line(lay)
    return written


def _imports_pbs(python):
    """True when ``python`` imports pbs_python, or cannot be run here to ask (a staged
    install for another machine)."""
    from .. import subp
    if not os.access(python, os.X_OK):
        return True
    try:
        return subp.run([python, "-Esc", "import pbs"], timeout=30,
                        check=False).returncode == 0
    except VmwnError:
        return True


def _qstat(opts):
    """Torque's qstat for the prologue's quick look at a job's variables ("" for none)."""
    if opts.qstat is not None:
        return opts.qstat and _check_path("qstat", opts.qstat)
    import shutil
    return shutil.which("qstat") or ""


def _state_dir(lay):
    """The site's state_dir as its vmwn.conf says now (the default when it cannot be read)."""
    return _site_value(lay, "state_dir")


def _site_value(lay, key):
    from .. import config
    try:
        return config.load(lay.dest(lay.config)).site[key]
    except (VmwnError, OSError):
        return config.SITE_KEYS[key].default


def _install_templates(lay, srcdir):
    """The bundled templates into PREFIX/share/vmwn/templates, replacing the ones an
    earlier install put there (a site's own templates live in its own template_dir)."""
    src = os.path.join(srcdir, "templates")
    dst = lay.dest(lay.templates)
    missing = [n for n in BUNDLED_TEMPLATES if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise SiteError(f"{os.path.join(src, missing[0])} is missing",
                        "run install from a vmwn source tree or an installed wheel")
    if os.path.realpath(src) == os.path.realpath(dst):
        return []
    _makedirs(dst, 0o755)
    written = []
    for n in BUNDLED_TEMPLATES:
        sysfiles.write(os.path.join(dst, n), _read(os.path.join(src, n)), 0o644)
        written.append(os.path.join(dst, n))
    return written


def _install_config(lay, opts):
    target = lay.dest(lay.config)
    if os.path.lexists(target):
        return []
    sample = _read(opts.sample_config or os.path.join(SOURCE_DIR, "etc", "vmwn.conf"))
    if sample is None:
        raise SiteError("no sample vmwn.conf to install", "pass --sample-config")
    tdir = _check_path("template-dir", opts.template_dir or lay.templates)
    lines = sample.splitlines()
    own = [i for i, ln in enumerate(lines) if re.match(r"template_dir\s*[=:]", ln)]
    if own and opts.template_dir:  # the sample names its own: --template-dir replaces it
        lines[own[0]] = f"template_dir = {tdir}"
    elif "[site]" in lines and not own:
        lines.insert(lines.index("[site]") + 1, f"template_dir = {tdir}")
    sample = "\n".join(lines) + "\n"
    _makedirs(os.path.dirname(target), 0o755)
    sysfiles.write(target, sample, 0o644)
    return [target]


DROPIN = "00-vmwn-install.conf"


def _dropin_path(lay):
    return lay.dest(os.path.join(lay.sysconfdir, "vmwn", "vmwn.conf.d", DROPIN))


def _install_dropin(lay):
    """Where install put the QEMU launcher, when that is not the default path."""
    from ..config import SITE_KEYS
    path = _dropin_path(lay)
    if lay.emulator == SITE_KEYS["emulator"].default:
        return []
    _makedirs(os.path.dirname(path), 0o755)
    sysfiles.write(path, f"# written by vmwn install, removed by vmwn uninstall\n[site]\n"
                 f"emulator = {lay.emulator}\n", 0o644)
    return [path]


def _add_starter_line(lay):
    path = lay.dest(lay.mom_config)
    text = _read(path)
    if lay.starter_line in (text or "").splitlines():
        return []
    new = text or ""
    if new and not new.endswith("\n"):
        new += "\n"
    new += f"{CONFIG_COMMENT}\n{lay.starter_line}\n"
    sysfiles.write(path, new, 0o644 if text is None else os.stat(path).st_mode & 0o7777)
    return [path]


def uninstall(opts):
    """Remove what install put there; returns the list of paths removed or changed."""
    lay = layout(opts)
    removed = []
    mom_priv = lay.dest(lay.mom_priv)
    for hook in dispatch.HOOKS:
        p = os.path.join(mom_priv, hook)
        if dispatch.is_dispatcher(p):
            os.unlink(p)
            removed.append(p)
    for steps_dir in STEP_SOURCES:
        d = os.path.join(mom_priv, steps_dir)
        p = os.path.join(d, STEP_NAME)
        if _is_ours_step(p):
            os.unlink(p)
            removed.append(p)
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
            removed.append(d)
    tdir = lay.dest(lay.templates)
    if os.path.realpath(tdir) != os.path.realpath(os.path.join(SOURCE_DIR, "templates")):
        for n in sorted(os.listdir(tdir)) if os.path.isdir(tdir) else []:
            if n in BUNDLED_TEMPLATES:
                os.unlink(os.path.join(tdir, n))
                removed.append(os.path.join(tdir, n))
        for d in (tdir, os.path.dirname(tdir)):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
    dropin = _dropin_path(lay)
    if "written by vmwn install" in (_read(dropin) or ""):
        os.unlink(dropin)
        removed.append(dropin)
    starter = lay.dest(lay.starter)
    emu = lay.dest(lay.emulator)
    if emulator.is_ours(emu):
        os.unlink(emu)
        removed.append(emu)
    for name, where in ((keeper.NAME, lay.keeper), (relay.NAME, lay.relay)):
        if _is_ours_binary(lay.dest(where), name):
            os.unlink(lay.dest(where))
            removed.append(lay.dest(where))
    if _is_ours_starter(starter):
        os.unlink(starter)
        removed.append(starter)
    d = os.path.dirname(starter)
    if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
    path = lay.dest(lay.mom_config)
    text = _read(path)
    if text is not None and lay.starter_line in text.splitlines():
        keep = [ln for ln in text.splitlines() if ln not in (lay.starter_line, CONFIG_COMMENT)]
        sysfiles.write(path, "\n".join(keep) + ("\n" if keep else ""),
                       os.stat(path).st_mode & 0o7777)
        removed.append(path)
    return removed


def build_parser():
    p = argparse.ArgumentParser(prog="vmwn-install",
                                description="Install vmwn's Torque hooks on this node.")
    p.add_argument("action", choices=("install", "uninstall"))
    p.add_argument("--pbs-home", default="/var/spool/torque", help="Torque's PBS_HOME")
    p.add_argument("--destdir", default="", help="staging root prepended to every path")
    p.add_argument("--sysconfdir", default="/etc", help="vmwn.conf goes to SYSCONFDIR/vmwn")
    p.add_argument("--prefix", default="/usr/local",
                   help="the job starter goes to PREFIX/libexec/vmwn")
    p.add_argument("--python", help="interpreter for the installed scripts "
                   "(default: the one running this)")
    p.add_argument("--starter-python", help="interpreter for the job starter, which runs as "
                   "the job's user (default: --python)")
    p.add_argument("--pythonpath", help="directories (':'-separated) the job starter puts "
                   "first on sys.path, in the job starter and the steps (for an interpreter "
                   "without vmwn installed)")
    p.add_argument("--qstat", help="Torque's qstat, used by the prologue to see qsub -v "
                   "VMWN_ENV (default: qstat on PATH; '' for none)")
    p.add_argument("--template-dir", help="written as template_dir into a new vmwn.conf")
    p.add_argument("--sample-config", help="vmwn.conf to install when none exists")
    p.add_argument("--srcdir", help="source tree holding prologue.d/ and epilogue.d/")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines to stderr")
    return p


def main(argv=None):
    """Command line entry; exit codes come from vmwn.errors like the vmwn command's."""
    from .. import errors
    from ..cli import internal_error_line
    from ..logsetup import setup
    opts = build_parser().parse_args(argv)
    if opts.verbose:
        setup(verbose=True, syslog=False)
    try:
        try:
            done = install(opts) if opts.action == "install" else uninstall(opts)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise SiteError(f"cannot {opts.action}: {where}{e.strerror or e}",
                            "check the paths and run as root") from e
    except VmwnError as e:
        print(f"vmwn {opts.action}: {e.line()}", file=sys.stderr)
        log.debug("vmwn %s failed", opts.action, exc_info=e)
        return errors.exit_code("cli", e)
    except Exception as e:  # noqa: BLE001 - a bug: one line for the operator, details with -v
        print(f"vmwn {opts.action}: {internal_error_line(e)}", file=sys.stderr)
        log.debug("vmwn %s failed", opts.action, exc_info=e)
        return errors.exit_code("cli", e)
    for p in done:
        print(f"{opts.action}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
