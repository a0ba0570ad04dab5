/* vmwn-keeper: the job's warden once its guest runs (vmwn/keeper.py).
 *
 * The Python warden (vmwn/warden.py) boots the guest and serves the job
 * starter's setup: the answer, the VM's cgroups, the connection to the
 * guest's forward.  When the starter says "running", the warden execs this
 * program in its place (same pid, same start time, so the epilogue's stop
 * finds it), handing over its listening socket, its connections and its
 * answer.  For the rest of the job, this serves what is left:
 *
 *   connect   a socket connected to the guest's forward, passed back (SCM_RIGHTS)
 *   task      a further task's starter: its end does not end the job
 *   suspend   pause the domain (virsh suspend), the batch system's suspend
 *   resume    resume it
 *   cgroups   refused ("0"): the job's own starter asked at its start, once
 *
 * A connection is answered only for the job's user or root (SO_PEERCRED).
 * It ends when the job's own starter's connection closes, when no starter
 * is connected for --idle seconds, when the job's state directory is gone,
 * or at SIGTERM (the epilogue).  Every log line names the job.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#define MAXCONN 64
#define LINE_MAX_BYTES 256
#define CONNECT_TIMEOUT_MS 10000
#define VIRSH_TIMEOUT_MS 60000
#define CHECK_EVERY_MS 30000

struct conn {
    int fd;
    pid_t pid;
    int task;
    size_t len;
    char buf[LINE_MAX_BYTES];
};

static const char *job = "?", *domain, *uri, *virsh, *fwd_addr, *fwd_port, *job_dir;
static uid_t owner = (uid_t)-1;
static char *answer;
static size_t answer_len;
static int log_fd = -1, use_syslog;
static long idle_limit = 300;
static struct conn conns[MAXCONN];
static int nconns, primary = -1; /* primary: index in conns of the job's own starter */

static void say(int prio, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (use_syslog && prio <= LOG_INFO)
        syslog(prio, "job %s: %s", job, msg);
    if (log_fd >= 0) {
        struct timeval tv;
        struct tm tm;
        char when[32];
        gettimeofday(&tv, NULL);
        localtime_r(&tv.tv_sec, &tm);
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
        dprintf(log_fd, "%s,%03ld vmwn.keeper[%d] %s job %s: %s\n", when,
                (long)(tv.tv_usec / 1000), (int)getpid(),
                prio <= LOG_ERR ? "ERROR" : prio <= LOG_WARNING ? "WARNING" : "INFO", job, msg);
    }
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static int send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int add_conn(int fd, int task)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (nconns == MAXCONN) {
        say(LOG_WARNING, "too many connections; refused one");
        close(fd);
        return -1;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        close(fd);
        return -1;
    }
    if (cred.uid != owner && cred.uid != 0) {
        say(LOG_WARNING, "refused a connection from uid %d (pid %d)", (int)cred.uid,
            (int)cred.pid);
        close(fd);
        return -1;
    }
    conns[nconns] = (struct conn){.fd = fd, .pid = cred.pid, .task = task};
    return nconns++;
}

static void drop_conn(int i)
{
    close(conns[i].fd);
    conns[i] = conns[--nconns];
    if (primary == i)
        primary = -1;
    else if (primary == nconns)
        primary = i;
}

