"""``vmwn advertise``, ``vmwn jdl``, ``vmwn match`` and ``vmwn submit-filter``.

Imports of the ClassAd library happen inside the commands that need it, so the
submit filter, which runs on every qsub, stays light.
"""

import argparse
import sys

from .. import config as vmwn_config


def register(subparsers):
    p = subparsers.add_parser(
        "advertise", help="print LDIF advertising this node's environments (BDII provider)",
        description="Print GLUE 1.3 and/or GLUE 2.0 LDIF for the environments whose "
                    "images exist on this node (default: both).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--glue1", action="store_true", help="GLUE 1.3 only")
    g.add_argument("--glue2", action="store_true", help="GLUE 2.0 only")
    p.set_defaults(func=cmd_advertise)

    p = subparsers.add_parser(
        "jdl", help="translate a gLite JDL's environment requirement into a qsub request",
        description="Print the qsub resource request (or #PBS lines) for the vmwn "
                    "environment a gLite JDL requires.")
    p.add_argument("file", help="JDL file")
    p.add_argument("--directives", action="store_true", help="print #PBS directive lines")
    p.set_defaults(func=cmd_jdl)

    p = subparsers.add_parser(
        "match", help="evaluate a JDL's Requirements against this site, as a broker does",
        description="Exit 0 and name the environment when this site matches the JDL, "
                    "exit 1 when it does not.")
    p.add_argument("file", help="JDL file")
    p.set_defaults(func=cmd_match)

    p = subparsers.add_parser(
        "submit-filter", help="Torque SUBMITFILTER: check the job's environment at qsub time",
        description="Read a job script on stdin, write it (possibly with #VMWN lines turned "
                    "into #PBS directives) on stdout; exit non-zero to reject the job. "
                    "qsub's arguments follow as they are.", prefix_chars="+")
    p.add_argument("qsub_args", nargs=argparse.REMAINDER, help="qsub's arguments")
    p.set_defaults(func=cmd_submit_filter)


def cmd_advertise(args):
    from . import glue
    cfg = vmwn_config.load(args.config)
    both = not (args.glue1 or args.glue2)
    sys.stdout.write(glue.advertise(cfg, glue1=both or args.glue1, glue2=both or args.glue2))
    return 0


def cmd_jdl(args):
    from . import jdl
    cfg = vmwn_config.load(args.config)
    req = jdl.requested(jdl.load(args.file), cfg)
    if args.directives:
        print("\n".join(req.directives()))
    else:
        print(" ".join(req.pbs_args()))
    return 0


def cmd_match(args):
    from . import jdl
    cfg = vmwn_config.load(args.config)
    result = jdl.match(jdl.load(args.file), cfg)
    if not result.matches:
        print(f"no match: {result.reason}")
        return 1
    if result.request:
        print(f"match: environment {result.request.name} ({result.request.tag}), "
              f"qsub {' '.join(result.request.pbs_args())}")
    else:
        print(f"match: {result.reason}")
    return 0


def cmd_submit_filter(args):
    from . import submitfilter
    qsub_args = list(args.qsub_args)
    if qsub_args[:1] == ["--"]:
        qsub_args = qsub_args[1:]
    return submitfilter.run(qsub_args, sys.stdin.buffer, sys.stdout.buffer,
                            config_path=args.config)
