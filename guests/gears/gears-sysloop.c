/*
 * gears-sysloop: time N getppid() system calls (syscall(SYS_getppid), so that no libc
 * caching gets in the way), to measure what GEARS system-call interposition costs.
 *
 *   gears-sysloop N      -> "sysloop: n=N ns_per_call=X"  (X an integer, CLOCK_MONOTONIC)
 *
 * Exit status 0, or 2 when N is not a positive integer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    unsigned long long n, i, ns;
    char *end;

    if (argc != 2) {
        fprintf(stderr, "usage: gears-sysloop N\n");
        return 2;
    }
    errno = 0;
    n = strtoull(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0' || argv[1][0] == '-' || n == 0) {
        fprintf(stderr, "gears-sysloop: N must be a positive integer, not '%s'\n", argv[1]);
        return 2;
    }
    if (clock_gettime(CLOCK_MONOTONIC, &t0) != 0) {
        perror("gears-sysloop: clock_gettime");
        return 1;
    }
    for (i = 0; i < n; i++)
        syscall(SYS_getppid);
    if (clock_gettime(CLOCK_MONOTONIC, &t1) != 0) {
        perror("gears-sysloop: clock_gettime");
        return 1;
    }
    ns = (unsigned long long)(t1.tv_sec - t0.tv_sec) * 1000000000ull +
         (unsigned long long)t1.tv_nsec - (unsigned long long)t0.tv_nsec;
    printf("sysloop: n=%llu ns_per_call=%llu\n", n, ns / n);
    return 0;
}
