/*
 * gears-int80: write TEXT and a newline to stdout through the 32-bit system call ABI
 * (`int $0x80`, eax = 4 write, ebx = fd 1, ecx = buffer, edx = length) from a 64-bit
 * process, for GEARS tests of system-call interposition on the legacy entry.
 *
 *   gears-int80 TEXT
 *
 * Prints nothing else. Exit status 0 when the whole line was written, 1 otherwise (with a
 * message on stderr, written the normal way), 2 on a usage error. The 32-bit ABI takes
 * 32-bit pointers, so the line is copied into a static buffer: the program is linked
 * static and not position independent (-static -no-pie), which puts .bss below 4 GiB.
 * Needs a kernel with IA32 emulation (CONFIG_IA32_EMULATION).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define LINE_MAX_BYTES 4096

static char line[LINE_MAX_BYTES];

int main(int argc, char **argv)
{
    size_t len;
    long ret;

    if (argc != 2) {
        fprintf(stderr, "usage: gears-int80 TEXT\n");
        return 2;
    }
    len = strlen(argv[1]);
    if (len + 1 > sizeof(line)) {
        fprintf(stderr, "gears-int80: TEXT is %zu bytes, at most %zu fit\n", len,
                sizeof(line) - 1);
        return 2;
    }
    if ((uintptr_t)line + sizeof(line) > 0xffffffffu) {
        fprintf(stderr, "gears-int80: the buffer is at %p, above 4 GiB (not built -no-pie?)\n",
                (void *)line);
        return 1;
    }
    memcpy(line, argv[1], len);
    line[len++] = '\n';
    ret = 4; /* __NR_write in the i386 table */
    __asm__ volatile("int $0x80"
                     : "+a"(ret)
                     : "b"(1), "c"((uint32_t)(uintptr_t)line), "d"((uint32_t)len)
                     : "memory", "r8", "r9", "r10", "r11");
    /* The result is a 32-bit int in eax. */
    ret = (int)ret;
    if (ret != (long)len) {
        fprintf(stderr, "gears-int80: int $0x80 write returned %ld, wanted %zu\n", ret, len);
        return 1;
    }
    return 0;
}
