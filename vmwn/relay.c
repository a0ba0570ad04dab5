/* vmwn-relay: a job's SSH session to its guest, in C (libssh), for the job
 * starter (vmwn/relay.py, vmwn/jobrun.py).
 *
 * paramiko resident in the starter for the job's life would cost the node
 * ~27 MiB per job, and a second login per job costs the guest a handshake.
 * So the starter (Python, without paramiko) starts this at once: it logs in
 * over the socket it is given (--fd), the guest's host key pinned and the
 * job's key, says "ready" on its control socket (--control, SOCK_SEQPACKET),
 * and then runs what the starter asks, one message at a time:
 *
 *   "run\n" CMD, with three descriptors   CMD in the guest, its stdin read from
 *        the first to its end, its stdout and stderr written to the others;
 *        answered "status N" (-1: no exit status);
 *   "job STDIN PTY COLS ROWS TERM SLEN\n" SIGNALLER CMD   the job itself, with
 *        fds 0-2 (fd 0 to the job until its end of file when STDIN is 1; a pty
 *        of TERM when PTY is 1), answered "exit N" or "signal NAME" when it
 *        ends; then the relay ends.
 *
 * While the job runs it
 *   - forwards TERM INT HUP QUIT USR1 USR2 to the guest job's process group
 *     through the signaller channel (SIGNALLER: a guest shell reading one
 *     name a line), once per burst (--repeat-window);
 *   - relays TSTP and CONT to the job's warden as suspend and resume
 *     (--warden FD), and a window change to the pty;
 *   - asks the signaller PING every --probe-every seconds and gives the guest
 *     up when no PONG came for --lost-after seconds.
 * The signals it forwards arrive blocked (the starter blocks them before it
 * starts this), so none that comes before the job starts is lost.
 *
 * What it could not do is answered instead, and it ends: "lost WHY" (the
 * guest or the connection went away), "retry WHY" (the login's connection
 * was dropped: sshd settling), "site WHY" (a wrong host key, an unreadable
 * key).  Exit status 2 is a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <libssh/callbacks.h>
#include <libssh/libssh.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static const char *FORWARDED[] = {"TERM", "INT", "HUP", "QUIT", "USR1", "USR2", NULL};
static const int FORWARDED_NUM[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define NFORWARDED 6
#define MSG_MAX (256 * 1024)

static int sigpipe_fds[2] = {-1, -1};
static int control_fd = -1, warden_fd = -1, sock_fd = -1;
static const char *user, *host_key, *key_path;
static double lost_after = 120, probe_every = 30, linger = 2, repeat_window = 0.5;

/* The channel being relayed: where its output goes, and what it did (set by
 * libssh's channel callbacks). */
static ssh_channel current; /* callbacks of channels that ended (freed, their close
                              still to come) must not count for this one */
static int out_fd[2] = {1, 2}, out_ok[2];
static int exit_status, eof_seen, closed_seen;
static char exit_signal[32];
static double ended_at;
/* The job's signals and probes. */
static double probe_sent, last_sent[NFORWARDED];
static char pong_buf[64];
static size_t pong_len;
static const char *signaller_cmd;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One answer on the control socket; a starter gone ends the relay. */
static void reply(const char *kind, const char *fmt, ...)
{
    char why[600], line[700];
    va_list ap;
    int n;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    for (char *p = why; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    n = snprintf(line, sizeof line, "%s %s\n", kind, why);
    if (n > (int)sizeof line - 1)
        n = (int)sizeof line - 1;
    if (send(control_fd, line, (size_t)n, MSG_NOSIGNAL) < 0)
        _exit(1);
}

static void on_signal(int signum)
{
    int saved = errno;
    unsigned char c = (unsigned char)signum;
    if (write(sigpipe_fds[1], &c, 1) < 0) { /* full: that signal is pending already */
    }
    errno = saved;
}

/* Write all of data to output i (0 stdout, 1 stderr); an output that fails is
 * dropped, the command goes on. */
static void out(int i, const char *data, size_t len)
{
    while (len && out_ok[i]) {
        ssize_t w = write(out_fd[i], data, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                struct pollfd p = {.fd = out_fd[i], .events = POLLOUT};
                poll(&p, 1, 1000);
                continue;
            }
            out_ok[i] = 0;
            return;
        }
        data += w;
        len -= (size_t)w;
    }
}

