/*
 * vmwn-restored SEED_DEVICE: what a guest restored from a prepared state does
 * first, in one process (each process the guest's shell starts costs it a few
 * milliseconds, and these steps are on every warm job's path).
 *
 * 1. Waits for its job's seed: polls SEED_DEVICE with O_DIRECT reads (the
 *    placeholder's blocks in the page cache are never looked at) every
 *    millisecond until an ISO 9660 volume is there, and checks that its
 *    label is cidata.
 * 2. Sets the wall clock from the virtual RTC, which follows the host's
 *    clock (the saved state's clock is the preparation's).
 * 3. Rekeys the kernel RNG: every guest restored from one state starts with
 *    the same RNG state, and Linux 6.1 reseeds its CRNG only on a timer (up
 *    to 60 s), so two restored jobs would read the same /dev/urandom bytes
 *    until then.  It reads 64 bytes from the virtio-rng device (the host's
 *    getrandom), credits them to the input pool (RNDADDENTROPY) and forces a
 *    reseed (RNDRESEEDCRNG), which also invalidates every per-CPU CRNG.
 *
 * Run by the tiny guest's /init as root, before anything that wants
 * randomness (sshd) runs on.  Exit status 0, or 1 with one line on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <linux/rtc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BYTES 64
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

static int set_clock(void)
{
    struct rtc_time rt;
    struct tm tm;
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

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: vmwn-restored SEED_DEVICE\n");
        return 1;
    }
    if (wait_for_seed(argv[1]) || set_clock() || reseed())
        return 1;
    return 0;
}
