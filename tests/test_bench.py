"""The bench's arithmetic and report: medians, ratios, goals, table and summary line.

No timing is asserted here; the numbers are made up and only their handling is tested.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import vmwn_bench as bench  # noqa: E402 - tooling lives outside the package


def test_median_ignores_missing_values():
    assert bench.median([3.0, None, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0]) == 2.5
    assert bench.median([None, None]) is None
    assert bench.median([]) is None


def test_ratio_refuses_missing_or_zero_baselines():
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None
    assert bench.ratio(1.0, None) is None
    assert bench.ratio(1.0, 0.0) is None


def test_goals_on_ratio_and_on_value():
    assert bench.Row("a", 1.1, 1.0, ratio=1.1, goal=("<=", 1.2)).met() is True
    assert bench.Row("a", 1.3, 1.0, ratio=1.3, goal=("<=", 1.2)).met() is False
    assert bench.Row("b", 0.4, 1.0, ratio=0.4, goal=(">=", 0.5)).met() is False
    assert bench.Row("c", 12.0, unit="ms", goal=("<=", 50), goal_on="value").met() is True
    assert bench.Row("c", 60.0, unit="ms", goal=("<=", 50), goal_on="value").met() is False
    assert bench.Row("d", 1.0).met() is None              # no goal
    assert bench.Row("e", None, goal=("<=", 1.2)).met() is None  # not measured


def test_table_has_one_aligned_line_per_row():
    rows = [bench.Row("prologue start to first instruction", 10.0, 9.0, ratio=10 / 9,
                      goal=("<=", 1.2)),
            bench.Row("stdout relay", 20.0, 50.0, unit="MiB/s", ratio=0.4, goal=(">=", 0.5)),
            bench.Row("prologue: port", 0.004)]
    text = bench.format_table(rows).splitlines()
    assert len(text) == 2 + len(rows)
    assert text[0].split()[:3] == ["phase", "/", "metric"]
    first = text[2]
    assert "10.00 s" in first and "9.000 s" in first and "1.11" in first and first.endswith("yes")
    assert "20.0 MiB/s" in text[3] and text[3].endswith("NO")
    assert text[4].rstrip().endswith("-")
    # columns line up: "vmwn" starts at the same offset in the header and in every row
    col = text[0].index("vmwn")
    assert all(ln[col - 2:col] == "  " for ln in text[2:])


def _measurements():
    floor = [dict(boot=8.0, start=0.1, rss=300.0, kill=0.05, console_to_login=0.7),
             dict(boot=10.0, start=0.1, rss=310.0, kill=0.05, console_to_login=0.9)]
    phases = [dict(phases={"keys and seed": 0.02, "port": 0.01, "overlay": 0.02, "render": 0.01,
                           "define and start": 0.9, "boot to SSH": 7.0, "total": 8.0},
                   ssh_detect_lag=0.8, rss=320.0, connect=0.6, transfer=0.4, exec_first=0.2,
                   starter=1.2, destroy_libvirt=2.0, destroy=2.05)]
    jobs = [dict(wall=12.0, prologue=9.0, epilogue=2.5, starter_first=1.3,
                 first_instruction=9.9),
            dict(wall=13.0, prologue=10.0, epilogue=2.5, starter_first=1.3,
                 first_instruction=10.9)]
    return {"memory_mib": 256, "config_load": 0.003, "floor": floor, "phases": phases,
            "jobs": jobs, "naive": [dict(first=21.0, destroy=2.0)],
            "scale": {"200M": dict(total=8.0, overlay=0.02), "20G": dict(total=8.4,
                                                                        overlay=0.02)},
            "throughput": dict(relay=40.0, ssh=80.0, harvest_s=4.0, scp_s=2.0),
            "concurrency": {1: dict(per_min=4.0, per_job=15.0)},
            "novm": dict(with_hooks=0.45, without=0.25, starter=0.03, prologue=0.006,
                         epilogue=0.01),
            "warm": dict(jobs=[dict(first_instruction=1.2), dict(first_instruction=1.4)],
                         jobs4=[dict(first_instruction=4.0)] * 4,
                         mounted_jobs=[dict(first_instruction=1.8)],
                         mounted_jobs4=[dict(first_instruction=2.9)] * 4,
                         private4=[60.0, 62.0, 64.0, 90.0], private_booted=300.0,
                         cold4=[dict(first_instruction=16.0)] * 4,
                         floor4=[dict(boot=12.0), dict(boot=14.0), dict(boot=15.0),
                                 dict(boot=20.0)],
                         phases={"restore": 0.3, "boot to SSH": 0.3}, prepare=4.0,
                         refresh=3.9, state_mib=79.0, disk_mib=0.5, rss=100.0)}


def by_name_goal(rows, prefix):
    """The goal of the first row whose metric starts with ``prefix`` was met."""
    return next(r for r in rows if r.metric.startswith(prefix)).met() is True


def test_rows_and_summary_from_measurements():
    rows, s = bench.build_rows(_measurements())
    assert abs(s["first_floor"] - 10.4 / 9.0) < 1e-9   # medians 10.4 s over 9.0 s
    assert abs(s["naive_vmwn"] - 21.0 / 10.4) < 1e-9
    assert abs(s["scale"] - 1.05) < 1e-9
    assert s["relay_ssh"] == 0.5 and s["harvest_scp"] == 0.5
    assert abs(s["novm_ms"] - 46.0) < 1e-6  # all three hooks, the goal's measure
    assert s["rss_extra"] == 64.0
    assert abs(s["warm_floor"] - 1.3 / 9.0) < 1e-9 and by_name_goal(rows, "warm: prologue")
    assert abs(s["warm4_floor"] - 4.0 / 14.5) < 1e-9  # against four plain QEMUs at once
    assert not by_name_goal(rows, "warm, 4 at once")  # 0.28 > 0.25
    assert abs(s["warm_mnt_floor"] - 0.2) < 1e-9 and not by_name_goal(rows, "warm, mounted:")
    assert abs(s["warm4_mnt_floor"] - 0.2) < 1e-9 and by_name_goal(rows, "warm, mounted, 4")
    assert abs(s["warm_private"] - 63.0 / 300.0) < 1e-9 and by_name_goal(rows, "warm: memory")
    by_name = {r.metric: r for r in rows}
    assert by_name["prologue start to first instruction"].met() is True
    assert by_name["job without VM: extra of prologue + starter + epilogue"].met() is True
    line = bench.summary_line(s)
    assert line == ("bench: first-instruction/floor=1.16 naive/vmwn=2.02 20G/200M=1.05 "
                    "relay/ssh=0.50 harvest/scp=0.50 harvest/tar=? mounted/native=? "
                    "warm/floor=0.14 warm4/floor=0.28 warm-mnt/floor=0.20 warm4-mnt/floor=0.20 "
                    "warm-mem/booted=0.21 "
                    "novm-extra=46ms "
                    "rss-extra=64MiB")


def test_summary_marks_what_was_not_measured():
    m = _measurements()
    for k in ("naive", "scale", "throughput", "novm"):
        del m[k]
    _, s = bench.build_rows(m)
    line = bench.summary_line(s)
    assert "naive/vmwn=?" in line and "20G/200M=?" in line and "relay/ssh=?" in line
    assert "novm-extra=?ms" in line and "first-instruction/floor=1.16" in line


def test_parser_defaults():
    a = bench.build_parser().parse_args(["--config", "x.conf", "--quick"])
    assert a.quick and a.jobs is None and a.config == "x.conf" and a.skip == []


def test_the_batch_benchmarks_table_rows():
    import batchtable
    assert batchtable.header("m").splitlines()[1] == "-" * 88
    line = batchtable.row("held", 0.3, 0.1)
    assert line.split()[-3:] == ["0.300s", "0.100s", "3.0"]
    assert batchtable.row("first", 5.0, None).split()[-3:] == ["5.000s", "-", "-"]
    assert batchtable.row("x", None, 0.1).split()[-3:] == ["nans", "0.100s", "nan"]
    assert batchtable.row("x", 1.0, 0.0).split()[-1] == "nan"
    assert batchtable.median([]) != batchtable.median([])  # nan
    assert batchtable.median([3.0, 1.0, 2.0]) == 2.0


def test_a_jobs_processes_are_found_by_their_place_in_the_tree(tmp_path):
    """bench/jobcost.py: a tree shaped as vmwn's (a launcher whose children are the
    anchor, parent of "QEMU", and the guard; a warden; a starter with a child), each a
    real process; every one is named by its role and has private memory."""
    import json
    import subprocess
    import jobcost
    from vmwn import usage
    from vmwn.state import job_dir_in
    from vmwn_testlib import wait_until
    # Each child waits for EOF on a pipe whose one writer is the launcher: they all
    # end with it.
    script = ("import os\n"
              "r, w = os.pipe()\n"
              "if os.fork() == 0:\n"          # anchor
              "    os.close(w)\n"
              "    if os.fork() == 0:\n"      # QEMU
              "        os.read(r, 1); os._exit(0)\n"
              "    os.read(r, 1); os._exit(0)\n"
              "if os.fork() == 0:\n"          # guard
              "    os.close(w); os.read(r, 1); os._exit(0)\n"
              "print('up', flush=True); os.read(0, 1)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
    warden = subprocess.Popen(["sleep", "60"])
    starter = subprocess.Popen(["sh", "-c", "sleep 60; true"])
    try:
        assert launcher.stdout.readline() == b"up\n"
        wait_until(lambda: len(usage.children(launcher.pid)) == 2, 10,
                   "the launcher's children")
        # Until the anchor has forked "QEMU", it looks like a second guard.
        wait_until(lambda: any(usage.children(c) for c in usage.children(launcher.pid)), 10,
                   "the anchor's child")
        wait_until(lambda: len(usage.children(starter.pid)) == 1, 10,
                   "the starter's child")
        d = job_dir_in(str(tmp_path), "7.node")
        os.makedirs(d)
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"vm_pid": launcher.pid, "warden_pid": warden.pid,
                       "shares": [{"pid": 2 ** 22 + 1}]}, f)  # above any pid_max: gone
        roles = jobcost.processes(str(tmp_path), "7.node", {starter.pid: "job starter"})
        assert sorted(roles.values()) == ["QEMU", "anchor", "guard", "job starter",
                                          "launcher", "sleep", "warden"]
        count, private, qemu, by_role = jobcost.cost(str(tmp_path), "7.node",
                                                     {starter.pid: "job starter"})
        assert count == 6 and qemu > 0 and all(v > 0 for v in by_role.values())
        assert private == sum(by_role.values())
    finally:
        for p in (launcher, warden, starter):
            p.kill()
            p.wait()


def test_mpi_bench_reads_what_its_program_prints_and_ignores_the_rest():
    import mpi_bench
    text = "latency_us 13.2\nsome warning from mpirun\nbandwidth_mibs 2017.5\n"
    assert mpi_bench.parse(text) == {"latency_us": 13.2, "bandwidth_mibs": 2017.5}
    assert mpi_bench.parse("") == {}


def test_mpi_bench_agent_runs_the_command_on_the_host_it_is_given(tmp_path):
    import subprocess
    import mpi_bench
    agent = tmp_path / "agent"
    agent.write_text(mpi_bench.AGENT % "echo")  # echo stands for scripts/torque-nodes
    cp = subprocess.run(["sh", str(agent), "-x", "tq1", "orted", "--daemonize"],
                        capture_output=True, text=True, check=True)
    assert cp.stdout == "run tq1 sh -c orted --daemonize\n"


def test_a_guests_own_memory_counts_its_memfds_and_its_qemu_is_the_largest_process(tmp_path):
    """vmwn.usage.own_memory (the bench's 'memory of its own'): anonymous memory and the
    memfds a process holds, each once; qemu_of: the largest process under a launcher."""
    import subprocess
    import sys
    from vmwn import usage
    prog = ("import os, sys, time\n"
            "fd = os.memfd_create('vmwn-guest-ram')\n"
            "os.write(fd, b'x' * (24 << 20))\n"
            "os.dup(fd)\n"  # held twice: counted once
            "big = bytearray(8 << 20)\n"
            "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
            "time.sleep(60)\n")
    launcher = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c \"$0\"; :", prog],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline() == "ready\n"
        qemu = usage.qemu_of(launcher.pid)
        assert qemu and qemu != launcher.pid
        held = usage.own_memory(qemu)
        assert (24 + 8) << 20 <= held < (24 + 8 + 48) << 20
    finally:
        for pid in usage.tree(launcher.pid):
            os.kill(pid, 9)
        launcher.wait()
