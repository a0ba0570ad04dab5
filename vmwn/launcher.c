/* vmwn's QEMU launcher: QEMU under an anchor pbs_mom can adopt (libvirt's
 * <emulator>, vmwn/emulator.py says why and how it is installed).
 *
 * libvirt runs this in QEMU's place, as the job's user.  It makes three
 * processes, and a guard:
 *   - the launcher (libvirt's pid for the domain): a child subreaper that
 *     passes libvirt's signals on to QEMU and exits as QEMU exits (dying of
 *     QEMU's signal, or with its status);
 *   - the anchor: a session leader that only waits for QEMU, its child; the
 *     job starter has pbs_mom adopt its session into the job, so pbs_mom
 *     counts QEMU and signals the anchor, never QEMU;
 *   - QEMU, in a session of its own, started only once its guard exists;
 *   - the guard: kills QEMU if the launcher is killed (libvirt's last resort,
 *     the OOM killer): libvirt must never lose a running QEMU.
 * A QEMU that ignores libvirt's SIGTERM for KILL_AFTER seconds is killed.
 *
 * The real QEMU is VMWN_QEMU from the domain's environment, else the one
 * compiled in (libvirt probes the emulator without the domain's environment).
 * VMWN_INCOMING names a saved state QEMU loads instead of booting (a warm
 * start, opened here: libvirt's seccomp sandbox forbids QEMU exec:), and
 * VMWN_AUTOSTART=1 lets such a guest run before libvirt's 'cont' (no -S).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef VMWN_QEMU_DEFAULT
#define VMWN_QEMU_DEFAULT "/usr/bin/qemu-system-x86_64"
#endif
#ifndef KILL_AFTER
#define KILL_AFTER 5 /* seconds (vmwn/emulator.py's KILL_AFTER) */
#endif

static const char WHO[] = "vmwn's QEMU launcher";
static const int PASSED_ON[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define NPASSED (sizeof PASSED_ON / sizeof *PASSED_ON)

static int qemu_fd = -1, armed;

static void passed_on_mask(sigset_t *set)
{
    sigemptyset(set);
    for (size_t i = 0; i < NPASSED; i++)
        sigaddset(set, PASSED_ON[i]);
}

static void to_qemu(int signum)
{
    if (qemu_fd >= 0)
        syscall(SYS_pidfd_send_signal, qemu_fd, signum, NULL, 0);
}

static void pass_on(int signum)
{
    int saved = errno;
    to_qemu(signum);
    if (signum == SIGTERM && !armed) { /* libvirt's destroy */
        struct itimerval t = {.it_value = {.tv_sec = KILL_AFTER}};
        armed = 1;
        setitimer(ITIMER_REAL, &t, NULL);
    }
    errno = saved;
}

static void overdue(int signum)
{
    (void)signum;
    to_qemu(SIGKILL);
}

static void end_qemu(int signum)
{
    (void)signum;
    to_qemu(SIGKILL);
    _exit(0);
}

static void leave(int signum)
{
    (void)signum;
    _exit(0);
}

static void handle(int signum, void (*fn)(int))
{
    struct sigaction sa = {.sa_handler = fn};
    sigemptyset(&sa.sa_mask);
    sigaction(signum, &sa, NULL);
}

/* QEMU's arguments: libvirt's, less -S for a restored guest that may run at
 * once, and -incoming fd:N for a warm start. */
static char **qemu_args(const char *qemu, int argc, char **argv)
{
    const char *incoming = getenv("VMWN_INCOMING");
    int autostart = incoming && *incoming && getenv("VMWN_AUTOSTART") &&
                    !strcmp(getenv("VMWN_AUTOSTART"), "1");
    char **args = calloc((size_t)argc + 3, sizeof *args);
    int n = 0;
    if (!args)
        return NULL;
    args[n++] = (char *)qemu;
    for (int i = 1; i < argc; i++)
        if (!(autostart && !strcmp(argv[i], "-S")))
            args[n++] = argv[i];
    if (incoming && *incoming) {
        static char where[32];
        int fd = open(incoming, O_RDONLY);
        if (fd < 0) {
            fprintf(stderr, "vmwn: %s: cannot open the saved guest %s: %s\n", WHO, incoming,
                    strerror(errno));
            return NULL;
        }
        snprintf(where, sizeof where, "fd:%d", fd);
        args[n++] = "-incoming";
        args[n++] = where;
    }
    return args;
}

static void run_qemu(const char *qemu, int argc, char **argv, int go)
{
    char c = 0;
    char **args;
    setsid(); /* out of the anchor's session: pbs_mom's kill stops at the anchor */
    if (read(go, &c, 1) != 1 || c != 'g')
        _exit(127); /* the launcher died before QEMU's guard was there */
    close(go);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGXFSZ, SIG_DFL);
    args = qemu_args(qemu, argc, argv);
    if (args)
        execv(qemu, args);
    if (args)
        fprintf(stderr, "vmwn: %s: cannot run %s: %s\n", WHO, qemu, strerror(errno));
    _exit(127);
}

