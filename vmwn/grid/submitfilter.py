"""Torque ``SUBMITFILTER``: refuse an unknown environment at qsub time, not at job start.

qsub pipes the job script through the filter (stdin) with its own arguments as
argv; stdout replaces the script, a non-zero exit rejects the job and stderr is
shown to the user.  The filter reads the environment from ``-l other=vmwn=NAME``
(command line or ``#PBS`` directives) and turns the friendlier ``#VMWN env=NAME``
into that directive.  Everything else passes through byte for byte.

It runs on every qsub, on the submit host: it imports nothing heavier than the
configuration (no libvirt, no paramiko, no ClassAds).
"""

import logging
import os
import re
import shlex
import sys

from .. import config as vmwn_config
from ..errors import SiteError, UserError, VmwnError, exit_code
from . import pbs_request

log = logging.getLogger(__name__)

# qsub options that take a value (Torque 6 qsub(1)); the rest are flags.
_WITH_VALUE = frozenset("aAbcCdDeFjJkKlLmMNopPqrStTuvWw")
DEFAULT_PREFIX = "#PBS"
_VMWN_RE = re.compile(r"^[ \t]*#VMWN(?:[ \t]+(.*))?$")
_EOL_RE = re.compile(rb"(\r?\n)?$")


def qsub_options(argv):
    """(letter, value) pairs of the options in a qsub-style argument list.

    Follows getopt: clustered flags (``-IV``), attached values (``-lother=..``),
    values in the next word, ``--`` ending options; other words are operands.
    """
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            break
        if len(word) < 2 or not word.startswith("-"):
            continue
        for j in range(1, len(word)):
            letter = word[j]
            if letter in _WITH_VALUE:
                if j + 1 < len(word):
                    value = word[j + 1:]
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    value = ""
                out.append((letter, value))
                break
            out.append((letter, None))
    return out


def env_requests(options):
    """Environment names requested among ``options``: ``-l other=vmwn=NAME`` and
    ``-v VMWN_ENV=NAME`` (the prologue honours both)."""
    names = []
    for letter, value in options:
        if value is None:
            continue
        if letter == "l":
            for item in value.split(","):
                key, _, rest = item.partition("=")
                if key.strip().lower() == "other" and rest.startswith("vmwn="):
                    names.append(rest[len("vmwn="):].strip())
        elif letter == "v":
            for item in re.split(r"(?<!\\),", value):
                key, eq, rest = item.partition("=")
                if key.strip() == "VMWN_ENV" and eq:
                    names.append(rest.strip())
    return names


def directive_prefix(argv):
    """qsub's directive prefix: ``-C`` wins over $PBS_DPREFIX over ``#PBS``."""
    prefix = os.environ.get("PBS_DPREFIX", DEFAULT_PREFIX)
    for letter, value in qsub_options(argv):
        if letter == "C":
            prefix = value
    # Script lines are handled as latin-1 text (one character per byte).
    return os.fsencode(prefix).decode("latin-1")


def _is_executable(text):
    """qsub's rule: the first line that is not blank, '#' or ':' ends the directives."""
    if text.startswith(":") or text.startswith("#!"):
        return False
    body = text.strip()
    return bool(body) and not body.startswith("#")


def _directive_body(text, prefix):
    body = text.lstrip()
    if prefix and body.startswith(prefix):
        rest = body[len(prefix):]
        if not rest or rest[0] in " \t\r\n":
            return rest
    return None


def _vmwn_setting(text, lineno):
    """The environment named by a ``#VMWN env=NAME`` line, or None for other lines."""
    m = _VMWN_RE.match(text.rstrip("\r\n"))
    if not m:
        return None
    words = (m.group(1) or "").split()
    env = [w[len("env="):] for w in words if w.startswith("env=")]
    other = [w for w in words if not w.startswith("env=")]
    if other or len(env) != 1:
        raise UserError(f"line {lineno}: cannot read {text.strip()!r}",
                        "write exactly '#VMWN env=NAME'")
    return env[0]


