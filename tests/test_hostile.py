"""Hostile input: every user-controlled string meets a clear error or stays inert text.

Unit cases cover argv, environment names, request sizing, the starter's stdin,
domain XML and the guest command line; the guest cases cover symlinks on
both sides of a harvest, the harvest quota, and a second local user going
after a running job's key, seed, disk and forwarded port.
"""

import contextlib
import os
import pwd
import stat
import subprocess
import xml.etree.ElementTree as ET

import pytest

from vmwn.spec import JobSpec
from vmwn import domain, jobrun, lifecycle, state
from vmwn.torque import pbs, request
from vmwn.errors import SiteError, UserError
from vmwn.wardenclient import answer_error
from vmwn.torque.hooks import prologue, starter

from conftest import write_site_config
from vmwn_testlib import IMAGE_DIR

HAVE_TINY = all(os.path.exists(os.path.join(IMAGE_DIR, "tiny", f))
                for f in ("disk.qcow2", "vmlinuz", "initrd.img"))
OTHER_USER = "vmwntest2"

# Markup and code of every language vmwn writes, and bytes that are not text.
HOSTILE = [
    "<job>&amp;\"'</job>", "]]><!ENTITY x SYSTEM 'file:///etc/shadow'>", "--><!--",
    "$(touch /tmp/vmwn-pwned)`id`;|&>", "'; rm -rf ~; '", "a\nb\r\nc\td",
    "key: value\n- [flow]\n&anchor *alias !!python/object", "dn: cn=x,o=grid\nobjectClass: top",
    "{{ 7*7 }}{% raw %}", "\u2028\u2029\x1b[31m", "\udcff\udcfe-not-utf8", "x" * 20000,
    "\\\\server\\share\\..\\..", "%s%n%x",
]



@pytest.fixture
def site(tmp_path):
    path = str(tmp_path / "vmwn.conf")
    write_site_config(path, str(tmp_path))
    os.makedirs(tmp_path / "torque" / "mom_priv" / "jobs")
    from vmwn import config
    return config.load(path), path, str(tmp_path / "torque")


def run_prologue(site, capsys, *, job_id="7.srv", user="root", name="job", res="",
                 queue="batch", environ=None):
    cfg, path, home = site
    argv = ["prologue", job_id, user, "root", name, res, queue, "", ""]
    rc = prologue.main(argv, config_path=path, pbs_home=home,
                       environ=environ or {"PBS_O_WORKDIR": "/tmp/w"})
    err = capsys.readouterr().err
    refusal = state.read_refusal(cfg.site["state_dir"], job_id)
    if refusal is not None:  # what the job starter prints on the job's stderr
        err += f"vmwn: {answer_error(refusal).line()}\n"
        jd = state.job_dir(cfg, job_id)
        assert os.listdir(jd) == [state.REFUSAL_NAME], "something was made for a refused job"
        assert sorted(os.listdir(cfg.site["state_dir"])) in \
            ([os.path.basename(jd)], [".ports.lock", os.path.basename(jd)])
    else:
        assert not os.path.exists(cfg.site["state_dir"]) or \
            os.listdir(cfg.site["state_dir"]) in ([], [".ports.lock"])
    return rc, err


def one_line(err):
    return err.startswith("vmwn: ") and err.count("\n") == 1


# ------------------------------------------------------------- free text

@pytest.mark.parametrize("text", HOSTILE)
def test_job_name_reaches_domain_xml_as_text(site, text):
    cfg = site[0]
    xml = domain.render(cfg, cfg.env("tiny"), job_id="7.srv", user="alice", job_name=text,
                        port=40001, overlay="/o.qcow2", seed="/s.iso", console_log="/c.log")
    root = ET.fromstring(xml)  # well-formed, and still one domain with our metadata
    assert root.tag == "domain" and len(root.findall("devices/disk")) == 2
    # XML parsers normalise line ends; everything else comes back as written.
    want = domain.xml_text(text).replace("\r\n", "\n").replace("\r", "\n")
    assert domain.metadata_of(xml)["jobname"] == want
    assert "SYSTEM" not in xml or "&lt;!ENTITY" in xml


@pytest.mark.parametrize("user", ["Alice", "a b", "a;id", "$(id)", "../root", "a\nb",
                                  "x" * 40, "-rf", "u\udcff"])