static int on_data(ssh_session s, ssh_channel c, void *data, uint32_t len, int is_stderr,
                   void *u)
{
    (void)s, (void)u;
    if (c == current)
        out(is_stderr ? 1 : 0, data, len);
    return (int)len;
}

static void on_eof(ssh_session s, ssh_channel c, void *u)
{
    (void)s, (void)u;
    if (c == current)
        eof_seen = 1;
}

static void on_close(ssh_session s, ssh_channel c, void *u)
{
    (void)s, (void)u;
    if (c == current)
        closed_seen = 1;
}

static void on_exit_status(ssh_session s, ssh_channel c, int status, void *u)
{
    (void)s, (void)u;
    if (c != current)
        return;
    exit_status = status;
    if (!ended_at)
        ended_at = now();
}

static void on_exit_signal(ssh_session s, ssh_channel c, const char *sig, int core,
                           const char *msg, const char *lang, void *u)
{
    (void)s, (void)core, (void)msg, (void)lang, (void)u;
    if (c != current)
        return;
    snprintf(exit_signal, sizeof exit_signal, "%s", sig && *sig ? sig : "KILL");
    if (!ended_at)
        ended_at = now();
}

/* The signaller's output: PONG lines answer our PINGs. */
static int on_signaller_data(ssh_session s, ssh_channel c, void *data, uint32_t len,
                             int is_stderr, void *u)
{
    (void)s, (void)c, (void)u;
    if (is_stderr)
        return (int)len;
    for (uint32_t i = 0; i < len; i++) {
        char ch = ((char *)data)[i];
        if (ch == '\n') {
            pong_buf[pong_len] = 0;
            if (!strcmp(pong_buf, "PONG"))
                probe_sent = 0;
            pong_len = 0;
        } else if (pong_len < sizeof pong_buf - 1) {
            pong_buf[pong_len++] = ch;
        }
    }
    return (int)len;
}

static struct ssh_channel_callbacks_struct command_cb = {
    .channel_data_function = on_data,
    .channel_eof_function = on_eof,
    .channel_close_function = on_close,
    .channel_exit_status_function = on_exit_status,
    .channel_exit_signal_function = on_exit_signal,
};
static struct ssh_channel_callbacks_struct signaller_cb = {
    .channel_data_function = on_signaller_data,
};

/* A channel running cmd (with a pty of term, if given); a command channel
 * (cb is command_cb) is the current one before any of its packets can come. */
static ssh_channel open_exec(ssh_session s, const char *cmd,
                             struct ssh_channel_callbacks_struct *cb, const char *term,
                             int cols, int rows)
{
    ssh_channel c = ssh_channel_new(s);
    if (!c)
        return NULL;
    if (cb == &command_cb)
        current = c;
    ssh_callbacks_init(cb);
    ssh_set_channel_callbacks(c, cb);
    if (ssh_channel_open_session(c) != SSH_OK ||
        (term && ssh_channel_request_pty_size(c, term, cols, rows) != SSH_OK) ||
        ssh_channel_request_exec(c, cmd) != SSH_OK) {
        if (current == c)
            current = NULL;
        ssh_channel_free(c);
        return NULL;
    }
    return c;
}

static ssh_channel signaller;

