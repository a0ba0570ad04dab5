"""vmwn.cgroups on stand-in /proc files and a stand-in cgroup tree (nothing of the
host's is read or moved)."""

import os

import pytest

from vmwn import cgroups

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "cg"
    for c in ("cpu", "cpuacct", "memory"):
        (root / c / "slurm_vm" / "uid_1" / "job_7" / "step_batch" / "task_0").mkdir(parents=True)
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.format(root=root))
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(
        "4:memory:/slurm_vm/uid_1/job_7/step_batch/task_0\n"
        "2:cpuacct:/slurm_vm/uid_1/job_7/step_batch/task_0\n"
        "1:cpu:/\n0::/\n")
    return root, str(info), str(proc)


def test_the_vm_joins_the_tasks_accounting_group_and_no_other(tree):
    root, info, proc = tree
    assert cgroups.mounts(info) == {"cpu": str(root / "cpu"),
                                    "cpuacct": str(root / "cpuacct"),
                                    "memory": str(root / "memory")}
    done = cgroups.join([11, 12], 4242, proc=proc, mountinfo=info)
    procs = root / "cpuacct" / "slurm_vm/uid_1/job_7/step_batch/task_0/cgroup.procs"
    assert done == [str(procs)]
    # each pid is written on its own (the kernel takes one per write); the last stays
    assert procs.read_text() == "12"
    assert not (root / "memory" / "slurm_vm/uid_1/job_7/step_batch/task_0"
                / "cgroup.procs").exists()  # no limit of the job's reaches QEMU


def test_nothing_moves_for_a_process_outside_any_accounting_group(tree):
    root, info, proc = tree
    assert cgroups.join([11], 9999, proc=proc, mountinfo=info) == []  # gone: no groups
    os.makedirs(os.path.join(proc, "5"))
    with open(os.path.join(proc, "5", "cgroup"), "w", encoding="ascii") as f:
        f.write("0::/user.slice\n")
    assert cgroups.join([11], 5, proc=proc, mountinfo=info) == []  # cgroup v2 only


def test_a_group_path_that_leaves_the_hierarchy_is_refused(tree):
    root, info, proc = tree
    with open(os.path.join(proc, "4242", "cgroup"), "w", encoding="ascii") as f:
        f.write("2:cpuacct:/../../etc\n")
    with pytest.raises(OSError, match="leaves"):
        cgroups.join([11], 4242, proc=proc, mountinfo=info)


def _serving_warden(world_tmp, monkeypatch):
    """A job's warden serving its socket from a thread, its VM this process, with a
    stand-in cgroups.join: (job, the joins asked for, the serving thread)."""
    import pathlib
    import threading
    from vmwn import state, usage, warden
    from test_starter import Job
    job = Job(pathlib.Path(world_tmp))  # a short path: a Unix socket's is bounded
    job.st.vm_pid, job.st.vm_start = os.getpid(), usage.start_time(os.getpid())
    state.save(job.cfg, job.st)
    moved = []
    monkeypatch.setattr(cgroups, "join", lambda pids, of_pid, job_id=None:
                        moved.append((of_pid, job_id)) or ["g"])
    w = warden.Warden(job.cfg, job.job_id, warden.listen(job.cfg, job.st))
    w.answer = b'{"ready": true}\n'
    served = threading.Thread(target=w._serve, daemon=True)
    served.start()
    return job, moved, served


def _starters(job, n):
    """``n`` connections to the job's warden, in order, each answered."""
    import socket
    from vmwn import state
    path = state.warden_socket(job.cfg.site["state_dir"], job.job_id)
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)  # a warden that died answers nothing: fail, never hang
        s.connect(path)
        assert s.recv(64) == b'{"ready": true}\n'
        conns.append(s)
    return conns


def test_the_warden_moves_the_vm_once_and_only_for_the_jobs_own_starter(world_tmp,
                                                                       monkeypatch):
    """Another process of the user's (a second connection) could otherwise move the VM
    into a group nobody counts; the host's cgroups are not touched (join is a stand-in)."""
    job, moved, _ = _serving_warden(world_tmp, monkeypatch)
    first, second = _starters(job, 2)
    second.sendall(b"cgroups\n")
    assert second.recv(1) == b"0" and moved == []
    first.sendall(b"cgroups\n")
    # only into a group that names the job (cgroups.join checks, told which)
    assert first.recv(1) == b"1" and moved == [(os.getpid(), job.job_id)]
    first.sendall(b"cgroups\n")
    assert first.recv(1) == b"0" and moved == [(os.getpid(), job.job_id)]
    for s in (first, second):
        s.close()


def test_the_vm_joins_only_a_group_that_names_its_job(tree):
    """The warden's check: another group of the same user (another job's, a login's)
    cannot take the VM away from the job's accounting."""
    root, info, proc = tree
    with pytest.raises(OSError, match="names no job 17"):
        cgroups.join([11], 4242, job_id="17", proc=proc, mountinfo=info)
    procs = root / "cpuacct" / "slurm_vm/uid_1/job_7/step_batch/task_0/cgroup.procs"
    assert not procs.exists()
    assert cgroups.join([11], 4242, job_id="7", proc=proc, mountinfo=info) == [str(procs)]
    assert cgroups.names_job("/pbs_jobs.service/jobid/12.srv", "12.srv")
    assert not cgroups.names_job("/slurm_vm/uid_1/job_17/step_0", "7")
    assert not cgroups.names_job("/user.slice/user-1000.slice", "1000")


def test_a_task_that_connects_first_is_never_taken_for_the_jobs_own_starter(world_tmp,
                                                                           monkeypatch):
    """A step started as the job began (srun --jobid) may reach the warden before the
    job's own starter: once it says it is a task, the job's starter is the one whose
    cgroups the VM joins, and the task's end does not end the warden's service."""
    job, moved, served = _serving_warden(world_tmp, monkeypatch)
    task, own = _starters(job, 2)
    task.sendall(b"task\ncgroups\n")
    assert task.recv(1) == b"0" and moved == []
    task.close()
    own.sendall(b"cgroups\n")  # answered: the task's end did not end the service
    assert own.recv(1) == b"1" and moved == [(os.getpid(), job.job_id)]
    assert served.is_alive()
    own.close()
    served.join(30)
    assert not served.is_alive()  # the job's own starter gone: the job ended
