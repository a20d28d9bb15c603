/*
 * symspy: the Linux guest's side of Palacios-rs SymSpy (docs/hypercalls.md, "SymSpy").
 *
 *   symspy publish   register a page of this process's memory as the SymSpy page (its
 *                    physical address goes to MSR 0x534 through /dev/cpu/0/msr), print the
 *                    VMM's half, write the guest's half, and keep it current (uptime_s, procs)
 *                    every second from a background process.
 *   symspy --help
 *
 * Needs root (pagemap shows physical frames only to CAP_SYS_ADMIN; /dev/cpu/N/msr needs
 * CAP_SYS_RAWIO) and the msr module. Built static (scripts/build-linux-helpers.sh) so it runs
 * on the busybox initramfs.
 *
 * mlock() is not inherited across fork(), so `publish` forks first: the child does all the
 * work and stays; the parent waits on a pipe for the child's verdict ('o' ok, 'f' failed) and
 * exits 0 or 1 with it. The background process stops by itself when MSR 0x534 no longer holds
 * its page (another `symspy publish` took over, or the page was unregistered).
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SYMSPY_MSR 0x534
#define SYMSPY_MAGIC 0x56335359u /* "YS3V" */
#define PAGE 4096
#define VMM_TEXT 16
#define VMM_TEXT_LEN (2048 - VMM_TEXT)
#define GUEST_SEQ 2048
#define GUEST_TEXT 2052
#define GUEST_TEXT_LEN (PAGE - GUEST_TEXT)
#define MSR_DEV "/dev/cpu/0/msr"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: symspy publish | symspy --help\n"
            "\n"
            "publish: register a locked page of this process as the Palacios-rs SymSpy page\n"
            "  (its physical address is written to MSR 0x%x through " MSR_DEV "), print the\n"
            "  VMM's half (lines `symspy: vmm KEY=VALUE`) and write the guest's half:\n"
            "  kernel, hostname, pid, procs, uptime_s, page_gpa. A background process then\n"
            "  refreshes uptime_s and procs every second; it ends when MSR 0x%x no longer\n"
            "  holds its page (a new `symspy publish` replaces it).\n"
            "  Exit status 0 when the page is registered and published, 1 otherwise.\n"
            "  Needs root and the msr module (`modprobe msr`).\n",
            SYMSPY_MSR, SYMSPY_MSR);
}

/* ---- is this Palacios-rs? ----------------------------------------------------------------- */

/* After a failed registration: what CPUID says about the hypervisor, as a hint. */
static void vm_hint(void)
{
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    if (!(c >> 31 & 1)) {
        fprintf(stderr, "symspy: CPUID shows no hypervisor: this is not a Palacios-rs VM\n");
        return;
    }
    char sig[13];
    __cpuid(0x40000100, a, b, c, d);
    memcpy(sig, &b, 4);
    memcpy(sig + 4, &c, 4);
    memcpy(sig + 8, &d, 4);
    sig[12] = 0;
    if (!strcmp(sig, "PalaciosRsV3")) {
        __cpuid(0x40000101, a, b, c, d);
        fprintf(stderr, "symspy: yet CPUID 0x40000100 says Palacios-rs (ABI version %u)\n", b);
        return;
    }
    __cpuid(0x40000000, a, b, c, d);
    memcpy(sig, &b, 4);
    memcpy(sig + 4, &c, 4);
    memcpy(sig + 8, &d, 4);
    for (int i = 0; i < 12; i++)
        if (sig[i] && !isprint((unsigned char)sig[i]))
            sig[i] = '.';
    fprintf(stderr,
            "symspy: CPUID 0x40000100 has no Palacios-rs signature (PalaciosRsV3); the hypervisor "
            "calls itself \"%s\" (CPUID 0x40000000)\n",
            sig);
}

/* ---- MSR ---------------------------------------------------------------------------------- */

static int msr_fd = -1;

