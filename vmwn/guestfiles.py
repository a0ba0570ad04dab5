"""vmwn's files in the guest: where its control directory is and what is in it.

The one owner of these names.  The seed makes the directory, the job starter
writes the job's script, environment, node file and the copy mode's manifest
there, the job's shell records its process group in the pid file, and the
epilogue, the harvest and the offline recovery read them back.
"""

import posixpath

# With the home mounted from the host the files live outside it, in the guest's
# own file system (not /run: Debian mounts it noexec, and the job script is run).
MOUNTED_CONTROL_DIR = "/var/lib/vmwn-job"
# Otherwise (copy mode) in the guest's own home, relative to it.
HOME_CONTROL_DIR = ".vmwn"

JOB = "job"                # the batch job's tag; tasks (pbsdsh, tm_spawn) are task-N
JOB_SCRIPT = "job.sh"
NODEFILE = "nodefile"      # the job's PBS_NODEFILE
MANIFEST = "manifest.json"  # copy mode: what was staged in, and the job's umask


def guest_home(user):
    """The job user's home in the guest (cloud-init's and the tiny guest's default)."""
    return f"/home/{user}"


def control_dir(user, mounted):
    """Guest directory for vmwn's control files: never one a share covers."""
    return MOUNTED_CONTROL_DIR if mounted else f"{guest_home(user)}/{HOME_CONTROL_DIR}"


def task_tag(tasknum):
    """The tag of a task's files (a batch job's is JOB)."""
    return f"task-{tasknum}"


def pidfile(ctl, tag=JOB):
    """Holds the process group of the shell that runs ``tag`` (the job or a task)."""
    return posixpath.join(ctl, f"{tag}.pid")


def envfile(ctl, tag=JOB):
    """The environment the job starter hands ``tag``'s shell."""
    return posixpath.join(ctl, f"{tag}.env")
