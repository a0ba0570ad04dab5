"""``vmwn image build|list``: make an environment's kernel, initrd and base disk.

Each environment with a builder gets its files from Debian packages alone.
Builders are imported when used, so one missing or broken builder never takes
the others (or the rest of the ``vmwn`` command) down with it.
"""

import hashlib
import importlib
import logging
import os
import signal
import time

from .. import config, disk
from ..errors import SiteError

log = logging.getLogger(__name__)

# Environment name -> module providing build(cfg, env, force=False).
BUILDERS = {"tiny": "vmwn.images.tiny", "debian12": "vmwn.images.debian12"}


def register(subparsers):
    p = subparsers.add_parser("image", help="build or list environment images")
    sub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build an environment's kernel, initrd and base disk")
    b.add_argument("name", metavar="NAME", help="environment of the configuration")
    b.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    b.set_defaults(func=cmd_build)
    ls = sub.add_parser("list", help="environments, their builder and whether built")
    ls.set_defaults(func=cmd_list)


def builder(name):
    """The build function for environment ``name``."""
    module = BUILDERS.get(name)
    if module is None:
        raise SiteError(f"no image builder for environment {name!r}",
                        f"provide its files by hand or use one of: {', '.join(sorted(BUILDERS))}")
    try:
        return importlib.import_module(module).build
    except ModuleNotFoundError as e:
        if e.name == module:
            raise SiteError(f"the {name} image builder is not part of this installation",
                            "install a vmwn release that includes it") from None
        raise


def recipe(name):
    """Fingerprint of how environment ``name`` is built: its builder's source and
    the guest files it lists in RECIPE_FILES.  A change means the guest may not
    speak what this vmwn expects of it (a new seed key, a driver), so rebuild."""
    module = importlib.import_module(BUILDERS[name])
    h = hashlib.sha256()
    for path in [module.__file__, *getattr(module, "RECIPE_FILES", ())]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _stamp(env):
    return os.path.join(os.path.dirname(env.artefacts()[0][1]), ".vmwn-recipe")


def built_by_this_recipe(name, env):
    try:
        with open(_stamp(env), encoding="ascii") as f:
            return f.read().strip() == recipe(name)
    except (OSError, ValueError):
        return False


def cmd_build(args):
    cfg = config.load(args.config)
    env = cfg.environments.get(args.name)
    if env is None:
        raise SiteError(f"no environment {args.name!r} in the configuration",
                        f"use one of: {', '.join(sorted(cfg.environments)) or 'none'}")
    build = builder(args.name)
    if not args.force and env.artefacts() and not env.missing():
        if built_by_this_recipe(args.name, env):
            for path in disk.seal_base(env):
                print(f"{args.name}: {path} is root's and read-only again")
            print(f"{args.name}: up to date")
            _refresh_warm(cfg, env)
            return 0
        print(f"{args.name}: built by an older recipe; rebuilding")
        args.force = True
    # A terminated build still removes its scratch files (KeyboardInterrupt unwinds).
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    build(cfg, env, force=args.force)
    disk.seal_base(env)
    with open(_stamp(env) + ".new", "w", encoding="ascii") as f:
        f.write(recipe(args.name) + "\n")
    os.rename(_stamp(env) + ".new", _stamp(env))
    print(f"{args.name}: built in {time.monotonic() - t0:.1f} s: "
          + ", ".join(p for _, p in env.artefacts()))
    _refresh_warm(cfg, env)
    return 0


def _refresh_warm(cfg, built):
    """A new base never meets an old saved guest: every environment with warm = on that
    boots files of ``built`` (whatever its name) is prepared again."""
    from .. import warm
    files = {p for _, p in built.artefacts()}
    for env in sorted(cfg.environments.values(), key=lambda e: e.name):
        if not env.warm or not files & {p for _, p in env.artefacts()}:
            continue
        try:
            warm.current(cfg, env)
            print(f"{env.name}: prepared guest up to date")
        except warm.NotPrepared as e:
            print(f"{env.name}: preparing the warm guest ({e})")
            cost = warm.prepare(cfg, env)
            print(f"{env.name}: prepared in {cost['prepare_seconds']} s")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_list(args):
    cfg = config.load(args.config)
    for name, env in sorted(cfg.environments.items()):
        state = "missing " + ", ".join(env.missing()) if env.missing() else "built"
        how = "vmwn image build" if name in BUILDERS else "no builder"
        print(f"{name}\t{how}\t{state}")
    return 0
