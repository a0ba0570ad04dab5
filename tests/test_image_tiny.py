"""The tiny environment: its builder's pieces, the guest's seed parser, and a real boot.

The parser tests run the awk program shipped inside vmwn/guest/tiny-init with
the busybox of the busybox-static package, exactly as the guest does.  The boot
test starts the built image under plain QEMU (TCG) with a seed rendered from
templates/user-data.j2 and talks to it with paramiko, pinning the host key.
"""

import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from vmwn import config
from vmwn.images import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "templates")
INIT = os.path.join(ROOT, "vmwn", "guest", "tiny-init")
CONF = os.path.join(ROOT, "etc", "vmwn.conf")
BUSYBOX = shutil.which("busybox")

needs_busybox = pytest.mark.skipif(not BUSYBOX, reason="busybox is not installed (make deps)")


def render(name, **values):
    """The seed exactly as vmwn renders it (the production Jinja2 set-up and yq quoting)."""
    from vmwn.templating import render_template
    return render_template(TEMPLATES, name, values)


def seed_values(**over):
    """The seed's variables as vmwn.seed.context makes them (keys as plain text)."""
    from types import SimpleNamespace as Key
    from vmwn import seed
    v = seed.context(job_id="42.ce.example.org", instance_id="vmwn-42", hostname="vmwn-42",
                     user="alice", uid=1234, group="physics", gid=2345, shell="/bin/sh",
                     workdir="/home/alice/jobs/42",
                     userkey=Key(public_line="ssh-ed25519 AAAAuser alice@ce"),
                     hostkey=Key(public_line="ssh-ed25519 AAAAhost",
                                 private_openssh="-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"
                                                 "BBBB\n-----END OPENSSH PRIVATE KEY-----\n"))
    v.update(over)
    return v


