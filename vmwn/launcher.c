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
 *
 * Warm starts (vmwn/warm.py) keep the guest's memory in a file of its own,
 * which QEMU's migration then leaves out of the saved state (x-ignore-shared):
 *   - VMWN_RAM_FILE=PATH (the guest being prepared): the machine's memory
 *     backend becomes that file, shared;
 *   - VMWN_RAM_FROM=PATH (a job's restored guest): the machine's memory is a
 *     memfd of the job's own, holding a copy of that file's data (its holes,
 *     the guest's zeroed free memory, stay holes), made here as the job's
 *     user and so counted in the job's memory.  Shared, so a virtiofsd can
 *     map it as it maps a booted guest's;
 *   - VMWN_RAM_MAP=PATH (a restored guest without virtio-fs, on a QEMU whose
 *     file backend has 'rom', 8.2 and later): the machine's memory is that
 *     file itself, opened read-only and mapped private, so every guest
 *     restored from it shares its pages until it writes them, and none can
 *     change it.
 * libvirt's memory backend argument (-machine memory-backend=ID, -object
 * {"qom-type":...,"id":ID,...}) keeps its other members.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif
#include <sys/prctl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
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

/* The end of the JSON value starting at p (a string, number, literal, array or
 * object), or NULL if it is malformed. */
static const char *json_skip(const char *p)
{
    int depth = 0;
    do {
        if (*p == '"') {
            for (p++; *p && *p != '"'; p++)
                if (*p == '\\' && !*++p)
                    return NULL;
            if (!*p++)
                return NULL;
        } else if (*p == '[' || *p == '{') {
            depth++, p++;
        } else if (*p == ']' || *p == '}') {
            if (--depth < 0)
                return NULL;
            p++;
        } else if (*p == ',' || *p == ':') {
            if (!depth)
                return NULL;
            p++;
        } else if (*p) {
            while (*p && !strchr(",:[]{}\"", *p))
                p++;
        } else {
            return NULL;
        }
    } while (depth > 0);
    return p;
}

/* libvirt's memory backend object (compact JSON, as libvirt writes it: no space
 * between members) made a file backend on PATH (no '"', '\\' or control character
 * in it), shared or mapped private read-only; NULL if it is not one libvirt wrote. */
static char *file_backend(const char *obj, const char *path, int shared)
{
    static const char *const dropped[] = {"\"qom-type\"", "\"mem-path\"", "\"share\"",
                                          "\"x-use-canonical-path-for-ramblock-id\"",
                                          "\"readonly\"", "\"rom\""};
    size_t len = strlen(obj) + strlen(path) + 160;
    char *out = malloc(len), *o;
    const char *p = obj + 1;
    if (!out || obj[0] != '{')
        return free(out), NULL;
    /* The block keeps the name libvirt's memfd backend gives it (not its QOM path),
     * prepared and restored alike. */
    o = out + snprintf(out, len, "{\"qom-type\":\"memory-backend-file\",\"mem-path\":\"%s\","
                       "%s,\"x-use-canonical-path-for-ramblock-id\":false", path,
                       shared ? "\"share\":true"
                              : "\"share\":false,\"readonly\":true,\"rom\":\"off\"");
    while (*p != '}') {
        const char *key = p, *colon = json_skip(p), *end;
        int keep = 1;
        if (!colon || *colon != ':' || !(end = json_skip(colon + 1)))
            return free(out), NULL;
        for (size_t i = 0; i < sizeof dropped / sizeof *dropped; i++)
            if ((size_t)(colon - key) == strlen(dropped[i]) &&
                !strncmp(key, dropped[i], (size_t)(colon - key)))
                keep = 0;
        if (keep)
            o += sprintf(o, ",%.*s", (int)(end - key), key);
        if (*end == ',')
            end++;
        else if (*end != '}')
            return free(out), NULL;
        p = end;
    }
    strcpy(o, "}");
    return out;
}

/* A memfd holding a copy of FROM's data, as /proc/self/fd/N (QEMU opens it by
 * that name), or NULL having said why. */
static char *ram_copy(const char *from)
{
    static char path[40];
    struct stat st;
    off_t off = 0;
    int in = open(from, O_RDONLY | O_CLOEXEC), m;
    if (in < 0 || fstat(in, &st) < 0) {
        fprintf(stderr, "vmwn: %s: cannot read the prepared guest's memory %s: %s\n", WHO,
                from, strerror(errno));
        return NULL;
    }
    /* not close-on-exec: QEMU's; never executable (vm.memfd_noexec=2 demands it) */
    m = memfd_create("vmwn-guest-ram", MFD_NOEXEC_SEAL);
    if (m < 0 && errno == EINVAL) /* Linux before 6.3 */
        m = memfd_create("vmwn-guest-ram", 0);
    if (m < 0 || ftruncate(m, st.st_size) < 0) {
        fprintf(stderr, "vmwn: %s: cannot make the guest's memory: %s\n", WHO,
                strerror(errno));
        return NULL;
    }
    for (;;) {
        off_t data = lseek(in, off, SEEK_DATA), hole;
        if (data < 0 && errno == ENXIO)
            break;
        hole = data < 0 ? -1 : lseek(in, data, SEEK_HOLE);
        if (hole < 0 || lseek(m, data, SEEK_SET) < 0)
            goto failed;
        for (off = data; off < hole;) {
            ssize_t n = sendfile(m, in, &off, (size_t)(hole - off));
            if (n <= 0 && !(n < 0 && errno == EINTR)) {
                if (n == 0)
                    errno = EIO;
                goto failed;
            }
        }
    }
    close(in);
    if (lseek(m, 0, SEEK_SET) < 0)
        goto failed;
    snprintf(path, sizeof path, "/proc/self/fd/%d", m);
    return path;
failed:
    fprintf(stderr, "vmwn: %s: cannot copy the prepared guest's memory %s: %s\n", WHO, from,
            strerror(errno));
    return NULL;
}

/* QEMU's arguments: libvirt's, with the memory backend a file for a warm start. */
static char **qemu_args(const char *qemu, int argc, char **argv)
{
    const char *file = getenv("VMWN_RAM_FILE"), *from = getenv("VMWN_RAM_FROM"), *path,
               *map = getenv("VMWN_RAM_MAP");
    char **args = calloc((size_t)argc + 1, sizeof *args);
    char id[80] = "";
    int obj = -1;
    if (!args)
        return NULL;
    args[0] = (char *)qemu;
    for (int i = 1; i < argc; i++)
        args[i] = argv[i];
    file = file && *file ? file : NULL;
    from = from && *from ? from : NULL;
    map = map && *map ? map : NULL;
    if (!file && !from && !map)
        return args;
    for (int i = 2; i < argc; i++) {
        const char *mb = strstr(argv[i], "memory-backend=");
        int len = mb ? (int)strcspn(mb + 15, ",") : 0;
        if (!strcmp(argv[i - 1], "-machine") && mb &&
            snprintf(id, sizeof id, "\"id\":\"%.*s\"", len, mb + 15) >= (int)sizeof id)
            id[0] = 0; /* no id of libvirt's is that long: none found */
    }
    for (int i = 2; *id && i < argc; i++)
        if (!strcmp(argv[i - 1], "-object") && argv[i][0] == '{' && strstr(argv[i], id))
            obj = i;
    if (obj < 0) {
        fprintf(stderr, "vmwn: %s: no memory backend of libvirt's to give the guest its "
                "memory file (-machine memory-backend=ID, -object {...})\n", WHO);
        return NULL;
    }
    for (const char *c = map ? map : file ? file : ""; *c; c++)
        if (*c == '"' || *c == '\\' || (unsigned char)*c < ' ') {
            fprintf(stderr, "vmwn: %s: the memory file's path %s cannot go into QEMU's "
                    "arguments\n", WHO, map ? map : file);
            return NULL;
        }
    path = from ? ram_copy(from) : map ? map : file;
    if (!path)
        return NULL;
    if (!(args[obj] = file_backend(argv[obj], path, !map))) {
        fprintf(stderr, "vmwn: %s: cannot read libvirt's memory backend %s\n", WHO, argv[obj]);
        return NULL;
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

/* Close descriptors lo..hi: close_range (Linux 5.9), else one by one. */
static void close_from(int lo, int hi)
{
    long max;
    if (syscall(SYS_close_range, (unsigned)lo, (unsigned)hi, 0U) == 0)
        return;
    max = sysconf(_SC_OPEN_MAX);
    if (max < 0)
        max = 65536;
    for (long fd = lo; fd <= hi && fd < max; fd++)
        close((int)fd);
}

static pid_t spawn_guard(void)
{
    pid_t launcher = getpid(), pid = fork();
    sigset_t set;
    if (pid != 0)
        return pid > 0 ? pid : 0;
    /* libvirt's descriptors are QEMU's, not the guard's */
    if (qemu_fd > 3)
        close_from(3, qemu_fd - 1);
    close_from(qemu_fd + 1, INT_MAX);
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
