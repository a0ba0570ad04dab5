"""Run by scripts/debian13-smoke-inside, in its Debian 13 root: a guest of CONFIG's
ENV (mounted mode, Debian 13's Rust virtiofsd) writes the hostile tree
(tests/hostile_tree.py: names that are not UTF-8 among them) into its working
directory; every byte, name and kind of file must be on the host at once, owned by the job's ids,
and nothing of the job left.  One line of verdict; exit 0 when it holds.
Standard library and vmwn only (the root has no pytest).

    python3 tests/debian13_tree.py CONFIG ENV
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostile_tree import command, problems  # noqa: E402
from vmwn import config, lifecycle, state  # noqa: E402
from vmwn.spec import JobSpec  # noqa: E402
from vmwn.ssh import Guest  # noqa: E402

UID, GID = 4242, 4343  # a job user with no account here, as on a node without NSS


def main(argv=None) -> int:
    conf, env_name = (argv if argv is not None else sys.argv[1:])[:2]
    cfg = config.load(conf)
    env = cfg.env(env_name)
    # The directory itself is the job's one share here (alice has no home on this
    # node): its path reaches the guest's mount through the seed, as text.
    workdir = tempfile.mkdtemp(prefix="vmwn-tree-", dir="/tmp")
    os.chown(workdir, UID, GID)
    job = f"13.{os.getpid()}.tree"
    try:
        spec = JobSpec(job_id=job, user="alice", uid=UID, gid=GID, group="lab",
                       job_name="tree", env=env, vcpus=1, memory_mib=env.memory_mib,
                       workdir=workdir, host_workdir=workdir)
        st = lifecycle.create(cfg, spec, time.monotonic() + env.boot_timeout + 30)
        try:
            with Guest.connect(st) as g:
                status, out, err = g.run(command(workdir), timeout=600)
        finally:
            lifecycle.destroy(cfg, job)
        found = [] if (status, out) == (0, b"done-writing\n") else \
            [f"the guest's job exited {status}: {err.decode(errors='replace').strip()[-200:]}"]
        found += problems(os.path.join(os.fsencode(workdir), b"out"), UID, GID) if not found else []
        if os.path.lexists(state.job_dir(cfg, job)):
            found.append(f"{state.job_dir(cfg, job)} is left")
    finally:
        shutil.rmtree(os.fsencode(workdir), ignore_errors=True)
    print(f"tree {env_name} ({env.data}): " + ("; ".join(found) if found else "ok"), flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
