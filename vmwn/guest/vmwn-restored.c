/*
 * vmwn-restored SEED_DEVICE: what a guest restored from a prepared state does
 * first, in one process (each process the guest's shell starts costs it a few
 * milliseconds, and these steps are on every warm job's path).
 *
 * 1. Waits for its job's seed: polls SEED_DEVICE with O_DIRECT reads (the
 *    placeholder's blocks in the page cache are never looked at) every
 *    millisecond until an ISO 9660 volume is there, and checks that its
 *    label is cidata.
 * 2. Sets the wall clock (the saved state's is the preparation's) from the
 *    host's: the host writes its time on the seed disk (CLOCK_OFFSET) once
 *    the guest's state is loaded, and this polls for it as for the seed, so
 *    the clock is the host's to a few milliseconds.  If none comes within
 *    CLOCK_WAIT seconds, from the virtual RTC (whole seconds, and QEMU's
 *    starts up to a second behind the host's).
 * 3. Rekeys the kernel RNG: every guest restored from one state starts with
 *    the same RNG state, and Linux 6.1 reseeds its CRNG only on a timer (up
 *    to 60 s), so two restored jobs would read the same /dev/urandom bytes
 *    until then.  It reads 64 bytes from the virtio-rng device (the host's
 *    getrandom), credits them to the input pool (RNDADDENTROPY) and forces a
 *    reseed (RNDRESEEDCRNG), which also invalidates every per-CPU CRNG.
 *
 * 4. Writes a machine-id of its own (/etc/machine-id, systemd's format: 32
 *    hex digits of a random version-4 UUID) from the reseeded RNG: the
 *    prepared guest has none, and every restored one must differ.
 *
 * Run by the tiny guest's /init as root, before anything that wants
 * randomness (sshd) runs on.  Exit status 0, or 1 with one line on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <endian.h>
#include <linux/rtc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define BYTES 64
/* vmwn/warm.py's CLOCK_OFFSET and CLOCK_MAGIC: the last 4 KiB of the 1 MiB seed
 * disk hold MAGIC, then seconds and nanoseconds (little-endian 64-bit). */
#define CLOCK_OFFSET ((1 << 20) - 4096)
#define CLOCK_MAGIC "vmwn-host-clock"
#define CLOCK_WAIT 5
#define PVD_OFFSET 32768   /* ISO 9660: the primary volume descriptor, sector 16 */
#define PVD_SIZE 2048

static int fail(const char *what, int err)
{
    fprintf(stderr, "vmwn-restored: %s: %s\n", what, strerror(err));
    return 1;
}

static int wait_for_seed(const char *dev)
{
    unsigned char *pvd;
    struct timespec ms = {0, 1000000};
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        return fail(dev, errno);
    if (posix_memalign((void **)&pvd, 4096, PVD_SIZE) != 0)
        return fail("memory", ENOMEM);
    for (;;) {
        ssize_t n = pread(fd, pvd, PVD_SIZE, PVD_OFFSET);
        if (n == PVD_SIZE && memcmp(pvd + 1, "CD001", 5) == 0)
            break;
        if (n < 0 && errno != EINTR)
            return fail(dev, errno);
        nanosleep(&ms, NULL);
    }
    close(fd);
    /* The volume identifier: 32 bytes at 40, padded with spaces. */
    char label[33];
    memcpy(label, pvd + 40, 32);
    label[32] = 0;
    for (int i = 31; i >= 0 && label[i] == ' '; i--)
        label[i] = 0;
    if (strcmp(label, "cidata") != 0 && strcmp(label, "CIDATA") != 0) {
        fprintf(stderr, "vmwn-restored: the restored seed is not labelled cidata\n");
        return 1;
    }
    return 0;
}

