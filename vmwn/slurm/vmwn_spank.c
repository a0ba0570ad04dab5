/*
 * vmwn's SPANK plugin for Slurm: `--vmwn=ENV` on sbatch (and `#SBATCH --vmwn=ENV`)
 * runs the batch job in its own virtual machine of environment ENV.
 *
 * As small as it can be: every decision is vmwn's runtime's, run as a
 * subprocess (`PYTHON -I -m vmwn.slurm.runtime ACTION CONFIG KEY=VALUE...`, no
 * shell, a timeout, its last line of output kept):
 *
 *   sbatch, srun (submission)    `check env=ENV`: an unknown environment is
 *                                refused at submission, with vmwn's line on the
 *                                user's terminal; no job is made, no node drained.
 *                                salloc, and srun inside an allocation, refused.
 *   slurmstepd, the job's step   `begin` (root, after the options): prepare the
 *   (batch, or srun's own)       VM and fork its warden; it never fails the step
 *                                (a failure becomes a refusal the starter shows).
 *   the task (job user)          exec vmwn's Slurm job starter in the program's
 *                                place: `STARTER batch SCRIPT ARGS...` or
 *                                `STARTER exec PROGRAM ARGS...`; the job never
 *                                runs on the host.  One task per node.
 *   task exit (root)             `release`: the VM leaves the task's cgroup.
 *   slurmstepd exit, that step   `end` (root): stop the warden, copy back, destroy.
 *   job epilog (root)            `end` again, for a VM job: finishes a teardown
 *                                that the end of the step killed half-way.
 *   a further step of the job    (srun --jobid=N --overlap) `begin` says the job has
 *                                its VM: the task runs `STARTER step PROGRAM ARGS...`
 *                                in that guest; the step neither makes nor ends one.
 *
 * plugstack.conf: required PATH/vmwn_spank.so python=... config=... starter=...
 * (written by vmwn-slurm-install).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

#ifndef SLURM_BATCH_SCRIPT
#define SLURM_BATCH_SCRIPT (0xfffffffb)
#endif

SPANK_PLUGIN(vmwn, 1);

#define NAME_MAX_LEN 64
#define LINE_MAX_LEN 1024

static char python[4096] = "/usr/local/lib/vmwn/bin/python";
static char config[4096] = "/etc/vmwn/vmwn.conf";
static char starter[4096] = "/usr/local/libexec/vmwn/slurm-starter";
/* Where the job prolog notes that a job asked for a VM (see job_prolog). */
static char marks[4096] = "/run/vmwn-slurm-jobs";
static char env_name[NAME_MAX_LEN + 1];
static int asked;
static int began;
/* This step runs in the VM another step of its job made (srun --jobid=N). */
static int joined;

static int opt_vmwn(int val, const char *optarg, int remote);

static struct spank_option vmwn_option = {
	"vmwn", "ENV",
	"Run the job in its own virtual machine of environment ENV ('vmwn envs' lists them).",
	1, 0, opt_vmwn
};

/* ENV is a name: letters, digits, '.', '_' and '-' (as vmwn.conf's [env NAME]). */
static int opt_vmwn(int val, const char *optarg, int remote)
{
	size_t n = optarg ? strlen(optarg) : 0, i;

	(void) val;
	(void) remote;
	if (n == 0 || n > NAME_MAX_LEN)
		goto bad;
	for (i = 0; i < n; i++) {
		char c = optarg[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
		      || c == '.' || c == '_' || c == '-'))
			goto bad;
	}
	memcpy(env_name, optarg, n + 1);
	asked = 1;
	return 0;
bad:
	slurm_error("vmwn: --vmwn needs an environment name (letters, digits, '.', '_', '-'; "
		    "at most %d): ask for one that 'vmwn envs' lists", NAME_MAX_LEN);
	return -1;
}

static void set_arg(char *dst, size_t size, const char *arg, const char *key)
{
	size_t k = strlen(key);

	if (strncmp(arg, key, k) == 0 && arg[k] == '=' && strlen(arg + k + 1) < size)
		strcpy(dst, arg + k + 1);
}

/* plugstack.conf's arguments: each callback that Slurm gives them to (the job
 * prolog and epilog get them without slurm_spank_init). */
