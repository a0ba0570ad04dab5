"""Soak: N VM jobs back to back through the hooks, with seeded random faults.

``VMWN_SOAK_N`` (default 6) jobs, faults drawn with ``VMWN_SOAK_SEED``
(default 20240601).  Afterwards nothing of any job is left on the node, and
every job whose guest lived to the epilogue has its output back byte for byte.
"""

import hashlib
import os
import random
import signal

import pytest

from test_faults import GUEST_LOST, Node, _warden_started, qemu_pid, wait_for
from vmwn import virt
from vmwn.commands import operators
from vmwn.torque import harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = int(os.environ.get("VMWN_SOAK_N", "6"))
SEED = int(os.environ.get("VMWN_SOAK_SEED", "20240601"))
FAULTS = ["none", "guest_killed", "starter_killed", "warden_killed", "ssh_never",
          "epilogue_twice", "no_prologue", "mom_restart"]

SCRIPT = """#!/bin/sh
cd "$PBS_O_WORKDIR"
cp payload.bin out.bin
echo token-{token}
echo started
sleep {sleep}
echo finished
"""


def _payload(node, rng):
    data = rng.randbytes(rng.randrange(1, 300_000))
    path = os.path.join(node.submit, "payload.bin")
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, node.user.pw_uid, node.user.pw_gid)
    out = os.path.join(node.submit, "out.bin")
    if os.path.exists(out):
        os.unlink(out)
    return data


def _one(node, fault, rng):
    """Run one job with ``fault``; returns (exit status or None, output expected back)."""
    token = f"{rng.getrandbits(64):016x}"
    sleep = 0 if fault in ("none", "epilogue_twice") else 300
    script = SCRIPT.format(token=token, sleep=sleep)
    if fault == "ssh_never":
        run = node.job(script=script, resources=("other=vmwn=hang",))
    else:
        run = node.job(script=script)
    if fault in ("none", "epilogue_twice"):
        status = run.run_all().status
        if fault == "epilogue_twice":
            for p in (run.job.ou, run.job.er):  # the mom recreates them for a retry
                open(p, "w").close()
                os.chown(p, node.user.pw_uid, node.user.pw_gid)
            assert run.epilogue(status) == 0
            assert open(run.job.er).read() == ""
            os.unlink(run.job.ou)
            os.unlink(run.job.er)
        out, _ = run.texts()
        assert f"token-{token}" in out and "finished" in out
        return run, status, True
    if fault == "no_prologue":
        assert run.epilogue(harness.JOB_EXEC_RETRY) == 0
        run.prologue_rc = 2
        run.finish()
        return run, None, False
    if fault in ("warden_killed", "ssh_never"):
        assert run.prologue() == 0
        if fault == "warden_killed":
            st = wait_for(lambda: _warden_started(node, run.id), 20, "the warden")
            os.kill(st.warden_pid, signal.SIGKILL)
        run.start()
        sid, status, _ = run.join()
        assert status == 2  # the site's problem, told once in the .e file
        run.epilogue(status, sid)
        run.finish()
        _, err = run.texts()
        assert err.startswith("vmwn:") and err.count("\n") == 1, err
        return run, status, False
    assert run.prologue() == 0
    run.start()
    run.wait_output("started")
    if fault == "guest_killed":
        os.kill(qemu_pid(run.domain_state().domain), signal.SIGKILL)
    elif fault == "starter_killed":
        os.kill(run.job.starter_pid, signal.SIGKILL)
    elif fault == "mom_restart":
        harness.signal_session(run.job.starter_pid, signal.SIGKILL)
    sid, status, _ = run.join()
    reported = 0 if fault == "mom_restart" else status
    run.epilogue(reported, sid)
    run.finish()
    _, err = run.texts()
    if fault == "guest_killed":
        assert status == GUEST_LOST and "virtual machine was lost" in err
        return run, status, False
    assert "still running in its virtual machine" in err, err
    # The guest lived until the epilogue: what the job wrote comes back.
    return run, reported, True


@pytest.fixture
def node(world_tmp, test_user):
    n = Node(world_tmp, test_user)
    yield n
    n.sweep()


def test_soak(node):
    rng = random.Random(SEED)
    # Every kind of fault before any repeats, in a seeded random order.
    faults = []
    while len(faults) < N:
        faults += rng.sample(FAULTS, len(FAULTS))
    faults = faults[:N]
    print(f"\nsoak: N={N} seed={SEED} faults={faults}")
    ids = []
    for i, fault in enumerate(faults):
        payload = _payload(node, rng)
        run, status, output_back = _one(node, fault, rng)
        ids.append(run.id)
        if output_back:
            with open(os.path.join(node.submit, "out.bin"), "rb") as f:
                got = f.read()
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest(), \
                f"job {i} ({fault}): output differs"
        run.assert_clean()
        print(f"soak: job {run.id} fault={fault} status={status} output_back={output_back}")
    # Nothing of any job is left, as vmwn ps (this node's view) and libvirt see it.
    rows = [r for r in operators.snapshot(node.cfg) if r.job_id in ids or not r.domain]
    assert rows == []
    conn = virt.connect(node.cfg.site["libvirt_uri"])
    try:
        assert [m["id"] for _, m in virt.vmwn_domains(conn) if m.get("id") in ids] == []
    finally:
        conn.close()
    assert not any(n.endswith(".qcow2") for n in os.listdir(node.cfg.site["overlay_dir"]))
    assert [n for n in os.listdir(node.cfg.site["state_dir"]) if not n.startswith(".")] == []