def test_user_and_group_names_that_cannot_reach_a_guest_are_refused(site, user):
    cfg = site[0]
    with pytest.raises(SiteError, match="cannot be used in a guest"):
        JobSpec(job_id="7.srv", user=user, uid=1000, gid=1000, group="g", job_name="j",
                env=cfg.env("tiny"), vcpus=1, memory_mib=256, workdir="/tmp/w",
                host_workdir="/tmp/w")


@pytest.mark.parametrize("workdir", ["/tmp/a\0b", "/tmp/a\nb", "/tmp/../etc", "/etc/cron.d",
                                     "/tmp/" + "d" * 1100, "relative"])
def test_hostile_working_directories_are_refused(site, workdir):
    cfg = site[0]
    with pytest.raises(UserError, match="working directory"):
        JobSpec(job_id="7.srv", user="alice", uid=1000, gid=1000, group="g", job_name="j",
                env=cfg.env("tiny"), vcpus=1, memory_mib=256, workdir=workdir,
                host_workdir=workdir)


@pytest.mark.parametrize("env", ["../../../etc/passwd", "tiny/../../x", "tiny\nother",
                                 "<tiny/>", "tiny;reboot", "TINY", "\udcfftiny", "x" * 3000])
def test_environment_names_never_become_paths(site, capsys, env):
    rc, err = run_prologue(site, capsys, res=f"other=vmwn={env}")
    assert rc == 0 and one_line(err), err  # refused: the job starter shows the line
    assert "unknown vmwn environment" in err and "request one of: tiny" in err


@pytest.mark.parametrize("res, text", [
    ("ncpus=99999", "asks for 99999 cores"),
    ("nodes=1:ppn=4096", "cores"),
    ("nodes=1:ppn=0", "bad ppn"),
    ("ncpus=-1", "not a positive number"),
    ("ncpus=1e9", "not a positive number"),
    ("mem=999999tb", "MiB of memory"),
    ("mem=18446744073709551616gb", "MiB of memory"),
    ("mem=-1gb", "not a Torque size"),
    ("pmem=1pb,ncpus=1", "MiB of memory"),
])
def test_absurd_sizes_are_the_users_mistake(site, capsys, res, text):
    user = pwd.getpwuid(os.getuid()).pw_name
    rc, err = run_prologue(site, capsys, user=user, res=f"{res},other=vmwn=tiny")
    assert rc == 0 and one_line(err) and text in err, err


def test_resource_string_at_the_2048_byte_limit(site):
    cfg = site[0]
    head = "walltime=01:00:00,other=vmwn=tiny,"
    pad = ",".join(f"file{i}=1gb" for i in range(400))
    full = (head + pad)[:2048].rsplit(",", 1)[0]  # the mom drops the pair that does not fit
    assert len(full) <= 2048 and len(head + pad) > 2048
    args = pbs.PrologueArgs("7.srv", "alice", "g", "j", full, "batch", "", "")
    assert request.requested_env(cfg, args, lambda: {}) == request.Choice("tiny", "-l other")
    # The vmwn request itself dropped off the end: the job is a plain host job.
    args = pbs.PrologueArgs("7.srv", "alice", "g", "j", (pad + ",other=vmwn=tiny")[:2048],
                            "batch", "", "")
    assert request.requested_env(cfg, args, lambda: {}) is None


def test_job_record_with_hostile_variable_list(site, capsys):
    cfg, path, home = site
    with open(os.path.join(home, "mom_priv", "jobs", "7.srv.JB"), "wb") as f:
        f.write(b"<job><attributes><Variable_List>VMWN_ENV=../../etc\\,x,"
                b"PBS_O_WORKDIR=/tmp/\xff\xfe</Variable_List></attributes></job>")
    rc, err = run_prologue(site, capsys)
    assert rc == 2 and one_line(err) and "is not XML" in err, err


# ------------------------------------------------------------ the starter's stdin

def jobs_dir(site):
    return os.path.join(site[2], "mom_priv", "jobs")


def test_sc_line_with_broken_f_arguments_is_a_clear_error(site):
    sc = os.path.join(jobs_dir(site), "1.srv.SC")
    with open(sc, "w") as f:
        f.write("echo hi\n")
    with pytest.raises(UserError, match="cannot parse the job's -F arguments"):
        starter.read_job_script(site[0].site["pbs_home"], f"exec {sc} 'unterminated\n".encode())