static void read_args(int ac, char **av)
{
	int i;

	for (i = 0; i < ac; i++) {
		set_arg(python, sizeof(python), av[i], "python");
		set_arg(config, sizeof(config), av[i], "config");
		set_arg(starter, sizeof(starter), av[i], "starter");
		set_arg(marks, sizeof(marks), av[i], "marks");
	}
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	read_args(ac, av);
	if (spank_option_register(sp, &vmwn_option) != ESPANK_SUCCESS) {
		slurm_error("vmwn: cannot register --vmwn");
		return -1;
	}
	return 0;
}

/*
 * Run vmwn's runtime: ACTION CONFIG ARGS...; its exit status (-1 if it could not
 * run or was killed), its last line of output in `line`.
 */
static int runtime(const char *action, char *const *args, int nargs, int timeout,
		   char *line, size_t size)
{
	char *argv[32];
	char buf[LINE_MAX_LEN * 4];
	size_t used = 0;
	int fds[2], status, i, n = 0;
	pid_t pid;
	struct timespec now;
	double end;
	char nox[4200];

	clock_gettime(CLOCK_MONOTONIC, &now);
	end = now.tv_sec + now.tv_nsec / 1e9 + timeout;
	/* Built before fork: the child of a threaded slurmstepd calls only
	 * async-signal-safe functions. */
	snprintf(nox, sizeof(nox), "vmwn: cannot run %s: reinstall vmwn on this node\n", python);
	line[0] = '\0';
	if (nargs > 24)
		return -1;
	argv[n++] = python;
	argv[n++] = "-I";
	argv[n++] = "-m";
	argv[n++] = "vmwn.slurm.runtime";
	argv[n++] = (char *) action;
	argv[n++] = config;
	for (i = 0; i < nargs; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	if (pipe2(fds, O_CLOEXEC) < 0)
		return -1;
	pid = fork();
	if (pid < 0) {
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		char *envp[] = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", NULL };
		int devnull = open("/dev/null", O_RDWR), sig;
		sigset_t none;
		long fd;

		/* slurmstepd (22.05) blocks TERM, INT, HUP, USR1, USR2, ALRM, PIPE...: what
		 * the runtime starts (the warden, virtiofsd) must be stoppable as usual,
		 * and hold none of slurmstepd's descriptors. */
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		for (sig = 1; sig < NSIG; sig++)
			if (sig != SIGKILL && sig != SIGSTOP)
				signal(sig, SIG_DFL);
		setsid();
		if (devnull >= 0)
			dup2(devnull, 0);
		dup2(fds[1], 1);
		dup2(fds[1], 2);
		for (fd = 3; fd < 65536; fd++)
			if (fd != fds[1])
				close((int) fd);
		if (chdir("/") < 0)
			_exit(126);
		execve(python, argv, envp);
		if (write(1, nox, strlen(nox)) < 0)
			_exit(127);
		_exit(127);
	}
	close(fds[1]);
	for (;;) {
		struct pollfd p = { fds[0], POLLIN, 0 };
		double left;
		ssize_t r;
		int ready;

		clock_gettime(CLOCK_MONOTONIC, &now);
		left = end - (now.tv_sec + now.tv_nsec / 1e9);
		ready = left > 0 ? poll(&p, 1, (int) (left * 1000) + 1) : 0;
		if (ready < 0 && errno == EINTR)
			continue;
		if (ready <= 0) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			snprintf(line, size, "vmwn: %s did not finish within %d s: the site should "
				 "look at the node's syslog", action, timeout);
			while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
				;
			close(fds[0]);
			return -1;
		}
		if (used == sizeof(buf) - 1) {  /* keep the last line's start */
			char *nl = memrchr(buf, '\n', used);
			size_t keep = nl ? used - (size_t) (nl + 1 - buf) : 0;

			memmove(buf, buf + used - keep, keep);
			used = keep == sizeof(buf) - 1 ? 0 : keep;
		}
		r = read(fds[0], buf + used, sizeof(buf) - 1 - used);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		used += (size_t) r;
	}
	close(fds[0]);
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	buf[used] = '\0';
	while (used > 0 && (buf[used - 1] == '\n' || buf[used - 1] == '\r'))
		buf[--used] = '\0';
	{
		const char *last = strrchr(buf, '\n');
		size_t n;

		last = last ? last + 1 : buf;
		n = strlen(last);
		if (n >= size)  /* the line's head is enough to tell the user */
			n = size - 1;
		memcpy(line, last, n);
		line[n] = '\0';
	}
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#ifndef SLURM_EXTERN_CONT
#define SLURM_EXTERN_CONT (0xfffffffc)
#endif

static uint32_t step_id(spank_t sp)
{
	uint32_t step = SLURM_EXTERN_CONT;

	if (spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS)
		return SLURM_EXTERN_CONT;
	return step;
}

/* The step that carries a VM job: the batch step, or the step of a job srun
 * made itself (salloc and srun inside an allocation are refused at submission,
 * so no other step of such a job asks).  The extern step runs no job. */
static int job_step(spank_t sp)
{
	return step_id(sp) != SLURM_EXTERN_CONT;
}

/* A job variable's value, "" when unset; one too long to hold is "?" (not a
 * path, not a number), which the runtime refuses rather than use a cut one. */
static const char *job_env(spank_t sp, const char *name, char *buf, int size)
{
	spank_err_t rc = spank_getenv(sp, name, buf, size);

	if (rc == ESPANK_NOSPACE)
		return "?";
	if (rc != ESPANK_SUCCESS)
		buf[0] = '\0';
	return buf;
}

/* At submission: only sbatch asks for a VM; the environment must be configured. */
static int check_submission(void)
{
	char arg[NAME_MAX_LEN + 8], line[LINE_MAX_LEN];
	char *args[] = { arg };
	const char *prog = program_invocation_short_name;

	if (strcmp(prog, "sbatch") != 0 && strcmp(prog, "srun") != 0) {
		slurm_error("vmwn: --vmwn runs a job of its own, which %s does not make: submit "
			    "a script with sbatch --vmwn=%s (or #SBATCH --vmwn=%s), or run srun "
			    "--vmwn=%s PROGRAM", prog, env_name, env_name, env_name);
		return -1;
	}
	if (strcmp(prog, "srun") == 0 && getenv("SLURM_JOB_ID") != NULL) {
		slurm_error("vmwn: srun --vmwn runs a job of its own, not a step of job %s: "
			    "run it outside the allocation, or give the allocation's sbatch "
			    "--vmwn=%s", getenv("SLURM_JOB_ID"), env_name);
		return -1;
	}
	snprintf(arg, sizeof(arg), "env=%s", env_name);
	if (runtime("check", args, 1, 20, line, sizeof(line)) != 0) {
		slurm_error("%s", line[0] ? line : "vmwn: the environment cannot be checked: the "
			    "site should reinstall vmwn");
		return -1;
	}
	return 0;
}

#define ARG_MAX_LEN 4200  /* KEY=VALUE, VALUE a path of up to PATH_MAX */

/* Why this step has no VM, when it should have said so in its task ("" if none). */
static char no_vm[LINE_MAX_LEN];

static int add_arg(char a[][ARG_MAX_LEN], int n, const char *key, const char *value)
{
	int w = snprintf(a[n], ARG_MAX_LEN, "%s=%s", key, value);

	return w < 0 || w >= ARG_MAX_LEN ? -1 : 0;
}

/* The runtime's exit status when the job already has its VM (another step's):
 * this step runs in it, and makes none and ends none. */
#define JOINS 3

static void begin(spank_t sp)
{
	static char a[11][ARG_MAX_LEN];
	char line[LINE_MAX_LEN], v[ARG_MAX_LEN], num[64];
	char *args[11];
	const char *conf = getenv("SLURM_CONF");
	uint32_t job = 0;
	uint64_t alloc_mb = 0;
	uid_t uid = (uid_t) -1;
	gid_t gid = (gid_t) -1;
	uint16_t ncpus = 0;
	int i, rc, bad = 0;
	struct timespec t0, t1;

	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_NCPUS, &ncpus) != ESPANK_SUCCESS) {
		snprintf(no_vm, sizeof(no_vm), "vmwn: Slurm did not tell vmwn's plugin the job's "
			 "id, user or CPUs, so no virtual machine was made: the site should "
			 "check the plugin against this Slurm's version (vmwn-slurm-install)");
		return;
	}
	if (spank_get_item(sp, S_JOB_ALLOC_MEM, &alloc_mb) != ESPANK_SUCCESS)
		alloc_mb = 0;
	snprintf(num, sizeof(num), "%u", (unsigned) job);
	bad |= add_arg(a, 0, "job_id", num);
	bad |= add_arg(a, 1, "env", env_name);
	snprintf(num, sizeof(num), "%u", (unsigned) uid);
	bad |= add_arg(a, 2, "uid", num);
	snprintf(num, sizeof(num), "%u", (unsigned) gid);
	bad |= add_arg(a, 3, "gid", num);
	snprintf(num, sizeof(num), "%u", (unsigned) ncpus);
	bad |= add_arg(a, 4, "ncpus", num);
	/* --mem as asked (a job's own variable), bounded by what Slurm allocated */
	bad |= add_arg(a, 5, "mem_mb", job_env(sp, "SLURM_MEM_PER_NODE", v, sizeof(v)));
	snprintf(num, sizeof(num), "%llu", (unsigned long long) alloc_mb);
	bad |= add_arg(a, 6, "alloc_mb", num);
	bad |= add_arg(a, 7, "workdir", job_env(sp, "SLURM_SUBMIT_DIR", v, sizeof(v)));
	bad |= add_arg(a, 8, "job_name", job_env(sp, "SLURM_JOB_NAME", v, sizeof(v)));
	/* A batch job may be requeued (scontrol requeue, with slurmd's own config: slurmd
	 * puts its path in SLURM_CONF) when its VM's preparation failed but may pass. */
	bad |= add_arg(a, 9, "batch", step_id(sp) == SLURM_BATCH_SCRIPT ? "1" : "0");
	bad |= add_arg(a, 10, "slurm_conf", conf ? conf : "");
	if (bad) {
		snprintf(no_vm, sizeof(no_vm), "vmwn: the job's submit directory or name is too "
			 "long for vmwn's plugin, so no virtual machine was made: submit from a "
			 "shorter path");
		return;
	}
	for (i = 0; i < 11; i++)
		args[i] = a[i];
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = runtime("begin", args, 11, 60, line, sizeof(line));
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (rc == JOINS) {
		joined = 1;
		return;
	}
	if (rc != 0)
		slurm_error("vmwn: job %u: %s", (unsigned) job, line);
	/* What the VM's preparation held the step for (make bench reads it). */
	slurm_info("vmwn: job %u: begin took %.3f s", (unsigned) job,
		   (double) (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
	began = 1;
}

static int one_task(spank_t sp)
{
	uint32_t n = 0;

	return spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, &n) == ESPANK_SUCCESS && n == 1;
}

