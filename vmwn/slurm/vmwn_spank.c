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
 *   slurmstepd exit, that step   `end` (root): stop the warden, copy back, destroy.
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
static char env_name[NAME_MAX_LEN + 1];
static int asked;
static int began;

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

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	int i;

	for (i = 0; i < ac; i++) {
		set_arg(python, sizeof(python), av[i], "python");
		set_arg(config, sizeof(config), av[i], "config");
		set_arg(starter, sizeof(starter), av[i], "starter");
	}
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
	time_t end = time(NULL) + timeout;

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
		int devnull = open("/dev/null", O_RDWR);

		setsid();
		if (devnull >= 0)
			dup2(devnull, 0);
		dup2(fds[1], 1);
		dup2(fds[1], 2);
		if (chdir("/") < 0)
			_exit(126);
		execve(python, argv, envp);
		dprintf(1, "vmwn: cannot run %s: %s: reinstall vmwn on this node\n", python,
			strerror(errno));
		_exit(127);
	}
	close(fds[1]);
	for (;;) {
		struct pollfd p = { fds[0], POLLIN, 0 };
		int left = (int) (end - time(NULL));
		ssize_t r;

		if (left <= 0 || poll(&p, 1, left * 1000) == 0) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			snprintf(line, size, "vmwn: %s did not finish within %d s: the site should "
				 "look at the node's syslog", action, timeout);
			while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
				;
			close(fds[0]);
			return -1;
		}
		if (used == sizeof(buf) - 1)  /* keep the tail: the last line counts */
			used = 0;
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

static const char *job_env(spank_t sp, const char *name, char *buf, int size)
{
	if (spank_getenv(sp, name, buf, size) != ESPANK_SUCCESS)
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

static void begin(spank_t sp)
{
	char a[8][LINE_MAX_LEN], line[LINE_MAX_LEN], v[LINE_MAX_LEN];
	char *args[8];
	uint32_t job = 0;
	uid_t uid = 0;
	gid_t gid = 0;
	uint16_t ncpus = 0;
	int i;

	spank_get_item(sp, S_JOB_ID, &job);
	spank_get_item(sp, S_JOB_UID, &uid);
	spank_get_item(sp, S_JOB_GID, &gid);
	spank_get_item(sp, S_JOB_NCPUS, &ncpus);
	snprintf(a[0], sizeof(a[0]), "job_id=%u", (unsigned) job);
	snprintf(a[1], sizeof(a[1]), "env=%s", env_name);
	snprintf(a[2], sizeof(a[2]), "uid=%u", (unsigned) uid);
	snprintf(a[3], sizeof(a[3]), "gid=%u", (unsigned) gid);
	snprintf(a[4], sizeof(a[4]), "ncpus=%u", (unsigned) ncpus);
	snprintf(a[5], sizeof(a[5]), "mem_mb=%s", job_env(sp, "SLURM_MEM_PER_NODE", v, sizeof(v)));
	snprintf(a[6], sizeof(a[6]), "workdir=%s", job_env(sp, "SLURM_SUBMIT_DIR", v, sizeof(v)));
	snprintf(a[7], sizeof(a[7]), "job_name=%s", job_env(sp, "SLURM_JOB_NAME", v, sizeof(v)));
	struct timespec t0, t1;

	for (i = 0; i < 8; i++)
		args[i] = a[i];
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (runtime("begin", args, 8, 60, line, sizeof(line)) != 0)
		slurm_error("vmwn: job %u: %s", (unsigned) job, line);
	clock_gettime(CLOCK_MONOTONIC, &t1);
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

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void) ac;
	(void) av;
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
	if (!began) {  /* the step has more than one task here: no VM was made */
		dprintf(2, "vmwn: a VM job runs one task per node: ask for --ntasks-per-node=1 "
			"(the VM gets the CPUs with --cpus-per-task)\n");
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
	nargv[1] = step_id(sp) == SLURM_BATCH_SCRIPT ? "batch" : "exec";
	for (i = 0; i < argc; i++)
		nargv[i + 2] = argv[i];
	execve(starter, nargv, envp);
	dprintf(2, "vmwn: cannot run vmwn's Slurm job starter %s: %s: the site should "
		"reinstall vmwn (vmwn-slurm-install)\n", starter, strerror(errno));
	_exit(2);
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