static int wait_connected(int s)
{
    struct pollfd p = {.fd = s, .events = POLLOUT};
    int err = 0;
    socklen_t len = sizeof err;
    int r;
    do
        r = poll(&p, 1, CONNECT_TIMEOUT_MS);
    while (r < 0 && errno == EINTR);
    if (r == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    if (r < 0 || getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

/* A socket connected to the guest's forward (this process is in libvirt's
 * network namespace, where the forward listens), or -1. */
static int open_forward(void)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST |
                                                                      AI_NUMERICSERV};
    struct addrinfo *ai;
    int s, one = 1, r = getaddrinfo(fwd_addr, fwd_port, &hints, &ai);
    if (r) {
        say(LOG_WARNING, "cannot connect to the guest's forward %s:%s: %s", fwd_addr, fwd_port,
            gai_strerror(r));
        return -1;
    }
    s = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s >= 0 && connect(s, ai->ai_addr, ai->ai_addrlen) < 0 &&
        (errno != EINPROGRESS || wait_connected(s) < 0)) {
        say(LOG_WARNING, "cannot connect to the guest's forward %s:%s for the starter: %s",
            fwd_addr, fwd_port, strerror(errno));
        close(s);
        s = -1;
    }
    freeaddrinfo(ai);
    if (s >= 0) {
        fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return s;
}

static void answer_connect(int fd)
{
    int s = open_forward();
    char one = s >= 0 ? '1' : '0';
    struct iovec iov = {.iov_base = &one, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (s >= 0) {
        struct cmsghdr *c;
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &s, sizeof(int));
    }
    if (sendmsg(fd, &msg, MSG_NOSIGNAL) < 0 && s >= 0)
        say(LOG_WARNING, "cannot pass the guest connection to the starter: %s", strerror(errno));
    if (s >= 0)
        close(s);
}

/* virsh suspend|resume DOMAIN, waited for at most VIRSH_TIMEOUT_MS. */
static void set_paused(int pause)
{
    const char *verb = pause ? "suspend" : "resume";
    pid_t pid;
    int status = 0, pfd, r;
    /* Every request runs virsh: libvirt's state decides, not a cache that a killed
     * virsh or an operator's own virsh would make wrong.  A batch daemon's repeated
     * suspend is a second, harmless pause; a repeated resume fails, logged. */
    pid = fork();
    if (pid < 0) {
        say(LOG_WARNING, "cannot %s domain %s: fork: %s", verb, domain, strerror(errno));
        return;
    }
    if (pid == 0) {
        int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
        char *argv[] = {(char *)virsh, "-q", "-c", (char *)uri, (char *)verb, (char *)domain,
                        NULL};
        char *envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", NULL};
        dup2(nul, 0);
        dup2(nul, 1);
        dup2(nul, 2);
        execve(virsh, argv, envp);
        _exit(127);
    }
    pfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pfd >= 0) {
        struct pollfd p = {.fd = pfd, .events = POLLIN};
        do
            r = poll(&p, 1, VIRSH_TIMEOUT_MS);
        while (r < 0 && errno == EINTR);
        if (r == 0)
            kill(pid, SIGKILL);
        close(pfd);
    }
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        say(LOG_INFO, "domain %s %s", domain, pause ? "paused" : "resumed");
    } else {
        say(LOG_WARNING, "cannot %s domain %s: virsh %s", verb, domain,
            WIFEXITED(status) ? "failed" : "was killed");
    }
}

static void command(int i, const char *word)
{
    if (!strcmp(word, "connect")) {
        answer_connect(conns[i].fd);
    } else if (!strcmp(word, "task")) {
        conns[i].task = 1;
        if (primary == i) { /* the next starter that is not a task takes its place */
            int j;
            primary = -1;
            for (j = 0; j < nconns; j++)
                if (!conns[j].task) {
                    primary = j;
                    break;
                }
        }
    } else if (!strcmp(word, "cgroups")) {
        say(LOG_WARNING, "refused to move the VM's cgroups for pid %d", (int)conns[i].pid);
        send_all(conns[i].fd, "0", 1);
    } else if (!strcmp(word, "suspend") || !strcmp(word, "resume")) {
        set_paused(word[0] == 's');
    } /* "running" and anything else: nothing to do */
}

/* Read what connection i sent; 0 when it closed. */
static int read_conn(int i)
{
    struct conn *c = &conns[i];
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, 0);
    char *line, *nl;
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 1;
    if (n <= 0)
        return 0;
    c->len += (size_t)n;
    c->buf[c->len] = 0;
    line = c->buf;
    while ((nl = strchr(line, '\n'))) {
        char *end = nl;
        *nl = 0;
        while (end > line && (end[-1] == '\r' || end[-1] == ' '))
            *--end = 0;
        while (*line == ' ')
            line++;
        command(i, line);
        line = nl + 1;
    }
    c->len = strlen(line);
    memmove(c->buf, line, c->len);
    if (c->len == sizeof c->buf - 1)
        c->len = 0; /* an overlong line is dropped */
    return 1;
}

static void accept_one(int listener)
{
    int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    int i;
    if (fd < 0)
        return;
    i = add_conn(fd, 0);
    if (i >= 0 && send_all(fd, answer, answer_len) < 0)
        drop_conn(i);
}

static int job_dir_exists(void)
{
    struct stat sb;
    return !job_dir || stat(job_dir, &sb) == 0;
}

static void read_answer(int fd)
{
    size_t cap = 4096;
    ssize_t n;
    answer = malloc(cap);
    while (answer && (n = read(fd, answer + answer_len, cap - answer_len)) > 0) {
        answer_len += (size_t)n;
        if (answer_len == cap)
            answer = realloc(answer, cap *= 2);
    }
    close(fd);
}