static void mark_path(char *buf, size_t size, uint32_t job)
{
	snprintf(buf, size, "%s/%u", marks, (unsigned) job);
}

/*
 * slurmd's job prolog (root): a job that asked for a VM is noted in `marks`.
 * sbatch hands its options to the batch step through the job's environment,
 * which --export=NONE (or a list without ALL) leaves out; the job prolog gets
 * them from the job's own SPANK environment, so the step finds the note and
 * the job never runs on the host.  Never fails: a failing prolog drains the node.
 */
int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	char *value = NULL, path[4200];
	uint32_t job = 0;
	int fd;

	read_args(ac, av);
	if (spank_option_getopt(sp, &vmwn_option, &value) != ESPANK_SUCCESS || value == NULL
	    || opt_vmwn(0, value, 1) != 0
	    || spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	if (mkdir(marks, 0700) < 0 && errno != EEXIST) {
		slurm_error("vmwn: job %u: cannot make %s: %s", (unsigned) job, marks,
			    strerror(errno));
		return 0;
	}
	mark_path(path, sizeof(path), job);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, env_name, strlen(env_name)) < 0)
		slurm_error("vmwn: job %u: cannot note its VM in %s: %s", (unsigned) job, path,
			    strerror(errno));
	if (fd >= 0)
		close(fd);
	return 0;
}