/* The host's time from the seed disk, or 0 if it did not come in time. */
static int host_clock(const char *dev, struct timespec *now)
{
    unsigned char *blk;
    struct timespec ms = {0, 1000000};
    int fd = open(dev, O_RDONLY | O_DIRECT), found = 0;
    if (fd < 0)
        return 0;
    if (posix_memalign((void **)&blk, 4096, 4096) != 0) {
        close(fd);
        return 0;
    }
    /* The host writes the time, then the magic: a record with the magic is whole. */
    for (int i = 0; i < CLOCK_WAIT * 1000 && !found; i++) {
        if (pread(fd, blk, 4096, CLOCK_OFFSET) == 4096 &&
            memcmp(blk, CLOCK_MAGIC, sizeof CLOCK_MAGIC) == 0) {
            int64_t sec, nsec;
            memcpy(&sec, blk + 16, 8);
            memcpy(&nsec, blk + 24, 8);
            now->tv_sec = (time_t)le64toh((uint64_t)sec);
            now->tv_nsec = (long)le64toh((uint64_t)nsec);
            found = now->tv_sec > 0 && now->tv_nsec >= 0 && now->tv_nsec < 1000000000;
            if (!found)
                break; /* not a record of vmwn's: the RTC's time instead */
        } else {
            nanosleep(&ms, NULL);
        }
    }
    free(blk);
    close(fd);
    return found;
}

static int set_clock(const char *dev)
{
    struct rtc_time rt;
    struct tm tm;
    struct timespec host;
    if (host_clock(dev, &host)) {
        if (clock_settime(CLOCK_REALTIME, &host) != 0)
            return fail("setting the clock", errno);
        return 0;
    }
    int fd = open("/dev/rtc0", O_RDONLY);
    if (fd < 0)
        return fail("/dev/rtc0", errno);
    if (ioctl(fd, RTC_RD_TIME, &rt) != 0)
        return fail("reading the RTC", errno);
    close(fd);
    memset(&tm, 0, sizeof tm);
    tm.tm_sec = rt.tm_sec;
    tm.tm_min = rt.tm_min;
    tm.tm_hour = rt.tm_hour;
    tm.tm_mday = rt.tm_mday;
    tm.tm_mon = rt.tm_mon;
    tm.tm_year = rt.tm_year;
    struct timespec now = {timegm(&tm), 0};   /* the RTC keeps UTC */
    if (now.tv_sec == (time_t)-1)
        return fail("the RTC's time", EINVAL);
    if (clock_settime(CLOCK_REALTIME, &now) != 0)
        return fail("setting the clock", errno);
    return 0;
}

static int reseed(void)
{
    struct {
        struct rand_pool_info info;
        unsigned char buf[BYTES];
    } req;
    ssize_t got = 0;
    int hw = open("/dev/hwrng", O_RDONLY);
    if (hw < 0)
        return fail("/dev/hwrng", errno);
    while (got < BYTES) {
        ssize_t n = read(hw, req.buf + got, BYTES - got);
        if (n == 0)
            return fail("reading /dev/hwrng", ENODATA);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("reading /dev/hwrng", errno);
        }
        got += n;
    }
    close(hw);
    int rnd = open("/dev/urandom", O_WRONLY);
    if (rnd < 0)
        return fail("/dev/urandom", errno);
    req.info.entropy_count = BYTES * 8;
    req.info.buf_size = BYTES;
    if (ioctl(rnd, RNDADDENTROPY, &req) != 0)
        return fail("RNDADDENTROPY", errno);
    if (ioctl(rnd, RNDRESEEDCRNG) != 0)
        return fail("RNDRESEEDCRNG", errno);
    close(rnd);
    return 0;
}

static int machine_id(void)
{
    unsigned char id[16];
    char text[34];
    if (getrandom(id, sizeof id, 0) != (ssize_t)sizeof id)
        return fail("getrandom", errno);
    id[6] = (id[6] & 0x0f) | 0x40;   /* a version-4 UUID, as systemd makes them */
    id[8] = (id[8] & 0x3f) | 0x80;
    for (int i = 0; i < 16; i++)
        snprintf(text + 2 * i, 3, "%02x", id[i]);
    text[32] = '\n';
    text[33] = 0;
    int fd = open("/etc/machine-id", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
    if (fd < 0)
        return fail("/etc/machine-id", errno);
    errno = 0;
    if (write(fd, text, 33) != 33 || close(fd) != 0)
        return fail("writing /etc/machine-id", errno ? errno : EIO);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: vmwn-restored SEED_DEVICE\n");
        return 1;
    }
    if (wait_for_seed(argv[1]) || set_clock(argv[1]) || reseed() || machine_id())
        return 1;
    return 0;
}
