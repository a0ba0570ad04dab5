"""The ``vmwn`` operator command: a thin dispatcher over command modules.

Each command module exposes ``register(subparsers)``; the parser it adds sets
``func(args) -> int``.  Errors are mapped to exit codes by vmwn.errors alone.
"""

import argparse
import importlib
import logging
import sys

from . import errors

log = logging.getLogger(__name__)

# Modules providing commands, in help order.  A module that fails to import
# because an optional dependency is missing only loses its own commands.
COMMAND_MODULES = [
    "vmwn.commands.envs",       # envs, render, check
    "vmwn.commands.warm",       # warm prepare, status, drop
    "vmwn.images",              # image build
    "vmwn.torque.harness",      # run
    "vmwn.grid.commands",       # advertise, jdl, match, submit-filter
    "vmwn.commands.operators",  # ps, reap
]


def build_parser():
    p = argparse.ArgumentParser(prog="vmwn", description="Dynamic virtual worker nodes "
                                "for Torque/PBS: every job in its own fresh VM.")
    p.add_argument("--config", metavar="PATH",
                   help="configuration file (default: $VMWN_CONFIG or /etc/vmwn/vmwn.conf)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("vmwn"):
                continue  # command module not present in this build
            raise
        mod.register(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from .logsetup import setup
    setup(verbose=args.verbose, syslog=False)
    try:
        return args.func(args)
    except errors.VmwnError as e:
        print(f"vmwn {args.command}: {e.line()}", file=sys.stderr)
        return errors.exit_code("cli", e)
    except KeyboardInterrupt:
        print(f"vmwn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line for the operator, details with -v
        print(f"vmwn {args.command}: {internal_error_line(e)}", file=sys.stderr)
        log.debug("vmwn %s failed", args.command, exc_info=e)
        return errors.exit_code("cli", e)


def internal_error_line(exc):
    """One line for an exception vmwn did not anticipate."""
    detail = " ".join(str(exc).split())
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"internal error ({what}); run with -v for details"


if __name__ == "__main__":
    sys.exit(main())