def seed_awk():
    with open(INIT, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^SEED_AWK=\$\(cat <<'AWK'\n(.*?)^AWK\n", text, re.S | re.M)
    assert m, "tiny-init lost its SEED_AWK program"
    return m.group(1)


def parse(tmp_path, user_data):
    """Run the guest's parser; return (status, stdout, stderr)."""
    prog = tmp_path / "seed.awk"
    prog.write_text(seed_awk())
    ud = tmp_path / "user-data"
    ud.write_bytes(user_data.encode() if isinstance(user_data, str) else user_data)
    cp = subprocess.run([BUSYBOX, "awk", "-f", str(prog), str(ud)], capture_output=True)
    return cp.returncode, cp.stdout, cp.stderr.decode(errors="replace")


def calls(tmp_path, script):
    """Execute the parser's output with busybox sh; return each call's argv."""
    out = tmp_path / "seed.sh"
    out.write_bytes(script)
    record = tmp_path / "calls.json"
    driver = (
        "rec() { for a in \"$@\"; do printf x; printf '%s' \"$a\" | od -An -tx1 | tr -d ' \\n'; "
        "printf ' '; done; echo; }\n"
        "seed_hostname() { rec seed_hostname \"$@\"; }\n"
        "bootcmd() { rec bootcmd \"$@\"; }\n"
        "seed_user() { rec seed_user \"$@\"; }\n"
        "seed_host_key() { rec seed_host_key \"$@\"; }\n"
        "runcmd() { rec runcmd \"$@\"; }\n"
        f". '{out}' > '{record}'\n")
    subprocess.run([BUSYBOX, "sh", "-c", driver], check=True)
    result = []
    for line in record.read_text().splitlines():
        result.append([bytes.fromhex(h[1:]).decode() for h in line.split(" ") if h])
    return result


@needs_busybox
def test_parser_reads_the_rendered_template(tmp_path):
    status, out, err = parse(tmp_path, render("user-data.j2", **seed_values()))
    assert status == 0, err
    got = calls(tmp_path, out)
    assert got[0] == ["seed_hostname", "vmwn-42"]
    assert got[1] == ["bootcmd", "groupadd", "-o", "-g", "2345", "physics"]
    # The home is the user's before the working directory below it is made.
    assert got[2] == ["bootcmd", "install", "-d", "-m", "0755", "-o", "1234", "-g", "2345",
                      "/home/alice"]
    assert got[3] == ["bootcmd", "install", "-d", "-m", "0700", "-o", "1234", "-g", "2345",
                      "/home/alice/jobs/42"]
    assert got[4] == ["bootcmd", "install", "-d", "-m", "0700", "-o", "1234", "-g", "2345",
                      "/home/alice/.vmwn"]
    assert got[5] == ["seed_user", "alice", "1234", "physics", "/bin/sh", "/home/alice", "",
                      "ssh-ed25519 AAAAuser alice@ce"]
    assert got[6] == ["seed_host_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\nBBBB\n"
                      "-----END OPENSSH PRIVATE KEY-----\n", "ssh-ed25519 AAAAhost"]
    # After the users: the job's key where sshd reads it, whatever the home is.
    assert got[7] == ["runcmd", "install", "-D", "-m", "0644",
                      "/home/alice/.ssh/authorized_keys", "/etc/ssh/authorized_keys/alice"]
    assert len(got) == 8  # copy mode: nothing to mount


@needs_busybox
def test_the_users_other_groups_are_created_and_joined(tmp_path):
    values = seed_values(groups=[{"name": "proj", "gid": 5000}, {"name": "hep", "gid": 5001}])
    status, out, err = parse(tmp_path, render("user-data.j2", **values))
    assert status == 0, err
    got = calls(tmp_path, out)
    assert ["bootcmd", "groupadd", "-o", "-g", "5000", "proj"] in got
    assert ["bootcmd", "groupadd", "-o", "-g", "5001", "hep"] in got
    user = next(g for g in got if g[0] == "seed_user")
    assert user[6] == "proj,hep"


@needs_busybox
def test_parser_orders_the_mounts_after_the_users(tmp_path):
    values = seed_values(mounts=[{"tag": "vmwn0", "path": "/home/alice"},
                                 {"tag": "vmwn1", "path": "/scratch/a b"}])
    status, out, err = parse(tmp_path, render("user-data.j2", **values))
    assert status == 0, err
    got = calls(tmp_path, out)
    assert [g[0] for g in got].index("seed_user") < [g[0] for g in got].index("runcmd")
    assert got[-4:] == [["runcmd", "mkdir", "-p", "/home/alice"],
                        ["runcmd", "mount", "-t", "virtiofs", "vmwn0", "/home/alice"],
                        ["runcmd", "mkdir", "-p", "/scratch/a b"],
                        ["runcmd", "mount", "-t", "virtiofs", "vmwn1", "/scratch/a b"]]


@needs_busybox
@pytest.mark.parametrize("workdir", [
    "/home/alice/it's \"quoted\" $(reboot) `id` \\ back\\slash",
    "/home/alice/w\u00f6rk/\u20ac/\U0001f600/tab\there",
    "/home/alice/a/b\\/c;d&e|f<g>h*?[x]",
])
def test_parser_decodes_json_strings_exactly(tmp_path, workdir):
    status, out, err = parse(tmp_path, render("user-data.j2", **seed_values(workdir=workdir)))
    assert status == 0, err
    assert calls(tmp_path, out)[3][-1] == workdir


@needs_busybox
@pytest.mark.parametrize("user_data, reason", [
    ("hostname: \"x\"\n", "not #cloud-config"),
    ("#cloud-config\nhostname: \"x\\q\"\n", "unknown escape"),
    ("#cloud-config\nhostname: \"x\\u12\"\n", "bad \\u escape"),
    ("#cloud-config\nhostname: \"x\\u0000\"\n", "NUL"),
    ("#cloud-config\nhostname: \"x\\ud800\"\n", "unpaired surrogate"),
    ("#cloud-config\nhostname: \"x\n", "unterminated"),
    ("#cloud-config\nhostname: x\n", "double-quoted"),
    ("#cloud-config\nhostname: \"x\" trailing\n", "text after"),
    ("#cloud-config\nwrite_files:\n  - path: /etc/x\n", "unsupported key write_files"),
    ("#cloud-config\nruncmd:\n  - [rm, -rf, 'x']\n", "unsupported runcmd argument"),
    ("#cloud-config\nbootcmd:\n  - [rm, -rf, 'x']\n", "unsupported bootcmd argument"),
    ("#cloud-config\nhostname: \"h\"\n", "no user"),
])
def test_parser_refuses_what_it_cannot_decode(tmp_path, user_data, reason):
    status, out, err = parse(tmp_path, user_data)
    assert status != 0
    assert reason in err
    assert out == b""


@needs_busybox
def test_parser_refuses_unknown_user_keys(tmp_path):
    ud = render("user-data.j2", **seed_values()).replace("    lock_passwd: true\n",
                                                          "    sudo: ALL\n")
    status, _, err = parse(tmp_path, ud)
    assert status != 0 and "unsupported user key sudo" in err


def _kernel_deb():
    debs = sorted(glob.glob("/var/cache/vmwn/debs/linux-image-*-cloud-amd64_*.deb")
                  + glob.glob("/var/cache/apt/archives/linux-image-*-cloud-amd64_*.deb"))
    if not debs:
        pytest.skip("no cached Debian cloud kernel package: run 'vmwn image build tiny'")
    return debs[-1]


def test_modules_are_copied_with_dependencies_first(tmp_path):
    """install_modules resolves depends= from the real .modinfo of Debian's modules."""
    subprocess.run(["dpkg-deb", "-x", _kernel_deb(), str(tmp_path / "k")], check=True)
    moddir = glob.glob(str(tmp_path / "k" / "lib" / "modules" / "*"))[0]
    release = os.path.basename(moddir)
    net = glob.glob(os.path.join(moddir, "kernel", "drivers", "net", "virtio_net.ko"))[0]
    assert {"net_failover", "virtio"} <= set(tiny.modinfo_depends(net))
    root = tmp_path / "root"
    order = [os.path.basename(p)[:-3] for p in tiny.install_modules(str(root), moddir, release)]
    for before, after in [("failover", "net_failover"), ("net_failover", "virtio_net"),
                          ("virtio", "virtio_pci"), ("virtio_ring", "virtio_blk")]:
        assert order.index(before) < order.index(after)
    assert "ext4" not in order  # built into the cloud kernel
    assert {"isofs", "virtio-rng", "virtio_blk", "virtio_net"} <= set(order)
    for rel in tiny.install_modules(str(root), moddir, release):
        assert (root / "lib" / "modules" / release / rel).is_file()


# --- the image command ----------------------------------------------------------

def write_conf(tmp_path):
    conf = tmp_path / "vmwn.conf"
    conf.write_text(f"""[site]
image_dir = {tmp_path / 'images'}
[env tiny]
image = tiny/disk.qcow2
kernel = tiny/vmlinuz
initrd = tiny/initrd.img
[env other]
kernel = other/vmlinuz
""")
    return str(conf)


@pytest.fixture
def no_subprocesses(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected command: {args[0] if args else kwargs}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_build_is_a_no_op_when_the_files_exist(tmp_path, capsys, no_subprocesses):
    from vmwn import cli
    conf = write_conf(tmp_path)
    d = tmp_path / "images" / "tiny"
    d.mkdir(parents=True)
    for f in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / f).write_text("x")
    from vmwn import images
    (d / ".vmwn-recipe").write_text(images.recipe("tiny") + "\n")  # built by this vmwn
    assert cli.main(["--config", conf, "image", "build", "tiny"]) == 0
    assert capsys.readouterr().out == "tiny: up to date\n"
    assert cli.main(["--config", conf, "image", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny\tvmwn image build\tbuilt" in out
    assert "other\tno builder\tmissing" in out


@pytest.mark.parametrize("name, message", [
    ("other", "no image builder for environment 'other'"),
    ("nope", "no environment 'nope' in the configuration"),
])
def test_build_refuses_environments_it_cannot_build(tmp_path, capsys, name, message):
    from vmwn import cli
    assert cli.main(["--config", write_conf(tmp_path), "image", "build", name]) == 3
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_build_names_a_missing_tool_and_writes_nothing(tmp_path, monkeypatch):
    from vmwn.errors import SiteError
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in tiny.TOOLS:
        if tool != "cpio" and shutil.which(tool):
            os.symlink(shutil.which(tool), bindir / tool)
    monkeypatch.setenv("PATH", str(bindir))
    env = config.load(write_conf(tmp_path)).environments["tiny"]
    with pytest.raises(SiteError, match="cpio is not installed: run make deps"):
        tiny.build(None, env)
    assert not (tmp_path / "images" / "tiny").exists() or \
        not os.listdir(tmp_path / "images" / "tiny")


# --- boot ---------------------------------------------------------------------

def tiny_env():
    try:
        env = config.load(CONF).environments["tiny"]
    except Exception as e:  # noqa: BLE001 - any configuration problem means "not built"
        pytest.skip(f"cannot load {CONF}: {e}")
    if env.missing():
        pytest.skip("tiny image not built: run 'vmwn --config etc/vmwn.conf image build tiny'")
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ed25519_pair():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def make_seed(tmp_path, values):
    d = tmp_path / "seed"
    d.mkdir()
    (d / "user-data").write_text(render("user-data.j2", **values))
    (d / "meta-data").write_text(render("meta-data.j2", **values))
    iso = tmp_path / "seed.iso"
    subprocess.run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata",
                    "-joliet", "-rock", "user-data", "meta-data"], cwd=d, check=True)
    return iso


@contextlib.contextmanager
def booted(tmp_path, env, values):
    iso = make_seed(tmp_path, values)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", env.image,
                    str(overlay)], check=True)
    port = free_port()
    console = tmp_path / "console.log"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
            "-kernel", env.kernel, "-initrd", env.initrd, "-append", "console=ttyS0 no_timer_check quiet",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={iso},if=virtio,format=raw,readonly=on",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci",
            "-serial", f"file:{console}", "-display", "none", "-monitor", "none"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield proc, port, console, start
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_console(proc, console, pattern, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"guest did not print {pattern!r}; console:\n"
                         + (console.read_text(errors="replace") if console.exists() else ""))