static void forward(ssh_session s, int idx)
{
    char line[16];
    double t = now();
    int n;
    if (last_sent[idx] && t - last_sent[idx] < repeat_window)
        return; /* a batch daemon's burst: a native process sees one pending signal */
    last_sent[idx] = t;
    n = snprintf(line, sizeof line, "%s\n", FORWARDED[idx]);
    for (int attempt = 0; attempt < 2; attempt++) { /* a closed signaller is opened once more */
        if (!signaller)
            signaller = open_exec(s, signaller_cmd, &signaller_cb, NULL, 0, 0);
        if (!signaller)
            break;
        if (ssh_channel_write(signaller, line, (uint32_t)n) == n)
            return;
        ssh_channel_free(signaller);
        signaller = NULL;
    }
    fprintf(stderr, "vmwn: WARNING cannot forward SIG%s to the guest job\n", FORWARDED[idx]);
}

static void to_warden(const char *word)
{
    if (warden_fd >= 0 && send(warden_fd, word, strlen(word), MSG_NOSIGNAL) < 0) {
        /* a warden gone: the guest job runs on all the same */
    }
}

static void handle_signals(ssh_session s, ssh_channel job)
{
    unsigned char buf[64];
    ssize_t n;
    while ((n = read(sigpipe_fds[0], buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            int sig = buf[i];
            if (sig == SIGWINCH) {
                struct winsize ws;
                if (ioctl(0, TIOCGWINSZ, &ws) == 0 && ws.ws_col && ws.ws_row)
                    ssh_channel_change_pty_size(job, ws.ws_col, ws.ws_row);
            } else if (sig == SIGTSTP) {
                to_warden("suspend\n");
            } else if (sig == SIGCONT) {
                to_warden("resume\n");
            } else {
                for (int k = 0; k < NFORWARDED; k++)
                    if (FORWARDED_NUM[k] == sig)
                        forward(s, k);
            }
        }
    }
}

static int on_fd_ready(socket_t fd, int revents, void *u)
{
    (void)fd, (void)revents;
    *(int *)u = 1;
    return 0;
}

static struct termios saved_tty;
static int tty_saved;

static void raw_tty(void)
{
    struct termios t;
    if (tcgetattr(0, &saved_tty) != 0)
        return;
    t = saved_tty;
    cfmakeraw(&t);
    /* TCSADRAIN, not TCSAFLUSH: keep what the user typed ahead */
    if (tcsetattr(0, TCSADRAIN, &t) == 0)
        tty_saved = 1;
}

static void restore_tty(void)
{
    if (tty_saved)
        tcsetattr(0, TCSADRAIN, &saved_tty);
}

/* Relay channel c until its command ended: its input from *in_fdp (-1: none), its
 * output to out_fd.  For the job (job set), also signals and probes.  Returns 0
 * when it ended, or -1 with a "lost" answer given. */
static int relay_channel(ssh_session s, ssh_channel c, int *in_fdp, int job)
{
    int in_fd = *in_fdp;
    static char pend[32768];
    size_t pend_len = 0, pend_off = 0;
    int in_ready = 0, sig_ready = 0, in_open = in_fd >= 0;
    double last_probe = now();
    ssh_event ev = ssh_event_new();
    if (!ev) {
        reply("lost", "out of memory");
        return -1;
    }
    if (!in_open)
        ssh_channel_send_eof(c);
    ssh_event_add_session(ev, s);
    if (job)
        ssh_event_add_fd(ev, sigpipe_fds[0], POLLIN, on_fd_ready, &sig_ready);
    if (in_open)
        ssh_event_add_fd(ev, in_fd, POLLIN, on_fd_ready, &in_ready);
    for (;;) {
        double t;
        int rc = ssh_event_dopoll(ev, pend_len ? 20 : 1000), poll_errno = errno;
        if (sig_ready) {
            sig_ready = 0;
            handle_signals(s, c);
        }
        /* Input goes to the command only as its window has room (a write beyond it
         * would block the relay, and signals, for the session's timeout): what was
         * read waits in pend, and in_fd is not read meanwhile. */
        if (in_ready && in_open && pend_len == 0) {
            ssize_t n = read(in_fd, pend, sizeof pend);
            in_ready = 0;
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
                /* nothing this time */
            } else if (n <= 0) {
                in_open = 0;
                ssh_event_remove_fd(ev, in_fd);
                ssh_channel_send_eof(c);
            } else {
                pend_len = (size_t)n;
                pend_off = 0;
                ssh_event_remove_fd(ev, in_fd);
            }
        }
        if (pend_len) {
            uint32_t room = ssh_channel_window_size(c);
            size_t left = pend_len - pend_off;
            int w = room ? ssh_channel_write(c, pend + pend_off,
                                             (uint32_t)(left < room ? left : room)) : 0;
            if (w == SSH_ERROR || !ssh_channel_is_open(c)) {
                /* the channel is closing: the command reads no more; its writer
                 * (the starter's pipe) learns it at once */
                pend_len = 0;
                in_open = 0;
                if (in_fd > 0) { /* not the job's own stdin */
                    close(in_fd);
                    *in_fdp = -1;
                }
            } else if ((pend_off += (size_t)w) == pend_len) {
                pend_len = 0;
                ssh_event_add_fd(ev, in_fd, POLLIN, on_fd_ready, &in_ready);
            }
        }
        t = now();
        /* After the linger, something the command started holds its output: a
         * native job ends here too (the batch daemon kills the session). */
        if (closed_seen || (ended_at && eof_seen) || (ended_at && t - ended_at > linger))
            break;
        /* a signal interrupts the poll: that is no lost connection */
        if ((rc == SSH_ERROR && poll_errno != EINTR) || !ssh_is_connected(s)) {
            if (ended_at)
                break;
            reply("lost", "the SSH connection closed without an exit status (%s)",
                  ssh_get_error(s));
            ssh_event_free(ev);
            return -1;
        }
        if (job && signaller && probe_every > 0) {
            if (probe_sent && t - probe_sent > lost_after) {
                reply("lost", "no answer from the guest for %.0f s", lost_after);
                ssh_event_free(ev);
                return -1;
            }
            if (!probe_sent && t - last_probe >= probe_every) {
                last_probe = probe_sent = t;
                if (ssh_channel_write(signaller, "PING\n", 5) != 5) {
                    ssh_channel_free(signaller);
                    signaller = NULL;
                    probe_sent = 0;
                }
            }
        }
    }
    ssh_event_free(ev);
    return 0;
}