static int msr_open(void)
{
    msr_fd = open(MSR_DEV, O_RDWR | O_CLOEXEC);
    if (msr_fd >= 0)
        return 0;
    int e = errno;
    if (e == ENOENT || e == ENXIO || e == ENODEV)
        fprintf(stderr,
                "symspy: cannot open " MSR_DEV ": %s (load the msr module: `modprobe msr`, "
                "or `insmod /lib/modules/msr.ko` in the test initramfs)\n",
                strerror(e));
    else if (e == EACCES || e == EPERM)
        fprintf(stderr, "symspy: cannot open " MSR_DEV ": %s (needs root: CAP_SYS_RAWIO)\n",
                strerror(e));
    else
        fprintf(stderr, "symspy: cannot open " MSR_DEV ": %s\n", strerror(e));
    return -1;
}

static int msr_write(uint64_t value)
{
    ssize_t n = pwrite(msr_fd, &value, sizeof value, SYMSPY_MSR);
    if (n == (ssize_t)sizeof value)
        return 0;
    if (n >= 0)
        fprintf(stderr, "symspy: cannot write MSR 0x%x: short write (%zd bytes)\n", SYMSPY_MSR, n);
    else if (errno == EIO) {
        fprintf(stderr, "symspy: cannot write MSR 0x%x (not a Palacios-rs VM?): %s\n", SYMSPY_MSR,
                strerror(errno));
        vm_hint();
    }
    else if (errno == EPERM)
        fprintf(stderr,
                "symspy: cannot write MSR 0x%x: %s (kernel lockdown, or msr.allow_writes=off)\n",
                SYMSPY_MSR, strerror(errno));
    else
        fprintf(stderr, "symspy: cannot write MSR 0x%x: %s\n", SYMSPY_MSR, strerror(errno));
    return -1;
}

static int msr_read(uint64_t *value)
{
    ssize_t n = pread(msr_fd, value, sizeof *value, SYMSPY_MSR);
    if (n == (ssize_t)sizeof *value)
        return 0;
    if (n >= 0)
        fprintf(stderr, "symspy: cannot read MSR 0x%x: short read (%zd bytes)\n", SYMSPY_MSR, n);
    else
        fprintf(stderr, "symspy: cannot read MSR 0x%x: %s\n", SYMSPY_MSR, strerror(errno));
    return -1;
}

/* ---- physical address --------------------------------------------------------------------- */

/* The physical address of the page at `va`, or 0 (after a message) if it cannot be found. */
static uint64_t phys_addr(const void *va, int quiet)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (!quiet)
            fprintf(stderr, "symspy: cannot open /proc/self/pagemap: %s\n", strerror(errno));
        return 0;
    }
    uint64_t entry;
    off_t at = (off_t)((uintptr_t)va / PAGE) * (off_t)sizeof entry;
    ssize_t n = pread(fd, &entry, sizeof entry, at);
    int e = errno;
    close(fd);
    if (n != (ssize_t)sizeof entry) {
        if (!quiet)
            fprintf(stderr, "symspy: cannot read /proc/self/pagemap: %s\n",
                    n < 0 ? strerror(e) : "short read");
        return 0;
    }
    if (!(entry >> 63 & 1)) {
        if (!quiet)
            fprintf(stderr, "symspy: /proc/self/pagemap says the locked page is not present\n");
        return 0;
    }
    uint64_t pfn = entry & ((1ull << 55) - 1);
    if (pfn == 0) {
        if (!quiet)
            fprintf(stderr,
                    "symspy: /proc/self/pagemap shows PFN 0: reading physical addresses needs root "
                    "(CAP_SYS_ADMIN)\n");
        return 0;
    }
    return pfn * PAGE;
}

/* ---- the guest's facts -------------------------------------------------------------------- */

static long count_procs(void)
{
    DIR *d = opendir("/proc");
    if (!d)
        return -1;
    long n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *p = de->d_name;
        if (!*p)
            continue;
        while (*p && isdigit((unsigned char)*p))
            p++;
        if (!*p)
            n++;
    }
    closedir(d);
    return n;
}

