"""One node's side of a job on several nodes, for tests/test_jobnet.py.

Run in the node's network namespace (``ip netns exec``), as a batch system's
hook runs as root on its node: it enters libvirt's network namespace, then
prepares and boots (``up``) or destroys (``down``) the job's guest there.
``up CONFIG JOB INDEX NODE...``; ``down CONFIG JOB``.  A refusal prints vmwn's
one line on stderr and exits 1.
"""

import sys
import time

from vmwn import config, lifecycle, netns
from vmwn.errors import VmwnError
from vmwn.spec import JobSpec


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    action, conf, job = args[:3]
    cfg = config.load(conf)
    netns.enter_libvirts(cfg.site["libvirt_uri"])
    try:
        if action == "up":
            index, nodes = int(args[3]), tuple(args[4:])
            env = cfg.env("tiny")
            spec = JobSpec(job_id=job, user="alice", uid=4242, gid=4343, group="lab",
                           job_name="mpi", env=env, vcpus=1, memory_mib=env.memory_mib,
                           workdir="/home/alice/w", host_workdir="/nonexistent",
                           nodes=nodes, node_index=index)
            lifecycle.create(cfg, spec, time.monotonic() + 240)
        else:
            lifecycle.destroy(cfg, job)
    except VmwnError as e:
        print(e.line(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