static void reset_channel_state(void)
{
    exit_status = -1;
    eof_seen = closed_seen = 0;
    exit_signal[0] = 0;
    ended_at = 0;
    out_ok[0] = out_ok[1] = 1;
}

/* "run": cmd with its stdin, stdout and stderr on fds[0..2]. */
static int run_step(ssh_session s, const char *cmd, int fds[3])
{
    ssh_channel c;
    int rc;
    reset_channel_state();
    out_fd[0] = fds[1];
    out_fd[1] = fds[2];
    c = open_exec(s, cmd, &command_cb, NULL, 0, 0);
    if (!c) {
        reply("lost", "cannot run a command in the guest: %s", ssh_get_error(s));
        return -1;
    }
    rc = relay_channel(s, c, &fds[0], 0);
    current = NULL;
    ssh_channel_free(c);
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (rc == 0)
        reply("status", "%d", *exit_signal ? -1 : exit_status);
    return rc;
}

/* "job": the job itself, on fds 0-2. */
static int job_step(ssh_session s, char *msg, size_t len)
{
    int use_stdin, pty, cols, rows, used, in;
    size_t slen;
    char term[64], *sig, *cmd;
    ssh_channel c;
    char *nl = memchr(msg, '\n', len);
    if (!nl || sscanf(msg, "job %d %d %d %d %63s %zu", &use_stdin, &pty, &cols, &rows, term,
                      &slen) != 6 || (size_t)(used = (int)(nl + 1 - msg)) + slen > len) {
        reply("lost", "a bad job message");
        return -1;
    }
    sig = msg + used;
    cmd = sig + slen;
    sig = strndup(sig, slen);
    signaller_cmd = sig;
    reset_channel_state();
    out_fd[0] = 1;
    out_fd[1] = 2;
    /* The signaller first: opened once the job runs, its open could wait on a guest
     * that hangs meanwhile, with no probe to tell (it probes through the signaller). */
    signaller = open_exec(s, signaller_cmd, &signaller_cb, NULL, 0, 0);
    c = open_exec(s, cmd, &command_cb, pty ? term : NULL, cols, rows);
    if (!c) {
        reply("lost", "cannot start the job in the guest: %s", ssh_get_error(s));
        return -1;
    }
    if (pty && isatty(0))
        raw_tty();
    in = use_stdin ? 0 : -1;
    if (relay_channel(s, c, &in, 1) < 0) {
        restore_tty();
        return -1;
    }
    restore_tty();
    if (*exit_signal)
        reply("signal", "%s", exit_signal);
    else if (exit_status >= 0)
        reply("exit", "%d", exit_status & 0xFF);
    else
        reply("lost", "the SSH connection closed without an exit status");
    if (signaller)
        ssh_channel_send_eof(signaller);
    return 0;
}