static long uptime_s(void)
{
    FILE *f = fopen("/proc/uptime", "re");
    if (!f)
        return -1;
    double up = -1;
    if (fscanf(f, "%lf", &up) != 1)
        up = -1;
    fclose(f);
    return up < 0 ? -1 : (long)up;
}

/* Formats the guest's half into `buf` (GUEST_TEXT_LEN bytes); returns its length or -1. */
static int guest_text(char *buf, uint64_t gpa)
{
    struct utsname u;
    if (uname(&u) != 0) {
        fprintf(stderr, "symspy: uname: %s\n", strerror(errno));
        return -1;
    }
    int n = snprintf(buf, GUEST_TEXT_LEN,
                     "kernel=%s\nhostname=%s\npid=%ld\nprocs=%ld\nuptime_s=%ld\npage_gpa=0x%llx\n",
                     u.release, u.nodename, (long)getpid(), count_procs(), uptime_s(),
                     (unsigned long long)gpa);
    if (n < 0 || n >= GUEST_TEXT_LEN) {
        fprintf(stderr, "symspy: the guest's half does not fit in %d bytes\n", GUEST_TEXT_LEN);
        return -1;
    }
    return n;
}

/* Writes the text (with its NUL) into the guest half, then bumps the guest sequence number. */
static void publish_text(volatile unsigned char *page, const char *text, int len)
{
    for (int i = 0; i <= len; i++)
        page[GUEST_TEXT + i] = (unsigned char)text[i];
    uint32_t *seq = (uint32_t *)(page + GUEST_SEQ);
    uint32_t next = __atomic_load_n(seq, __ATOMIC_RELAXED) + 1;
    __atomic_store_n(seq, next, __ATOMIC_RELEASE);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---- publish ------------------------------------------------------------------------------ */

/* Sends the verdict to the waiting parent. */
static void tell(int fd, char verdict)
{
    fflush(stdout);
    fflush(stderr);
    if (write(fd, &verdict, 1) != 1) {
        /* The parent is gone; nothing to tell. */
    }
    close(fd);
}

/* The child's work up to the verdict; 0 when the page is registered and published. */
static int setup(unsigned char **page_out, uint64_t *gpa_out)
{
    void *mem = NULL;
    int e = posix_memalign(&mem, PAGE, PAGE);
    if (e != 0) {
        fprintf(stderr, "symspy: cannot allocate a page: %s\n", strerror(e));
        return -1;
    }
    if (mlock(mem, PAGE) != 0) {
        fprintf(stderr, "symspy: cannot mlock the page: %s\n", strerror(errno));
        return -1;
    }
    volatile unsigned char *page = mem;
    for (int i = 0; i < PAGE; i++)
        page[i] = 0;

    uint64_t gpa = phys_addr(mem, 0);
    if (!gpa)
        return -1;
    if (msr_open() != 0)
        return -1;
    if (msr_write(gpa) != 0)
        return -1;
    uint64_t back = 0;
    if (msr_read(&back) != 0)
        return -1;
    if (back != gpa) {
        /* A hypervisor that ignores unknown MSRs (QEMU's TCG) takes the write and reads 0. */
        fprintf(stderr,
                "symspy: MSR 0x%x reads back 0x%llx, not the page's address 0x%llx (not a "
                "Palacios-rs VM?)\n",
                SYMSPY_MSR, (unsigned long long)back, (unsigned long long)gpa);
        vm_hint();
        return -1;
    }

    /* The VMM fills its half when the MSR is written; wait up to 2 s for its magic. */
    volatile uint32_t *words = (volatile uint32_t *)page;
    int waited = 0;
    while (words[0] != SYMSPY_MAGIC && waited < 2000) {
        sleep_ms(10);
        waited += 10;
    }
    if (words[0] != SYMSPY_MAGIC) {
        fprintf(stderr,
                "symspy: MSR 0x%x holds 0x%llx but the VMM wrote no magic 0x%08x at its offset 0 "
                "within 2 s (found 0x%08x)\n",
                SYMSPY_MSR, (unsigned long long)gpa, SYMSPY_MAGIC, words[0]);
        vm_hint();
        msr_write(0);
        return -1;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    /* This is a Palacios-rs VM. Compaction leaves mlocked pages where they are only with this
     * off (best effort: keep() also re-registers the page if its frame ever changes). */
    int fd = open("/proc/sys/vm/compact_unevictable_allowed", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, "0\n", 2) != 2) {
            /* Not fatal. */
        }
        close(fd);
    }
    uint32_t version = words[1];
    char vmm[VMM_TEXT_LEN + 1];
    for (int i = 0; i < VMM_TEXT_LEN; i++)
        vmm[i] = (char)page[VMM_TEXT + i];
    vmm[VMM_TEXT_LEN] = 0;
    printf("symspy: vmm half: layout version %u, sequence %u\n", version, words[2]);
    if (version != 1)
        fprintf(stderr, "symspy: warning: the VMM's layout version is %u; this program knows 1\n",
                version);
    for (char *line = vmm, *next; *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        else
            next = line + strlen(line);
        if (*line)
            printf("symspy: vmm %s\n", line);
    }

    char text[GUEST_TEXT_LEN];
    int len = guest_text(text, gpa);
    if (len < 0) {
        msr_write(0);
        return -1;
    }
    publish_text(page, text, len);
    printf("symspy: published %d bytes at 0x%llx\n", len, (unsigned long long)gpa);
    *page_out = (unsigned char *)mem;
    *gpa_out = gpa;
    return 0;
}

