"""The keeper: the job's warden for the rest of the job, once its guest runs.

The Python warden (vmwn.warden) boots the guest and serves the job starter's
setup.  What a running job still needs from a root process is small: pause and
resume the domain (the batch system's suspend), a connection to the guest's
forward for a further task, and noticing that the job ended.  For that a
resident Python process (about 20 MiB private) is too heavy, so when the job's
starter says ``running`` the warden execs ``keeper.c`` in its own place: the
same pid and start time (the epilogue's stop finds it as before), the same
socket, connections and answer, a few hundred KiB.

The keeper is built by vmwn-install beside the QEMU launcher
(``[site] emulator``'s directory).  Where it is missing, the Python warden
serves the job to its end, as it always did.
"""

import os
import shutil

from . import emulator, sysfiles

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keeper.c")
NAME = "keeper"
# Where the keeper looks for virsh (it runs with this PATH and nothing else).
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def path(cfg):
    """Where this node's keeper is: beside the QEMU launcher."""
    return emulator.beside(cfg.site["emulator"], NAME)


def build(out):
    """Compile the keeper into ``out`` (vmwn-install; the tests' own)."""
    sysfiles.compile_c(out, [SOURCE], [], "vmwn's keeper",
                       "check the node's C compiler (gcc, libc6-dev)")


def virsh():
    """The virsh the keeper pauses and resumes the domain with, or None."""
    return shutil.which("virsh", path=SEARCH_PATH)


def usable(cfg):
    """(keeper path, virsh) when both are there to hand over to, else None."""
    prog, vsh = path(cfg), virsh()
    if vsh and os.access(prog, os.X_OK):
        return prog, vsh
    return None


def argv(prog, vsh, *, job_id, owner, domain, uri, forward, port, listen_fd, answer_fd,
         primary_fd=None, other_fds=(), job_dir=None, idle=300, syslog=False, log_fd=None):
    """The keeper's command line (every descriptor must be inheritable)."""
    args = [prog, "--job", str(job_id), "--owner", str(int(owner)), "--domain", domain,
            "--uri", uri, "--virsh", vsh, "--forward", str(forward), "--port", str(int(port)),
            "--listen", str(listen_fd), "--answer", str(answer_fd), "--idle", str(int(idle))]
    if primary_fd is not None:
        args += ["--primary", str(primary_fd)]
    for fd in other_fds:
        args += ["--conn", str(fd)]
    if job_dir:
        args += ["--job-dir", job_dir]
    if syslog:
        args.append("--syslog")
    if log_fd is not None:
        args += ["--log-fd", str(log_fd)]
    return args


def answer_fd(answer):
    """An inheritable descriptor to read ``answer`` (bytes) from, from its start."""
    fd = os.memfd_create("vmwn-answer", 0)
    try:
        view = memoryview(answer)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