/* Log in; returns the session, or NULL with the answer given. */
static ssh_session login(void)
{
    ssh_session s = ssh_new();
    int no = 0, yes = 1;
    long timeout = 30;
    ssh_key srv = NULL, priv = NULL;
    char *b64 = NULL, want_type[64] = "";
    const char *want_b64 = strchr(host_key, ' ');
    size_t want_len = want_b64 ? strcspn(want_b64 + 1, " ") : 0;
    if (!s) {
        reply("site", "out of memory");
        return NULL;
    }
    if (want_b64) {
        snprintf(want_type, sizeof want_type, "%.*s", (int)(want_b64 - host_key), host_key);
        want_b64++;
    }
    ssh_options_set(s, SSH_OPTIONS_PROCESS_CONFIG, &no); /* no ~/.ssh/config of the user's */
    ssh_options_set(s, SSH_OPTIONS_FD, &sock_fd);
    ssh_options_set(s, SSH_OPTIONS_HOST, "vmwn-guest");
    ssh_options_set(s, SSH_OPTIONS_USER, user);
    ssh_options_set(s, SSH_OPTIONS_TIMEOUT, &timeout);
    ssh_options_set(s, SSH_OPTIONS_NODELAY, &yes);
    if (*want_type)
        ssh_options_set(s, SSH_OPTIONS_HOSTKEYS, want_type);
    /* The guest computes its side of the key exchange, emulated (TCG) on a test
     * node: curve25519, as paramiko picks, whatever a libssh version would prefer
     * (the link is the node's own loopback to its guest). */
    ssh_options_set(s, SSH_OPTIONS_KEY_EXCHANGE,
                    "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256");
    if (ssh_connect(s) != SSH_OK) {
        reply("retry", "cannot reach the job's guest: %s", ssh_get_error(s));
        goto fail;
    }
    if (ssh_get_server_publickey(s, &srv) != SSH_OK ||
        ssh_pki_export_pubkey_base64(srv, &b64) != SSH_OK || !want_b64 ||
        strcmp(ssh_key_type_to_char(ssh_key_type(srv)), want_type) != 0 ||
        strlen(b64) != want_len || strncmp(b64, want_b64, want_len) != 0) {
        reply("site", "the guest presented a host key that is not the job's; refused");
        goto fail;
    }
    if (ssh_pki_import_privkey_file(key_path, NULL, NULL, NULL, &priv) != SSH_OK) {
        reply("site", "cannot read the job's key %s", key_path);
        goto fail;
    }
    if (ssh_userauth_publickey(s, NULL, priv) != SSH_AUTH_SUCCESS) {
        reply("lost", "the guest refused the job's key: %s", ssh_get_error(s));
        goto fail;
    }
    ssh_key_free(srv);
    ssh_key_free(priv);
    ssh_string_free_char(b64);
    return s;
fail:
    ssh_key_free(srv);
    ssh_key_free(priv);
    ssh_string_free_char(b64);
    ssh_disconnect(s);
    ssh_free(s);
    return NULL;
}