/* The background loop: refresh the guest half every second while the page stays registered. */
static void keep(unsigned char *mem, uint64_t gpa)
{
    volatile unsigned char *page = mem;
    char text[GUEST_TEXT_LEN];
    for (;;) {
        sleep_ms(1000);
        uint64_t now = 0;
        if (msr_read(&now) != 0 || now != gpa)
            exit(0); /* unregistered or replaced: the page is no longer ours to keep */
        uint64_t where = phys_addr(mem, 1);
        if (where && where != gpa) {
            /* The kernel moved the page: register its new frame. */
            if (msr_write(where) != 0)
                exit(1);
            gpa = where;
        }
        int len = guest_text(text, gpa);
        if (len >= 0)
            publish_text(page, text, len);
    }
}

static int publish(void)
{
    int p[2];
    if (pipe(p) != 0) {
        fprintf(stderr, "symspy: pipe: %s\n", strerror(errno));
        return 1;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t child = fork();
    if (child < 0) {
        fprintf(stderr, "symspy: fork: %s\n", strerror(errno));
        return 1;
    }
    if (child > 0) {
        close(p[1]);
        char verdict = 0;
        ssize_t n;
        while ((n = read(p[0], &verdict, 1)) < 0 && errno == EINTR)
            ;
        close(p[0]);
        if (n == 1 && verdict == 'o')
            return 0;
        int status = 0;
        waitpid(child, &status, 0);
        if (n != 1)
            fprintf(stderr,
                    "symspy: the publishing process ended without a verdict (status 0x%x)\n",
                    status);
        return 1;
    }

    /* The child: its own session, so the shell's job control and hangups leave it alone. */
    close(p[0]);
    setsid();
    unsigned char *page = NULL;
    uint64_t gpa = 0;
    if (setup(&page, &gpa) != 0) {
        tell(p[1], 'f');
        _exit(1);
    }
    tell(p[1], 'o');
    if (chdir("/") != 0) {
        /* Harmless. */
    }
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2)
            close(null);
    }
    keep(page, gpa);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
                      !strcmp(argv[1], "help"))) {
        usage(stdout);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "publish"))
        return publish();
    usage(stderr);
    return 2;
}
