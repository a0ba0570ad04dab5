"""The debian12 environment: apt sources selection, and a real boot to SSH.

The boot test uses plain QEMU (no libvirt) so it proves the image alone: the
seed is rendered from the shipped templates exactly as the prologue renders it
(Jinja2, StrictUndefined, the ``yq`` quoting filter), and the guest must accept
the job's key, present the seed's host key (pinned, RejectPolicy), create the
job's user and group with the requested ids, and make its working directory.
"""

import base64
import io
import json
import os
import socket
import subprocess
import tempfile
import time

import pytest

from vmwn import config
from vmwn.errors import SiteError
from vmwn.images import debian12

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.environ.get("VMWN_CONFIG") or os.path.join(REPO, "etc", "vmwn.conf")
TEMPLATES = os.path.join(REPO, "templates")
READY_LINE = "vmwn-guest: ready"

# A job whose names and path need quoting in YAML and ids far from the guest's own.
JOB = {"job_id": "4711[2].ce.example.org", "hostname": "vmwn-4711-2",
       "instance_id": "vmwn-4711-2-boot", "user": "alice.w", "uid": 23417,
       "group": "hep-users", "gid": 31337, "shell": "/bin/sh",
       "workdir": "/scratch/alice w/job: 4711 #2"}


# --- apt sources: the host's Debian mirror, nothing else ---------------------

def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_sources_keep_only_bookworm_entries_of_the_host(tmp_path):
    one_line = _write(tmp_path, "sources.list", """\
# site mirror
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example.org/debian bookworm main contrib
deb-src http://mirror.example.org/debian bookworm main
deb http://mirror.example.org/debian trixie main
deb https://vendor.example.com/apt stable main
""")
    deb822 = _write(tmp_path, "debian.sources", """\
Types: deb
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.org/debian
Suites: bookworm-updates bookworm-backports
Components: main

Types: deb
URIs: http://disabled.example.org/debian
Suites: bookworm
Components: main
Enabled: no
""")
    entries = debian12.debian_sources([one_line, deb822])
    assert [(e["URIs"], e["Suites"]) for e in entries] == [
        (["http://mirror.example.org/debian"], ["bookworm"]),
        (["http://mirror.example.org/debian-security"], ["bookworm-security"]),
        (["http://mirror.example.org/debian"], ["bookworm-updates"]),
    ]
    text = debian12.render_sources(entries)
    assert text.split("\n\n")[0] == (
        "Types: deb\nURIs: http://mirror.example.org/debian\nSuites: bookworm\n"
        "Components: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "Architectures: amd64")
    assert "vendor.example.com" not in text and "trixie" not in text
    assert "bookworm-backports" not in text and "disabled.example.org" not in text


def test_sources_without_bookworm_are_a_site_error(tmp_path):
    p = _write(tmp_path, "sources.list", "deb http://mirror.example.org/debian trixie main\n")
    with pytest.raises(SiteError, match="no apt source for Debian bookworm"):
        debian12.debian_sources([p])


def test_build_returns_at_once_when_files_exist(tmp_path, monkeypatch):
    paths = {}
    for role in ("image", "kernel", "initrd"):
        paths[role] = str(tmp_path / role)
        (tmp_path / role).write_text(role)
    env = type("Env", (), dict(name="debian12", **paths))()
    monkeypatch.setattr(debian12, "check_tools",
                        lambda: pytest.fail("build started although all files exist"))
    debian12.build(None, env)
    assert sorted(os.listdir(tmp_path)) == ["image", "initrd", "kernel"]


# --- booting the built image ------------------------------------------------

def _keypair():
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                ser.NoEncryption()).decode()
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH,
                                           ser.PublicFormat.OpenSSH).decode()
    return private, public


def render_seed(ctx):
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["yq"] = json.dumps
    return (env.get_template("user-data.j2").render(ctx),
            env.get_template("meta-data.j2").render(ctx))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port, host_public, user_private, user, deadline, qemu):
    """SSH client to the guest once it answers with the pinned host key."""
    import paramiko
    kind, blob = host_public.split()[:2]
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(user_private))
    last = None
    while time.monotonic() < deadline:
        if qemu.poll() is not None:
            raise AssertionError(f"QEMU exited with status {qemu.returncode}")
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{port}", kind,
                                   paramiko.PKey.from_type_string(kind, base64.b64decode(blob)))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect("127.0.0.1", port=port, username=user, pkey=pkey,
                           look_for_keys=False, allow_agent=False, timeout=5,
                           banner_timeout=10, auth_timeout=10)
            return client
        except (paramiko.SSHException, OSError, EOFError) as e:
            last = e
            client.close()
            time.sleep(1)
    raise AssertionError(f"no SSH login before the deadline; last error: {last!r}")