class Result:
    """What the filter found: requests as (where, name), and the script to emit."""

    def __init__(self, requests, script):
        self.requests = requests
        self.script = script


def scan(script, argv):
    """Collect environment requests and rewrite ``#VMWN`` lines; raises UserError."""
    requests = [("qsub", n) for n in env_requests(qsub_options(argv))]
    prefix = directive_prefix(argv)
    lines = re.split(rb"(?<=\n)", script)
    changed = False
    in_directives = True
    for idx, raw in enumerate(lines):
        if not raw:
            continue
        lineno = idx + 1
        text = raw.decode("latin-1")  # one character per byte: nothing is lost
        name = _vmwn_setting(text, lineno)
        if name is not None:
            if not in_directives:
                raise UserError(f"line {lineno}: '#VMWN env={name}' comes after the first "
                                "command, where qsub no longer reads directives",
                                "move it above the first command of the script")
            if not prefix:
                raise UserError(f"line {lineno}: '#VMWN env={name}' needs qsub directives, "
                                "which qsub -C '' turns off",
                                f"submit with -l {pbs_request(name)} instead")
            eol = _EOL_RE.search(raw).group(0)
            lines[idx] = f"{prefix} -l {pbs_request(name)}".encode("latin-1") + eol
            changed = True
            requests.append((f"line {lineno}", name))
            continue
        if not in_directives:
            continue
        body = _directive_body(text, prefix)
        if body is not None:
            try:
                words = shlex.split(body)
            except ValueError:
                words = body.split()
            requests += [(f"line {lineno}", n) for n in env_requests(qsub_options(words))]
        elif _is_executable(text):
            in_directives = False
    return Result(requests, b"".join(lines) if changed else script)


def check(requests, environments):
    """Reject empty, conflicting or unknown environment requests."""
    names = {}
    for where, name in requests:
        names.setdefault(name, where)
        if not name:
            raise UserError(f"{where}: 'other=vmwn=' names no environment",
                            _offer(environments))
    if len(names) > 1:
        asked = ", ".join(f"{n} ({w})" for n, w in names.items())
        raise UserError(f"the job requests more than one vmwn environment: {asked}",
                        "request exactly one")
    for name, where in names.items():
        if environments is None:
            if not vmwn_config.ENV_NAME_RE.match(name):
                raise UserError(f"{where}: {name!r} is not a vmwn environment name",
                                "names are lower-case letters, digits, '_', '.' and '-'")
        elif name not in environments:
            raise UserError(f"{where}: unknown vmwn environment {name!r}", _offer(environments))


def _offer(environments):
    if environments is None:
        return "request one of the site's environments"
    return "available environments: " + (", ".join(sorted(environments)) or "none")


def site_environments(config_path=None):
    """Environment names configured here, or None when this host has no vmwn config.

    A broken configuration must not stop every qsub at the site; the prologue
    checks the request again, so the filter then only checks names' syntax.
    """
    try:
        cfg = vmwn_config.load(config_path, required=False)
    except SiteError as e:
        log.warning("submit filter: cannot read the vmwn configuration (%s); "
                    "checking environment names only", e.line())
        return None
    return set(cfg.environments) if cfg.files else None


def filter_script(script, argv, environments):
    """The filtered script (bytes), or UserError explaining the rejection."""
    result = scan(script, argv)
    check(result.requests, environments)
    return result.script


def run(argv, stdin, stdout, config_path=None):
    """Filter ``stdin`` to ``stdout`` (binary streams); returns the exit status."""
    script = stdin.read()
    out = filter_script(script, argv, site_environments(config_path))
    stdout.write(out)
    stdout.flush()
    return 0


def main(argv=None):
    """Entry point when Torque runs this module directly as its SUBMITFILTER."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="vmwn: %(message)s")
    try:
        return run(argv, sys.stdin.buffer, sys.stdout.buffer)
    except VmwnError as e:
        print(f"vmwn submit-filter: {e.line()}", file=sys.stderr)
        return exit_code("cli", e)


if __name__ == "__main__":
    sys.exit(main())