def client(port, host_public, user_private=None, username="alice", timeout=10):
    import io
    import paramiko
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    kind, blob = host_public.split()[:2]
    c.get_host_keys().add(f"[127.0.0.1]:{port}", kind, paramiko.PKey.from_type_string(
        kind, __import__("base64").b64decode(blob)))
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(user_private)) if user_private else None
    c.connect("127.0.0.1", port=port, username=username, pkey=pkey, timeout=timeout,
              banner_timeout=timeout, auth_timeout=timeout, allow_agent=False,
              look_for_keys=False)
    return c


def run_cmd(c, cmd):
    _, out, err = c.exec_command(cmd, timeout=30)
    status = out.channel.recv_exit_status()
    return status, out.read().decode(), err.read().decode()


def kernel_release(env):
    """The release of the Debian kernel in the image (from its modules in the initrd)."""
    with open(env.initrd, "rb") as f:  # a plain newc cpio: the guest need not inflate it
        cp = subprocess.run(["cpio", "-it", "--quiet", "lib/modules/*/load-order"], stdin=f,
                            capture_output=True, text=True, check=True)
    return cp.stdout.split("/")[2]


@pytest.mark.integration
def test_boot_ssh_sftp_and_pinned_host_key(tmp_path):
    import paramiko
    env = tiny_env()
    host_private, host_public = ed25519_pair()
    user_private, user_public = ed25519_pair()
    workdir = "/home/alice/jobs/42 it's \u00e9"
    values = seed_values(authorized_key=user_public + " alice@ce", host_key_private=host_private,
                         host_key_public=host_public, workdir=workdir)
    with booted(tmp_path, env, values) as (proc, port, console, start):
        wait_console(proc, console, r"^vmwn-guest: ready\s*$", 120)
        ready = time.monotonic() - start
        c = None
        while c is None:
            try:
                c = client(port, host_public, user_private)
            except (paramiko.SSHException, OSError):
                if time.monotonic() - start > 120:
                    raise
                time.sleep(0.1)
        answered = time.monotonic() - start
        with c:
            status, out, err = run_cmd(c, "id; uname -r; hostname; ls -ld \"$HOME\"")
            assert status == 0, err
            lines = out.splitlines()
            assert lines[0] == "uid=1234(alice) gid=2345(physics) groups=2345(physics)"
            assert lines[1] == kernel_release(env)
            assert re.fullmatch(r"6\.1\.0-\d+-cloud-amd64", lines[1])
            assert lines[2] == "vmwn-42"
            assert lines[3].startswith("drwxr-xr-x") and " alice " in lines[3]
            status, out, _ = run_cmd(c, "stat -c '%a %U %G' " + _sq(workdir)
                                     + "; stat -c '%a %U' /home/alice/.ssh/authorized_keys"
                                     + "; awk '$2 == \"/home\" {print $3}' /proc/mounts")
            assert out.split("\n")[:3] == ["700 alice physics", "600 alice", "ext4"]
            payload = os.urandom(300_000)
            (tmp_path / "in.bin").write_bytes(payload)
            with c.open_sftp() as sftp:
                sftp.put(str(tmp_path / "in.bin"), workdir + "/data.bin")
                sftp.get(workdir + "/data.bin", str(tmp_path / "out.bin"))
            assert (tmp_path / "out.bin").read_bytes() == payload
            status, out, _ = run_cmd(c, "sha256sum " + _sq(workdir + "/data.bin"))
            import hashlib
            assert out.split()[0] == hashlib.sha256(payload).hexdigest()
            # PID 1 reaps orphans; the usual tools are where scripts expect them.
            status, out, _ = run_cmd(c, "(sleep 0.2 &); sleep 1; "
                                        "grep -l '^State:.*Z' /proc/[0-9]*/status; "
                                        "/usr/bin/env true && echo env-ok; echo $SHELL")
            assert out.split() == ["env-ok", "/bin/sh"]
            # A pty works (devpts mounted, tty group present).
            _, out, _ = c.exec_command("tty", get_pty=True, timeout=30)
            assert out.read().decode().strip().startswith("/dev/pts/")
        # A client pinning another host key must be refused.
        _, other_public = ed25519_pair()
        with pytest.raises((paramiko.BadHostKeyException, paramiko.SSHException)):
            client(port, other_public, user_private).close()
        # Passwords and root are refused.
        with pytest.raises(paramiko.SSHException):
            client(port, host_public, None, username="root").close()
        print(f"\ntiny boot: ready on console {ready:.2f} s, SSH answered {answered:.2f} s; "
              f"initrd {os.path.getsize(env.initrd)} bytes")


def _sq(s):
    return "'" + s.replace("'", "'\"'\"'") + "'"


@pytest.mark.integration
def test_bad_seed_is_reported_and_the_guest_powers_off(tmp_path):
    env = tiny_env()
    host_private, host_public = ed25519_pair()
    values = seed_values(shell="/bin/bash", host_key_private=host_private,
                         host_key_public=host_public)
    with booted(tmp_path, env, values) as (proc, _port, console, _start):
        text = wait_console(proc, console, r"^vmwn-guest: error: .*$", 120)
        assert "shell /bin/bash does not exist" in text
        assert "vmwn-guest: ready" not in text
        proc.wait(60)  # poweroff -f ends QEMU
