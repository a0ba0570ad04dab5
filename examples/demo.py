"""``make demo``: one sample job through the installed hooks, in its own VM, end to end.

Runs examples/job.sh with ``vmwn run -l other=vmwn=tiny`` as an unprivileged
demo user from a fresh submit directory, then shows the job's .o/.e files and
the result file the job wrote into it from inside its VM (the directory is
mounted there; with ``data = copy`` the epilogue copies it back).
"""

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

from vmwn.errors import SiteError, exit_code

DEMO_USER = "vmwndemo"
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "job.sh")


def ensure_user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


def main(argv=None):
    p = argparse.ArgumentParser(prog="examples/demo.py")
    p.add_argument("--pbs-home", default="/var/spool/torque")
    p.add_argument("--config", default="/etc/vmwn/vmwn.conf")
    p.add_argument("--env", default="tiny")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("vmwn demo: must run as root (it plays pbs_mom): run 'sudo make demo'",
              file=sys.stderr)
        return exit_code("cli", SiteError("not root"))
    user = ensure_user(DEMO_USER)
    submit = tempfile.mkdtemp(prefix="vmwn-demo-", dir="/tmp")
    try:
        os.chmod(submit, 0o755)
        shutil.copy(EXAMPLE, os.path.join(submit, "job.sh"))
        with open(os.path.join(submit, "input.txt"), "w") as f:
            f.write("hello from the submit host\n")
        for n in ("", "job.sh", "input.txt"):
            os.chown(os.path.join(submit, n), user.pw_uid, user.pw_gid)
        vmwn = os.path.join(os.path.dirname(sys.executable), "vmwn")
        cmd = [vmwn, "--config", args.config, "run", "--pbs-home", args.pbs_home,
               "-u", DEMO_USER, "-l", f"other=vmwn={args.env}", "-N", "demo", "job.sh"]
        print("$ cd", submit, "&& vmwn", " ".join(cmd[3:]), flush=True)
        r = subprocess.run(cmd, cwd=submit)
        for name in sorted(os.listdir(submit)):
            if name.startswith("demo.") or name == "result.txt":
                path = os.path.join(submit, name)
                st = os.stat(path)
                print(f"--- {name} (owner {pwd.getpwuid(st.st_uid).pw_name})")
                with open(path, errors="replace") as f:
                    sys.stdout.write(f.read())
        print(f"--- vmwn run exited {r.returncode}")
        return r.returncode
    finally:
        shutil.rmtree(submit, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
