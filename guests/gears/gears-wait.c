/*
 * gears-wait: a patient target process for GEARS code injection.
 *
 *   gears-wait           -> "gears-wait: pid=PID", then for each line read from stdin
 *                           "got: LINE"; exit status 0 at end of input
 *
 * Between lines it sits in read(2) on stdin. Output is flushed after every line, so it
 * shows up at once on a pipe or a serial console.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;

    (void)argv;
    if (argc != 1) {
        fprintf(stderr, "usage: gears-wait\n");
        return 2;
    }
    printf("gears-wait: pid=%d\n", (int)getpid());
    fflush(stdout);
    while ((n = getline(&line, &cap, stdin)) >= 0) {
        if (n > 0 && line[n - 1] == '\n')
            line[--n] = '\0';
        printf("got: %s\n", line);
        fflush(stdout);
    }
    free(line);
    return 0;
}
