/*
 * vmwn-reseed: give a restored guest's kernel RNG fresh host entropy and make
 * it rekey now.
 *
 * Every guest restored from one saved state starts with the same kernel RNG
 * state, and Linux 6.1 reseeds its CRNG only on a timer (up to 60 s), so two
 * restored jobs would read the same /dev/urandom bytes until then.  This reads
 * 64 bytes from the virtio-rng device (the host's getrandom), credits them to
 * the input pool (RNDADDENTROPY) and forces a reseed (RNDRESEEDCRNG), which
 * also invalidates every per-CPU CRNG.  Run by the tiny guest's /init as root,
 * before anything that wants randomness (sshd) starts.  Exit status 0 or 1
 * with one line on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define BYTES 64

int main(void)
{
    struct {
        struct rand_pool_info info;
        unsigned char buf[BYTES];
    } req;
    ssize_t got = 0;
    int hw = open("/dev/hwrng", O_RDONLY);
    if (hw < 0) {
        fprintf(stderr, "vmwn-reseed: /dev/hwrng: %s\n", strerror(errno));
        return 1;
    }
    while (got < BYTES) {
        ssize_t n = read(hw, req.buf + got, BYTES - got);
        if (n <= 0) {
            fprintf(stderr, "vmwn-reseed: reading /dev/hwrng: %s\n",
                    n ? strerror(errno) : "end of file");
            return 1;
        }
        got += n;
    }
    close(hw);
    int rnd = open("/dev/urandom", O_WRONLY);
    if (rnd < 0) {
        fprintf(stderr, "vmwn-reseed: /dev/urandom: %s\n", strerror(errno));
        return 1;
    }
    req.info.entropy_count = BYTES * 8;
    req.info.buf_size = BYTES;
    if (ioctl(rnd, RNDADDENTROPY, &req) != 0) {
        fprintf(stderr, "vmwn-reseed: RNDADDENTROPY: %s\n", strerror(errno));
        return 1;
    }
    if (ioctl(rnd, RNDRESEEDCRNG) != 0) {
        fprintf(stderr, "vmwn-reseed: RNDRESEEDCRNG: %s\n", strerror(errno));
        return 1;
    }
    return 0;
}