/*
 * The job has ended on this node (root, after its steps).  For a job that asked for
 * a VM, the step's teardown (`end`) once more: it finds nothing to do when it ran
 * to its end, but a proctrack plugin that kills every descendant of the step's
 * slurmstepd as the job ends (proctrack/linuxproc: slurmd terminates the step
 * while slurm_spank_exit runs) may have killed it half-way, leaving the VM to the
 * next job's reap (measured: 8 srun jobs in 10 under Slurm 24.11).  Never fails: a
 * failing epilog drains the node.
 */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	char path[4200], arg[64], line[LINE_MAX_LEN];
	char *args[] = { arg };
	uint32_t job = 0;

	read_args(ac, av);
	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	mark_path(path, sizeof(path), job);
	if (unlink(path) < 0)
		return 0;  /* no note: the job asked for no VM */
	snprintf(arg, sizeof(arg), "job_id=%u", (unsigned) job);
	if (runtime("end", args, 1, 120, line, sizeof(line)) != 0)
		slurm_error("vmwn: job %u: %s", (unsigned) job, line);
	return 0;
}

/* The job prolog's note, when the job's environment did not carry the option. */
static void noted(spank_t sp)
{
	char path[4200], name[NAME_MAX_LEN + 2];
	uint32_t job = 0;
	ssize_t n;
	int fd;

	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return;
	mark_path(path, sizeof(path), job);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return;
	n = read(fd, name, sizeof(name) - 1);
	close(fd);
	if (n <= 0)
		return;
	name[n] = '\0';
	opt_vmwn(0, name, 1);  /* sets env_name and asked when it is a name */
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void) ac;
	(void) av;
	if (!asked && spank_context() == S_CTX_REMOTE)
		noted(sp);
	if (!asked)
		return 0;
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return check_submission();
	case S_CTX_REMOTE:
		if (job_step(sp) && one_task(sp))
			begin(sp);
		return 0;
	default:
		return 0;
	}
}

