"""The job starter and harvest in a real guest (tiny image, TCG), as the job user.

One guest serves the module: each test runs the starter the way pbs_mom does
(as the unprivileged job user, stdin holding the mom's ``exec PATH`` line).
The last test destroys the guest under a running job.
"""

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, starter_python
from vmwn import lifecycle, state, transfer
from vmwn.spec import JobSpec
from vmwn_testlib import needs_image, serve_warden, site  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, needs_image("tiny")]

JOB = "901.starter.test"


@pytest.fixture(scope="module")
def vm(test_user, tmp_path_factory):
    import shutil
    import tempfile
    from vmwn import config
    from vmwn_testlib import qemu_reachable_dir, write_config
    base = qemu_reachable_dir()
    work = tempfile.mkdtemp(prefix="vmwn-starter-", dir="/tmp")
    os.chmod(work, 0o755)
    # The starter reads a .SC line only under its configured PBS_HOME.
    cfg = config.load(write_config(base, site_extra="stage_in_max = 8M\nharvest_max = 8M\n"
                                   f"pbs_home = {work}/torque"))
    host = os.path.join(work, "submit")
    os.mkdir(host)
    with open(os.path.join(host, "input.txt"), "w") as f:
        f.write("staged in\n")
    for p in (host, os.path.join(host, "input.txt")):
        os.chown(p, test_user.pw_uid, test_user.pw_gid)
    e = cfg.env("tiny")
    spec = JobSpec(job_id=JOB, user=test_user.pw_name, uid=test_user.pw_uid,
                   gid=test_user.pw_gid, group=test_user.pw_name, job_name="t",
                   env=e, vcpus=1, memory_mib=e.memory_mib, workdir=host,
                   host_workdir=host)
    st = lifecycle.create(cfg, spec, time.monotonic() + 240)
    jobs = os.path.join(work, "torque", "mom_priv", "jobs")
    os.makedirs(jobs)
    yield cfg, st, host, jobs, test_user
    lifecycle.destroy(cfg, JOB)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


def start(vm, script, args=""):
    cfg, st, host, jobs, user = vm
    serve_warden(cfg, st)  # one warden per job starter, as in a job's life
    sc = os.path.join(jobs, f"{JOB}.SC")
    with open(sc, "w") as f:
        f.write(script)
    os.chmod(sc, 0o700)
    os.chown(sc, user.pw_uid, user.pw_gid)
    python = starter_python()
    site_pkgs = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": "/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "SHELL": "/bin/bash",
           "PBS_JOBID": JOB, "PBS_O_WORKDIR": host, "PBS_ENVIRONMENT": "PBS_BATCH",
           "PBS_TASKNUM": "1", "PYTHONPATH": os.pathsep.join([REPO] + site_pkgs)}

    def drop():
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        os.setsid()
    p = subprocess.Popen([python, "-c", "import sys; from vmwn.torque.hooks.starter import main; "
                          "sys.exit(main(['starter'] + sys.argv[2:], config_path=sys.argv[1]))",
                          cfg.files[0], "/bin/bash"], env=env, cwd=host,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=drop)
    p.stdin.write(f"exec {sc}{' ' + args if args else ''}\n".encode())
    p.stdin.close()
    p.stdin = None
    return p


def wait_for(p, token, timeout=60):
    buf, end = b"", time.monotonic() + timeout
    while token not in buf:
        r, _, _ = select.select([p.stdout], [], [], max(0.1, end - time.monotonic()))
        assert time.monotonic() < end, buf
        if r:
            chunk = os.read(p.stdout.fileno(), 4096)
            assert chunk, buf
            buf += chunk
    return buf


def test_batch_job_runs_in_the_guest_as_the_user(vm):
    cfg, st, host, jobs, user = vm
    p = start(vm, '#!/bin/sh\necho "host=$(hostname) user=$(id -un) pwd=$(pwd) args=$*"\n'
                  'cat input.txt\necho oops >&2\necho made > output.txt\nexit 4\n', "a 'b c'")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 4, (out, err)
    lines = out.decode().splitlines()
    assert lines[0] == f"host={lines[0].split()[0][5:]} user={user.pw_name} pwd={host} args=a b c"
    assert lines[0].split()[0] != f"host={os.uname().nodename}"
    assert lines[1:] == ["staged in"]
    # The script's #! names its interpreter: no note about bash; the VM's usage comes last.
    assert err.decode().splitlines()[:-1] == ["oops"], err
    used = re.fullmatch(r"vmwn: the virtual machine used ([0-9.]+) s of CPU and (\d+) MiB of "
                        r"memory at most, and wrote (\d+) MiB to its disk",
                        err.decode().splitlines()[-1])
    assert used and float(used[1]) > 0.5 and int(used[2]) > 50, err  # a boot costs that


def test_harvest_brings_back_only_new_files_as_the_user(vm):
    cfg, st, host, jobs, user = vm
    res = transfer.harvest(cfg, state.load(cfg, JOB))
    assert res.files == 1 and not res.truncated and res.unchanged == 1, res
    out = os.path.join(host, "output.txt")
    assert open(out).read() == "made\n" and os.stat(out).st_uid == user.pw_uid
    assert sorted(os.listdir(host)) == ["input.txt", "output.txt"]


def test_guest_death_by_signal_is_the_starters(vm):
    p = start(vm, "#!/bin/sh\nkill -s USR2 $$\n")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGUSR2


def test_sigterm_is_forwarded_to_the_guest_job(vm):
    p = start(vm, "#!/bin/sh\necho ready\nsleep 100\n")
    wait_for(p, b"ready\n")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)   # the job's sleep (100 s) outlasts this: only TERM ends it
    assert p.returncode == -signal.SIGTERM


def test_losing_the_guest_gives_253(vm):
    cfg, st, host, jobs, user = vm
    p = start(vm, "#!/bin/sh\necho ready\nsleep 300\n")
    wait_for(p, b"ready\n")
    lifecycle.destroy(cfg, JOB)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 253, err
    assert err.splitlines()[-1].startswith(b"vmwn: the job's virtual machine was lost: "), err
