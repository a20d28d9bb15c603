/*
 * sysguest user program: runs at CPL 3 on its own stack and talks to the
 * kernel only through system calls. Every line it prints is exactly one
 * write system call (uprintf formats the whole line into a buffer first),
 * so a VMM that intercepts write sees one call per line:
 *
 *   SYSCALL getppid (110) loops times, timed with RDTSC (no output inside)
 *   sysguest: getppid=<last result> loops=<N> cycles_per_call=<avg>   [write]
 *   sysguest: hello from user mode                       [write, checked below]
 *   sysguest: write returned <result of that write>                  [write]
 *   SYSCALL getpid (39)
 *   sysguest: getpid=<result>                                        [write]
 *   sysguest: int80 write                                [INT 0x80 write (4)]
 *   INT 0x80 getpid (20)
 *   sysguest: int80 getpid=<result>                                  [write]
 *   sysguest: int80 write returned <result of the INT 0x80 write>    [write]
 *   SYSCALL exit(0) (60), or with exit=int80 INT 0x80 exit(0) (1)
 *
 * So a run makes loops getppid calls, 6 SYSCALL writes, 1 getpid, 1 exit,
 * and 2 INT 0x80 calls (write, getpid), plus the INT 0x80 exit with
 * exit=int80 (then the SYSCALL exit is not made). The results are printed
 * as received, not checked: a VMM that answers a call itself shows up here.
 */
#include "io.h"
#include "kstd.h"
#include "sysguest.h"

static inline long sys1(long nr, long a0)
{
	long r;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(nr), "D"(a0)
			 : "rcx", "r11", "memory");
	return r;
}

static inline long sys3(long nr, long a0, long a1, long a2)
{
	long r;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(nr), "D"(a0), "S"(a1), "d"(a2)
			 : "rcx", "r11", "memory");
	return r;
}

static inline long sys0(long nr)
{
	long r;

	__asm__ volatile("syscall" : "=a"(r) : "a"(nr) : "rcx", "r11", "memory");
	return r;
}

/* INT 0x80: 32-bit arguments (pointers here are below 4 GiB). */
static inline long int80_3(long nr, long a0, long a1, long a2)
{
	long r;

	__asm__ volatile("int $0x80"
			 : "=a"(r)
			 : "a"(nr), "b"(a0), "c"(a1), "d"(a2)
			 : "memory");
	return r;
}

static inline long int80_0(long nr)
{
	long r;

	__asm__ volatile("int $0x80" : "=a"(r) : "a"(nr) : "memory");
	return r;
}

struct ubuf {
	char b[200];
	unsigned n;
};

static void ubuf_putc(char c, void *ctx)
{
	struct ubuf *u = ctx;

	if (u->n < sizeof(u->b))
		u->b[u->n++] = c;
}

/* One line (or whatever fmt makes) in a single write system call. */
static __attribute__((format(printf, 1, 2))) long uprintf(const char *fmt, ...)
{
	struct ubuf u;
	va_list ap;

	u.n = 0;
	va_start(ap, fmt);
	vformat(ubuf_putc, &u, fmt, ap);
	va_end(ap);
	return sys3(NR_WRITE, 1, (long)u.b, u.n);
}

void user_main(uint64_t loops, uint64_t flags)
{
	static const char hello[] = "sysguest: hello from user mode\n";
	static const char int80_msg[] = "sysguest: int80 write\n";
	uint64_t t0, t1, avg = 0;
	long r = 0;

	/* 1. getppid through SYSCALL, timed. */
	t0 = rdtsc();
	for (uint64_t i = 0; i < loops; i++)
		r = sys0(NR_GETPPID);
	t1 = rdtsc();
	if (loops)
		avg = (t1 - t0) / loops;
	uprintf("sysguest: getppid=%ld loops=%lu cycles_per_call=%lu\n", r,
		(unsigned long)loops, (unsigned long)avg);

	/* 2. write through SYSCALL. */
	r = sys3(NR_WRITE, 1, (long)hello, sizeof(hello) - 1);
	uprintf("sysguest: write returned %ld\n", r);

	/* 3. getpid through SYSCALL. */
	r = sys0(NR_GETPID);
	uprintf("sysguest: getpid=%ld\n", r);

	/* 4. write and getpid through INT 0x80. */
	long w = int80_3(NR32_WRITE, 1, (long)int80_msg, sizeof(int80_msg) - 1);
	r = int80_0(NR32_GETPID);
	uprintf("sysguest: int80 getpid=%ld\n", r);
	uprintf("sysguest: int80 write returned %ld\n", w);

	/* 5. exit(0). */
	if (flags & UFLAG_EXIT_INT80)
		int80_3(NR32_EXIT, 0, 0, 0);
	else
		sys1(NR_EXIT, 0);
	/* Not reached unless the exit call came back. */
	uprintf("sysguest: FAIL exit returned\n");
	for (;;)
		sys1(NR_EXIT, 1);
}