static int usage(void)
{
    fprintf(stderr, "usage: vmwn-keeper --job ID --owner UID --domain NAME --uri URI "
                    "--virsh PATH --forward ADDR --port N --listen FD --answer FD "
                    "[--primary FD] [--conn FD]... [--job-dir DIR] [--idle S] [--syslog] "
                    "[--log-fd FD]\n");
    return 2;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"job", 1, 0, 'j'},    {"owner", 1, 0, 'o'},   {"domain", 1, 0, 'd'},
        {"uri", 1, 0, 'u'},    {"virsh", 1, 0, 'v'},   {"forward", 1, 0, 'f'},
        {"port", 1, 0, 'p'},   {"listen", 1, 0, 'l'},  {"answer", 1, 0, 'a'},
        {"primary", 1, 0, 'P'}, {"conn", 1, 0, 'c'},   {"job-dir", 1, 0, 'D'},
        {"idle", 1, 0, 'i'},   {"syslog", 0, 0, 's'},  {"log-fd", 1, 0, 'L'},
        {0, 0, 0, 0}};
    int listener = -1, answer_fd = -1, opt, handed[MAXCONN], nhanded = 0, primary_fd = -1, i;
    long idle_since;
    sigset_t none;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'j': job = optarg; break;
        case 'o': owner = (uid_t)strtoul(optarg, NULL, 10); break;
        case 'd': domain = optarg; break;
        case 'u': uri = optarg; break;
        case 'v': virsh = optarg; break;
        case 'f': fwd_addr = optarg; break;
        case 'p': fwd_port = optarg; break;
        case 'l': listener = atoi(optarg); break;
        case 'a': answer_fd = atoi(optarg); break;
        case 'P': primary_fd = atoi(optarg); break;
        case 'c':
            if (nhanded < MAXCONN)
                handed[nhanded++] = atoi(optarg);
            break;
        case 'D': job_dir = optarg; break;
        case 'i': idle_limit = strtol(optarg, NULL, 10); break;
        case 's': use_syslog = 1; break;
        case 'L': log_fd = atoi(optarg); break;
        default: return usage();
        }
    }
    if (!domain || !uri || !virsh || !fwd_addr || !fwd_port || listener < 0 || answer_fd < 0 ||
        owner == (uid_t)-1)
        return usage();
    /* The warden blocked SIGTERM across the exec: one sent meanwhile ends us now. */
    signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (use_syslog)
        openlog("vmwn", LOG_PID, LOG_DAEMON);
    read_answer(answer_fd);
    if (!answer) {
        say(LOG_ERR, "out of memory");
        return 1;
    }
    fcntl(listener, F_SETFD, FD_CLOEXEC);
    if (log_fd >= 0)
        fcntl(log_fd, F_SETFD, FD_CLOEXEC);
    if (primary_fd >= 0) {
        fcntl(primary_fd, F_SETFD, FD_CLOEXEC);
        primary = add_conn(primary_fd, 0);
    }
    for (i = 0; i < nhanded; i++) {
        fcntl(handed[i], F_SETFD, FD_CLOEXEC);
        add_conn(handed[i], 1);
    }
    say(LOG_INFO, "keeper serves the running guest (domain %s, %d connection%s)", domain,
        nconns, nconns == 1 ? "" : "s");
    idle_since = now_ms();
    for (;;) {
        struct pollfd p[MAXCONN + 1];
        int n, wait_ms, had_primary = primary >= 0;
        p[0] = (struct pollfd){.fd = listener, .events = POLLIN};
        for (i = 0; i < nconns; i++)
            p[i + 1] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
        wait_ms = CHECK_EVERY_MS;
        if (!nconns && idle_since + idle_limit * 1000L - now_ms() < wait_ms)
            wait_ms = (int)(idle_since + idle_limit * 1000L - now_ms()) + 1;
        n = poll(p, (nfds_t)nconns + 1, wait_ms < 0 ? 0 : wait_ms);
        if (n < 0 && errno != EINTR) {
            say(LOG_ERR, "poll: %s", strerror(errno));
            return 1;
        }
        /* connections first, from the last (drop_conn moves the last into a hole) */
        for (i = nconns - 1; n > 0 && i >= 0; i--) {
            if (!p[i + 1].revents)
                continue;
            if (!read_conn(i)) {
                int was_primary = i == primary;
                drop_conn(i);
                if (was_primary && had_primary) {
                    say(LOG_INFO, "job starter gone: the job ended");
                    return 0;
                }
            }
        }
        if (n > 0 && p[0].revents)
            accept_one(listener);
        if (nconns)
            idle_since = now_ms();
        else if (now_ms() - idle_since >= idle_limit * 1000L) {
            say(LOG_WARNING, "no job starter came for %ld s; keeper ends", idle_limit);
            return 0;
        }
        if (!job_dir_exists())
            return 0;
    }
}