@pytest.mark.parametrize("line", [
    b"/nonexistent/jobs/1.srv.SC\n",      # not in this mom's jobs directory
    b"/dev/zero.SC\n",                    # a device, elsewhere
    b"exec /bin/sh -c 'cat /etc/shadow'\n",
    b"exec ../../../etc/passwd.SC\n",
])
def test_lines_that_are_not_the_moms_script_are_script_text(site, line):
    """Only <pbs_home>/mom_priv/jobs/*.SC is ever opened; anything else runs as text."""
    script, args, how = starter.read_job_script(site[0].site["pbs_home"], line)
    assert (script, args, how) == (line, [], "text")


def test_sc_line_naming_a_fifo_is_never_opened(site):
    fifo = os.path.join(jobs_dir(site), "9.srv.SC")
    os.mkfifo(fifo)
    line = fifo.encode() + b"\n"
    assert starter.read_job_script(site[0].site["pbs_home"], line) == (line, [], "text")


def test_stdin_with_nul_bytes_is_refused(site):
    with pytest.raises(UserError, match="NUL"):
        starter.read_job_script(site[0].site["pbs_home"], b"#!/bin/sh\necho\0hi\n")


def test_sc_line_naming_a_root_only_file_is_not_read_for_the_user(site, test_user, tmp_path):
    from vmwn import privs
    secret = os.path.join(jobs_dir(site), "8.srv.SC")
    with open(secret, "w") as f:
        f.write("root only\n")
    os.chmod(secret, 0o600)

    def attempt(line):
        try:
            script, _, _ = starter.read_job_script(site[0].site["pbs_home"], line.encode())
        except UserError as e:
            return str(e)
        return script.decode()
    for d in (tmp_path, tmp_path / "torque", tmp_path / "torque" / "mom_priv",
              tmp_path / "torque" / "mom_priv" / "jobs"):
        os.chmod(d, 0o755)
    got = privs.run_as(test_user.pw_name, test_user.pw_uid, test_user.pw_gid, attempt,
                       f"{secret}\n", timeout=30)
    # Reading happens with the user's rights: the file is refused, never its content shown.
    assert "root only" not in got
    assert "Permission denied" in got or got == f"{secret}\n"


# ------------------------------------------------------- the guest command line

def test_variable_values_pass_the_guest_shell_as_data(world_tmp, test_user):
    """The exact command the starter sends, run by sh: values arrive byte for byte."""
    values = {f"V{i}": v for i, v in enumerate(HOSTILE)}
    values["NUL"] = "a\0b"
    values["BAD"] = "\udcff"
    items = jobrun.guest_env(values)
    names = [k for k, _ in items]
    # What the guest cannot be given (NUL, non-UTF-8) is dropped, never mangled.
    assert "NUL" not in names and "BAD" not in names
    assert f"V{HOSTILE.index(next(v for v in HOSTILE if 'not-utf8' in v))}" not in names
    assert len(names) == len(HOSTILE) - 1
    os.chmod(world_tmp, 0o777)
    cmd = jobrun.build_command(os.path.join(world_tmp, "pid"), world_tmp, items, ["/usr/bin/env", "-0"])
    marker = "/tmp/vmwn-pwned"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, env={"HOME": "/nonexistent"},
                       user=test_user.pw_uid, group=test_user.pw_gid, timeout=30)
    assert r.returncode == 0, r.stderr
    got = dict(e.split(b"=", 1) for e in r.stdout.split(b"\0") if e)
    for k, v in items:
        assert got[k.encode()] == v.encode(), k
    assert not os.path.exists(marker)


# ------------------------------------------------------------------ with a guest

def _other_user():
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        import grp
        cmd = ["useradd", "--no-create-home", "--shell", "/bin/sh", OTHER_USER]
        with contextlib.suppress(KeyError):
            grp.getgrnam(OTHER_USER)
            cmd[1:1] = ["-g", OTHER_USER]  # a group of that name is left from elsewhere
        subprocess.run(cmd, check=True)
        return pwd.getpwnam(OTHER_USER)


def _as(pw, func, *args):
    from vmwn import privs
    return privs.run_as(pw.pw_name, pw.pw_uid, pw.pw_gid, func, *args, timeout=60)