/* The next message on the control socket (NUL-terminated), with up to three
 * descriptors; 0 at the starter's end. */
static ssize_t next_message(char *buf, size_t size, int fds[3], int *nfds)
{
    union {
        char b[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = buf, .iov_len = size - 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
                       .msg_controllen = sizeof u.b};
    ssize_t n;
    *nfds = 0;
    do
        n = recvmsg(control_fd, &m, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;
    if (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                    close(fd);
                }
        reply("lost", "a command too long for the relay (over %zu bytes)", size - 1);
        return 0; /* never a truncated command */
    }
    buf[n] = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (*nfds < 3)
                    fds[(*nfds)++] = fd;
                else
                    close(fd);
            }
        }
    return n;
}

static int usage(void)
{
    fprintf(stderr, "usage: vmwn-relay --fd FD --control FD --user NAME --host-key "
                    "'TYPE BASE64' --key PATH [--warden FD] [--lost-after S] "
                    "[--probe-every S] [--linger S] [--repeat-window S]\n");
    return 2;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"fd", 1, 0, 'f'},          {"control", 1, 0, 'c'},     {"user", 1, 0, 'u'},
        {"host-key", 1, 0, 'h'},    {"key", 1, 0, 'k'},         {"warden", 1, 0, 'w'},
        {"lost-after", 1, 0, 'L'},  {"probe-every", 1, 0, 'P'}, {"linger", 1, 0, 'g'},
        {"repeat-window", 1, 0, 'W'}, {0, 0, 0, 0}};
    int opt, handled[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
                          SIGTSTP, SIGCONT, SIGWINCH};
    static char msg[MSG_MAX];
    ssh_session s;
    sigset_t none;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'f': sock_fd = atoi(optarg); break;
        case 'c': control_fd = atoi(optarg); break;
        case 'u': user = optarg; break;
        case 'h': host_key = optarg; break;
        case 'k': key_path = optarg; break;
        case 'w': warden_fd = atoi(optarg); break;
        case 'L': lost_after = atof(optarg); break;
        case 'P': probe_every = atof(optarg); break;
        case 'g': linger = atof(optarg); break;
        case 'W': repeat_window = atof(optarg); break;
        default: return usage();
        }
    }
    if (sock_fd < 0 || control_fd < 0 || !user || !host_key || !key_path)
        return usage();
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* the starter's end is this one's */
    if (pipe2(sigpipe_fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return 1;
    for (size_t i = 0; i < sizeof handled / sizeof *handled; i++) {
        struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
        if ((handled[i] == SIGTSTP || handled[i] == SIGCONT) && warden_fd < 0)
            continue;
        sigemptyset(&sa.sa_mask);
        sigaction(handled[i], &sa, NULL);
    }
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* what came meanwhile is handled now */
    fcntl(control_fd, F_SETFD, FD_CLOEXEC);
    if (warden_fd >= 0)
        fcntl(warden_fd, F_SETFD, FD_CLOEXEC);
    s = login();
    if (!s)
        return 0;
    reply("ready", "%s", "");
    for (;;) {
        int fds[3], nfds;
        ssize_t n = next_message(msg, sizeof msg, fds, &nfds);
        if (n <= 0)
            break; /* the starter ended the session (its setup failed) */
        if (!strncmp(msg, "run\n", 4) && nfds == 3) {
            if (run_step(s, msg + 4, fds) < 0)
                break;
        } else if (!strncmp(msg, "job ", 4)) {
            job_step(s, msg, (size_t)n);
            break;
        } else {
            for (int i = 0; i < nfds; i++)
                close(fds[i]);
            reply("lost", "an unknown message");
            break;
        }
    }
    ssh_disconnect(s);
    ssh_free(s);
    return 0;
}
