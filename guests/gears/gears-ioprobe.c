/*
 * gears-ioprobe: read the guarded device's I/O port 0x5100 from user space (32-bit inl)
 * after iopl(3), for GEARS tests: only guarded.ko, inside a crossing, should get at it.
 *
 *   gears-ioprobe        -> "ioprobe: 0x%08x"
 *
 * Exit status 0 after the read, 1 when iopl(3) fails (it needs root: CAP_SYS_RAWIO).
 * What a GEARS VMM does to the read (a fake value, a fault that kills the process) is for
 * the test to check.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/io.h>

#define GM_PORT 0x5100

int main(int argc, char **argv)
{
    unsigned int v;

    (void)argv;
    if (argc != 1) {
        fprintf(stderr, "usage: gears-ioprobe\n");
        return 2;
    }
    if (iopl(3) != 0) {
        fprintf(stderr, "gears-ioprobe: iopl(3): %s\n", strerror(errno));
        return 1;
    }
    v = inl(GM_PORT);
    printf("ioprobe: 0x%08x\n", v);
    return 0;
}