def _try_read(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return "read"
    except OSError as e:
        return e.strerror


def _try_login_without_the_key(st_fields):
    from vmwn import keys, ssh
    from vmwn.state import JobState
    import paramiko
    import io
    st = JobState.from_json(st_fields)
    other = paramiko.Ed25519Key.from_private_key(io.StringIO(keys.generate("x").private_openssh))
    try:
        ssh.Guest.connect(st, timeout=15, pkey=other).close()
        return "logged in"
    except Exception as e:  # noqa: BLE001 - the class is the answer
        return f"{type(e).__name__}: {e}"


guest = pytest.mark.skipif(not HAVE_TINY or os.geteuid() != 0,
                           reason="needs root and the tiny image")


@pytest.mark.integration
@guest
def test_a_second_local_user_cannot_use_the_jobs_key_seed_disk_or_port(world_tmp, test_user):
    import dataclasses
    from test_faults import Node
    node = Node(world_tmp, test_user)
    other = _other_user()
    run = node.job()
    assert run.prologue() == 0
    try:
        st = run.wait_ready()
        key = os.stat(st.key_path)
        assert stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid == test_user.pw_uid
        assert os.stat(os.path.dirname(st.key_path)).st_uid == 0
        assert os.stat(os.path.join(os.path.dirname(st.key_path), "state.json")).st_uid == 0
        record = os.path.join(os.path.dirname(st.key_path), "state.json")
        for path in (st.key_path, st.seed, st.overlay, record):
            assert _as(other, _try_read, path) == "Permission denied", path
        # The warden answers the job's own user only (socket 0600, and it checks the peer).
        sock = os.path.join(os.path.dirname(st.key_path), "warden.sock")
        assert _as(other, _try_connect, sock) == "Permission denied"
        with pytest.raises(SiteError, match="Permission denied"):
            _as(other, os.listdir, node.cfg.site["state_dir"])  # job ids are not listed
        # Loads every module the attempt needs: the child cannot read this interpreter's tree.
        assert "refused the job's key" in _try_login_without_the_key(dataclasses.asdict(st))
        got = _as(other, _try_login_without_the_key, dataclasses.asdict(st))
        assert got.startswith(("TransientError", "AuthenticationException")), got
        assert "refused the job's key" in got
        # The job's own user, with the key, does get in.
        assert _as(test_user, _try_read, st.key_path) == "read"
    finally:
        run.epilogue(-3)
        run.prologue_rc = 2
        run.finish()
    run.assert_clean()


def _try_connect(path):
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return "connected"
    except OSError as e:
        return e.strerror
    finally:
        s.close()


def test_state_root_is_not_listable_by_other_users(site, test_user):
    from vmwn import state
    root = state.ensure_root(site[0])
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
    with pytest.raises(Exception, match="Permission denied"):
        _as(test_user, os.listdir, root)


HARVEST_JOB = """#!/bin/sh
cd "$PBS_O_WORKDIR"
rm -f planted.txt && echo 'written by the job' > planted.txt
ln -s /etc/shadow shadow-link
ln -s /root root-link
mkdir -p sub && ln -s /etc sub/etc-link
echo small > small.txt
head -c 3000000 /dev/zero > zbig.bin
echo done
"""


@pytest.mark.integration
@guest
def test_harvest_with_symlinks_on_both_sides_and_over_quota(world_tmp, test_user):
    from test_faults import Node
    node = Node(world_tmp, test_user, site_extra="harvest_max = 1M")
    target = os.path.join(world_tmp, "root-owned.txt")
    with open(target, "w") as f:
        f.write("root's\n")
    os.chmod(target, 0o644)
    os.symlink(target, os.path.join(node.submit, "planted.txt"))
    run = node.job(script=HARVEST_JOB)
    outcome = run.run_all()
    assert outcome.status == 0
    out, err = run.texts()
    assert "done" in out
    # The planted symlink was not written through, and the user is told.
    assert open(target).read() == "root's\n"
    assert os.path.islink(os.path.join(node.submit, "planted.txt"))
    assert "planted.txt: the host path is a symlink; not written through" in err + out, err
    # Guest symlinks are guest content only: nothing of them reaches the host.
    for name in ("shadow-link", "root-link", "sub/etc-link"):
        assert not os.path.lexists(os.path.join(node.submit, name)), name
    # Over the quota: the big file stays behind, with a message; the small one arrived.
    assert run.workdir_file("small.txt") == "small\n"
    assert not os.path.exists(os.path.join(node.submit, "zbig.bin"))
    assert "harvest_max" in err + out, (out, err)
    run.assert_clean()