/* In the task, as the job's user, just before Slurm would exec the job. */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	int argc = 0, i;
	char **argv = NULL, **nargv, **envp = NULL;

	(void) ac;
	(void) av;
	if (!asked || !job_step(sp))
		return 0;
	if (!began && !joined) {  /* no VM for this step: never run the job on the host */
		dprintf(2, "%s\n", no_vm[0] ? no_vm : "vmwn: a VM job runs one task per node: "
			"ask for --ntasks-per-node=1 (the VM gets the CPUs with --cpus-per-task)");
		_exit(1);
	}
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1) {
		dprintf(2, "vmwn: the job has no program to run in its virtual machine: "
			"the site should check vmwn's SPANK plugin\n");
		_exit(2);
	}
	/* The job's environment is slurmstepd's array for its execve, not yet this
	 * process's own. */
	if (spank_get_item(sp, S_JOB_ENV, &envp) != ESPANK_SUCCESS || envp == NULL) {
		dprintf(2, "vmwn: the job has no environment to run in its virtual "
			"machine: the site should check vmwn's SPANK plugin\n");
		_exit(2);
	}
	nargv = calloc((size_t) argc + 3, sizeof(char *));
	if (nargv == NULL)
		_exit(2);
	nargv[0] = starter;
	nargv[1] = joined ? "step" : step_id(sp) == SLURM_BATCH_SCRIPT ? "batch" : "exec";
	for (i = 0; i < argc; i++)
		nargv[i + 2] = argv[i];
	execve(starter, nargv, envp);
	dprintf(2, "vmwn: cannot run vmwn's Slurm job starter %s: %s: the site should "
		"reinstall vmwn (vmwn-slurm-install)\n", starter, strerror(errno));
	_exit(2);
}

/* The task has ended (root, in slurmstepd): the VM leaves the task's accounting
 * cgroup before slurmstepd removes it. */
int slurm_spank_task_exit(spank_t sp, int ac, char **av)
{
	char arg[64], line[LINE_MAX_LEN];
	char *args[] = { arg };
	uint32_t job = 0;

	(void) ac;
	(void) av;
	if (!asked || !began || spank_context() != S_CTX_REMOTE
	    || spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	snprintf(arg, sizeof(arg), "job_id=%u", (unsigned) job);
	if (runtime("release", args, 1, 30, line, sizeof(line)) != 0)
		slurm_error("vmwn: job %u: %s", (unsigned) job, line);
	return 0;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	char arg[64], line[LINE_MAX_LEN];
	char *args[] = { arg };
	uint32_t job = 0;

	(void) ac;
	(void) av;
	if (!asked || !began || spank_context() != S_CTX_REMOTE)
		return 0;
	spank_get_item(sp, S_JOB_ID, &job);
	snprintf(arg, sizeof(arg), "job_id=%u", (unsigned) job);
	if (runtime("end", args, 1, 120, line, sizeof(line)) != 0)
		slurm_error("vmwn: job %u: %s", (unsigned) job, line);
	return 0;
}