def _tail(path, n=4000):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no console log)"


def _run(client, command):
    _, out, err = client.exec_command(command, timeout=60)
    status = out.channel.recv_exit_status()
    return status, out.read().decode(), err.read().decode()


def boot_and_check(image, kernel, initrd, cmdline, timeout=240, memory_mib=1024):
    """Boot a throwaway overlay of ``image`` with a fresh seed; check the job's view.

    Returns (seconds from QEMU start to SSH login, console text).
    """
    host_private, host_public = _keypair()
    user_private, user_public = _keypair()
    from types import SimpleNamespace as Key
    from vmwn import seed
    ctx = seed.context(**JOB, userkey=Key(public_line=user_public),
                       hostkey=Key(public_line=host_public, private_openssh=host_private))
    user_data, meta_data = render_seed(ctx)
    with tempfile.TemporaryDirectory(prefix="vmwn-debian12-test-") as tmp:
        for name, text in (("user-data", user_data), ("meta-data", meta_data)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        subprocess.run(["genisoimage", "-quiet", "-output", "seed.iso", "-volid", "cidata",
                        "-joliet", "-rock", "user-data", "meta-data"], cwd=tmp, check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image,
                        "ov.qcow2"], cwd=tmp, check=True)
        port = _free_port()
        console = os.path.join(tmp, "console.log")
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-nographic",
                "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                "-drive", "file=ov.qcow2,if=virtio,format=qcow2",
                "-drive", "file=seed.iso,if=virtio,format=raw,readonly=on",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
                "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci",
                "-serial", f"file:{console}", "-display", "none"]
        t0 = time.monotonic()
        qemu = subprocess.Popen(argv, cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = None
        try:
            try:
                client = _connect(port, host_public, user_private, JOB["user"], t0 + timeout,
                                  qemu)
            except AssertionError as e:
                raise AssertionError(f"{e}; console:\n{_tail(console)}") from None
            boot_seconds = time.monotonic() - t0
            status, out, err = _run(client, "id; cat /etc/debian_version; python3 -c 'print(1)'")
            assert status == 0, err
            lines = out.splitlines()
            assert lines[0] == (f"uid={JOB['uid']}({JOB['user']}) gid={JOB['gid']}"
                                f"({JOB['group']}) groups={JOB['gid']}({JOB['group']})")
            assert lines[1].startswith("12."), lines[1]
            assert lines[2] == "1"
            status, out, err = _run(client, "stat -c '%u %g %a %F' \"$VMWN_DIR\"".replace(
                "$VMWN_DIR", JOB["workdir"]))
            assert status == 0, err
            assert out.split() == [str(JOB["uid"]), str(JOB["gid"]), "700", "directory"]
            status, out, _ = _run(client, "touch \"" + JOB["workdir"] + "/probe\" && echo ok")
            assert out.strip() == "ok"
            # The seed's key is the guest's only host key.
            status, out, _ = _run(client, "ls /etc/ssh/ | grep ssh_host_")
            assert out.split() == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
            status, out, _ = _run(client, "hostname")
            assert out.strip() == JOB["hostname"]
            # The ready line follows sshd and cloud-final; allow it a moment.
            text = ""
            ready_deadline = time.monotonic() + 60
            while time.monotonic() < ready_deadline:
                with open(console, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if READY_LINE in text:
                    break
                time.sleep(1)
            # Announced exactly once.  Counted as the host's watcher reads it, in
            # the text: a getty prompt may share its line.
            assert text.count(READY_LINE) == 1, text[-3000:]
            return boot_seconds, text
        finally:
            if client is not None:
                client.close()
            qemu.kill()
            qemu.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.slow
def test_debian12_boots_to_ssh_with_the_jobs_identity():
    cfg = config.load(CONFIG)
    env = cfg.environments.get("debian12")
    if env is None:
        pytest.skip(f"{CONFIG} has no [env debian12]")
    if env.missing():
        pytest.skip("debian12 image not built (missing " + ", ".join(env.missing())
                    + "): run 'vmwn image build debian12'")
    seconds, _ = boot_and_check(env.image, env.kernel, env.initrd, env.cmdline,
                                timeout=env.boot_timeout, memory_mib=env.memory_mib)
    print(f"debian12: SSH login {seconds:.1f} s after QEMU start (accel tcg)")
