"""``vmwn warm``: prepare, show and drop the saved guests warm starts restore."""

from .. import config as configmod
from ..errors import SiteError


def register(sub):
    p = sub.add_parser("warm", help="prepared guests for warm starts (docs/performance.md)")
    wsub = p.add_subparsers(dest="warm_command", metavar="ACTION", required=True)
    q = wsub.add_parser("prepare", help="boot ENV's guest, save it and make it current")
    q.add_argument("envs", nargs="*", metavar="ENV",
                   help="environments (default: every one with warm = on)")
    q.set_defaults(func=cmd_prepare)
    q = wsub.add_parser("status", help="one line per environment: warm or cold, and why")
    q.set_defaults(func=cmd_status)
    q = wsub.add_parser("drop", help="stop warm starts of ENV and remove what no job uses")
    q.add_argument("envs", nargs="+", metavar="ENV")
    q.set_defaults(func=cmd_drop)


def _envs(cfg, names):
    if names:
        return [cfg.env(n) for n in names]
    envs = [e for e in cfg.environments.values() if e.warm]
    if not envs:
        raise SiteError("no environment has warm = on", "set warm = on in an [env NAME] section")
    return sorted(envs, key=lambda e: e.name)


def cmd_prepare(args):
    from .. import warm
    cfg = configmod.load(args.config)
    for env in _envs(cfg, args.envs):
        cost = warm.prepare(cfg, env)
        print(f"{env.name}: prepared in {cost['prepare_seconds']} s "
              f"(boot {cost['boot_seconds']} s); memory {cost['ram_bytes'] >> 20} MiB, "
              f"state {cost['state_bytes'] >> 10} KiB, "
              f"disk {cost['disk_bytes'] >> 20} MiB")
    return 0


def cmd_status(args):
    from .. import warm
    cfg = configmod.load(args.config)
    for env in sorted(cfg.environments.values(), key=lambda e: e.name):
        print(warm.status(cfg, env))
    return 0


def cmd_drop(args):
    from .. import warm
    cfg = configmod.load(args.config)
    for env in _envs(cfg, args.envs):
        removed = warm.drop(cfg, env.name)
        print(f"{env.name}: warm starts stopped; removed {len(removed)} generation(s)")
    return 0