/* The session pbs_mom adopts: QEMU's parent, which only waits for it. */
static void anchor(const char *qemu, int argc, char **argv, int w, int go)
{
    sigset_t set;
    pid_t pid;
    int st;
    setsid();
    for (size_t i = 0; i < NPASSED; i++) /* pbs_mom's signals end the anchor, nothing else */
        signal(PASSED_ON[i], SIG_DFL);
    passed_on_mask(&set);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    pid = fork();
    if (pid < 0) {
        fprintf(stderr, "vmwn: %s: cannot start %s: %s\n", WHO, qemu, strerror(errno));
        _exit(127);
    }
    if (pid == 0) {
        close(w);
        run_qemu(qemu, argc, argv, go);
    }
    close(go);
    dprintf(w, "%d", (int)pid);
    close(w);
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            _exit(127);
    _exit(WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st));
}

/* A pidfd for QEMU while it is still the anchor's child (so not a reused pid), or -1. */
static int pidfd_of_child(pid_t pid, pid_t parent)
{
    char path[64], buf[512], *p;
    int fd, sfd;
    ssize_t n;
    long ppid;
    if (pid <= 0)
        return -1;
    fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    sfd = open(path, O_RDONLY | O_CLOEXEC);
    n = sfd >= 0 ? read(sfd, buf, sizeof buf - 1) : -1;
    if (sfd >= 0)
        close(sfd);
    if (n <= 0) {
        close(fd);
        return -1;
    }
    buf[n] = 0;
    p = strrchr(buf, ')');
    if (!p || sscanf(p + 1, " %*c %ld", &ppid) != 1 || ppid != parent) {
        close(fd);
        return -1;
    }
    return fd;
}

static pid_t spawn_guard(void)
{
    pid_t launcher = getpid(), pid = fork();
    sigset_t set;
    if (pid != 0)
        return pid > 0 ? pid : 0;
    /* libvirt's descriptors are QEMU's, not the guard's */
    if (qemu_fd > 3)
        syscall(SYS_close_range, 3U, (unsigned)qemu_fd - 1, 0U);
    syscall(SYS_close_range, (unsigned)qemu_fd + 1, ~0U, 0U);
    handle(SIGUSR1, end_qemu);
    handle(SIGTERM, leave);
    passed_on_mask(&set);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    prctl(PR_SET_PDEATHSIG, SIGUSR1);
    if (getppid() != launcher)
        end_qemu(0);
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    const char *qemu = getenv("VMWN_QEMU");
    int r[2], go[2], st = 0, have_status = 0, guard_reaped = 0;
    char buf[32] = "";
    pid_t a, qemu_pid, guard = 0;
    sigset_t set;
    if (!qemu || !*qemu)
        qemu = VMWN_QEMU_DEFAULT;
    /* Until the launcher can pass signals on, they wait: a SIGTERM from libvirt
     * right at start must end QEMU, not orphan it.  Children unblock them. */
    passed_on_mask(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
    prctl(PR_SET_CHILD_SUBREAPER, 1); /* QEMU comes back here if the anchor dies */
    if (pipe2(r, O_CLOEXEC) < 0 || pipe2(go, O_CLOEXEC) < 0) {
        fprintf(stderr, "vmwn: %s: pipe: %s\n", WHO, strerror(errno));
        return 1;
    }
    a = fork();
    if (a < 0) {
        fprintf(stderr, "vmwn: %s: fork: %s\n", WHO, strerror(errno));
        return 1;
    }
    if (a == 0) {
        close(r[0]);
        close(go[1]);
        anchor(qemu, argc, argv, r[1], go[0]);
    }
    close(r[1]);
    close(go[0]);
    if (read(r[0], buf, sizeof buf - 1) < 0)
        buf[0] = 0;
    close(r[0]);
    qemu_pid = (pid_t)atoi(buf);
    qemu_fd = pidfd_of_child(qemu_pid, a);
#ifdef VMWN_TEST_DIE_BEFORE_GUARD
    /* A test build (tests/test_emulator.py): SIGKILLed after QEMU's fork, before its
     * guard exists, the window libvirt's last resort can hit; QEMU must never run. */
    {
        FILE *f = fopen(VMWN_TEST_DIE_BEFORE_GUARD, "w");
        if (f) {
            fprintf(f, "%d", (int)qemu_pid);
            fclose(f);
        }
        kill(getpid(), SIGKILL);
    }
#endif
    if (qemu_fd >= 0)
        guard = spawn_guard();
    /* a launcher killed before this leaves QEMU's pipe at EOF: no QEMU; a QEMU child
     * already gone (the anchor's fork failed) is the anchor's status, not SIGPIPE */
    signal(SIGPIPE, SIG_IGN);
    if (write(go[1], "g", 1) != 1) {
    }
    close(go[1]);
    for (size_t i = 0; i < NPASSED; i++)
        handle(PASSED_ON[i], pass_on);
    handle(SIGALRM, overdue);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    for (;;) {
        int s;
        pid_t pid = wait(&s);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            break; /* no child left */
        }
        if (pid == guard)
            guard_reaped = 1;
        if (pid == a && (WIFEXITED(s) || qemu_pid == 0)) {
            st = s, have_status = 1; /* QEMU's own status, passed on by the anchor */
            break;
        }
        if (pid == qemu_pid && pid != a) { /* pbs_mom ended the anchor: QEMU was ours */
            st = s, have_status = 1;
            break;
        }
    }
    if (guard && !guard_reaped)
        kill(guard, SIGTERM); /* QEMU has ended: the guard may go */
    if (!have_status)
        return 1;
    if (WIFSIGNALED(st)) { /* die the way QEMU died */
        sigset_t one;
        signal(WTERMSIG(st), SIG_DFL);
        sigemptyset(&one);
        sigaddset(&one, WTERMSIG(st));
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        kill(getpid(), WTERMSIG(st));
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
