// SPDX-License-Identifier: GPL-2.0
/*
 * guarded.ko: a GEARS guarded module (guests/gears/README.md).
 *
 * It stands for a driver that owns a privileged device, here I/O port 0x5100 (read with a
 * 32-bit `inl`). The kernel reaches the module only through its entry points, each of which
 * is called through a wrapper that scripts/guard-wrap.py generates (gm_wrap.S): the wrapper
 * makes a GUARD_ENTER hypercall (0x3200) before calling the entry and a GUARD_EXIT (0x3201)
 * after it, with the entry's id, the caller's return-address slot and the module's tag.
 * scripts/build-gears-guest.sh builds it with
 *
 *   guard-wrap.py gen --module guarded --tag 0x6d67 --init gm_init --exit gm_exit \
 *                     --entries gm_init,gm_exit,gm_read,gm_write,gm_nop
 *
 * so the ids are gm_init 0, gm_exit 1, gm_read 2, gm_write 3, gm_nop 4, and the kernel's
 * init_module/cleanup_module are the wrappers of gm_init/gm_exit themselves.
 *
 *   cat /proc/guarded               -> "secret=0x%08x" (inl(0x5100), read inside gm_read)
 *   echo hang MS > /proc/guarded    -> gm_write sleeps MS milliseconds (msleep), at most 600000
 *   echo bench N > /proc/guarded    -> gm_write times N calls of the wrapped gm_nop, N plain
 *                                      TEST hypercalls (id 0x1) and N inl(0x5100), with rdtsc;
 *                                      logs "guarded: bench n=N crossing=C hcall=H port=P
 *                                      cycles/op" (N at most 10000000)
 *   cat /proc/guarded_bench         -> "crossing=C hcall=H port=P" of the last bench (0s before)
 *
 * Both files are served by the wrapped gm_read and gm_write (the bench file is told apart
 * by its proc data), so no code of the module runs outside a crossing, except through
 * gm_read_secret(): exported, unwrapped, it is the way in for attacker.ko ("jump into the
 * middle" of the module without an ENTER).
 *
 * Every function of the module is in .text (no __init/__exit, no cold partitions: the build
 * passes -fno-reorder-blocks-and-partition), which `guard-wrap.py manifest` checks.
 */
#include <linux/delay.h>
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <asm/io.h>
#include <asm/msr.h>

#include "gm_wrap.h"

#define GM_PORT 0x5100
#define GM_HC_TEST 0x1UL
#define GM_HANG_MAX_MS 600000u
#define GM_BENCH_MAX 10000000
/* Timed in chunks so that cond_resched() runs between them, outside the timed part. */
#define GM_BENCH_CHUNK 4096
/* "secret=0x" 8 hex digits "\n" */
#define GM_SECRET_LEN 18

/* The entry points, wrapped by gm_wrap.S; none of them is static, __init or __exit. */
int gm_init(void);
void gm_exit(void);
ssize_t gm_read(struct file *file, char __user *buf, size_t len, loff_t *ppos);
ssize_t gm_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos);
void gm_nop(void);
GM_DECLARE_ALL();

/* Exported and unwrapped: another module may call it directly. */
u32 gm_read_secret(void);

static const struct proc_ops gm_proc_ops = {
	.proc_read = GM_WRAPPED(gm_read),
	.proc_write = GM_WRAPPED(gm_write),
};

/* The proc data of /proc/guarded_bench (that of /proc/guarded is NULL). */
static int gm_bench_file;

static u64 gm_bench_crossing, gm_bench_hcall, gm_bench_port;

noinline u32 gm_read_secret(void)
{
	return inl(GM_PORT);
}
EXPORT_SYMBOL(gm_read_secret);

static inline unsigned long gm_hypercall0(unsigned long id)
{
	unsigned long ret = id;

	asm volatile("outb %%al, $0xec" : "+a"(ret) : : "rbx", "memory");
	return ret;
}

static bool gm_is_bench_file(struct file *file)
{
	return pde_data(file_inode(file)) == &gm_bench_file;
}

ssize_t gm_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	char line[96];
	int n;

	if (gm_is_bench_file(file)) {
		n = scnprintf(line, sizeof(line), "crossing=%llu hcall=%llu port=%llu\n",
			      READ_ONCE(gm_bench_crossing), READ_ONCE(gm_bench_hcall),
			      READ_ONCE(gm_bench_port));
		return simple_read_from_buffer(buf, len, ppos, line, n);
	}
	/* The line has a fixed length: no port read for the read that sees the end. */
	if (*ppos >= GM_SECRET_LEN)
		return 0;
	n = scnprintf(line, sizeof(line), "secret=0x%08x\n", gm_read_secret());
	return simple_read_from_buffer(buf, len, ppos, line, n);
}

void gm_nop(void)
{
	/* Keep the call: an empty function is still called through its wrapper. */
	barrier();
}

static void gm_bench(int n)
{
	u64 crossing = 0, hcall = 0, port = 0, t0;
	int done, i, k;

	for (done = 0; done < n; done += k) {
		k = min(n - done, GM_BENCH_CHUNK);
		t0 = rdtsc_ordered();
		for (i = 0; i < k; i++)
			GM_WRAPPED(gm_nop)();
		crossing += rdtsc_ordered() - t0;
		t0 = rdtsc_ordered();
		for (i = 0; i < k; i++)
			gm_hypercall0(GM_HC_TEST);
		hcall += rdtsc_ordered() - t0;
		t0 = rdtsc_ordered();
		for (i = 0; i < k; i++)
			gm_read_secret();
		port += rdtsc_ordered() - t0;
		cond_resched();
	}
	crossing /= n;
	hcall /= n;
	port /= n;
	WRITE_ONCE(gm_bench_crossing, crossing);
	WRITE_ONCE(gm_bench_hcall, hcall);
	WRITE_ONCE(gm_bench_port, port);
	pr_info("guarded: bench n=%d crossing=%llu hcall=%llu port=%llu cycles/op\n",
		n, crossing, hcall, port);
}

ssize_t gm_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos)
{
	char cmd[64];
	unsigned int ms;
	int n;

	if (gm_is_bench_file(file))
		return -EPERM;
	if (len >= sizeof(cmd))
		return -EINVAL;
	if (copy_from_user(cmd, buf, len))
		return -EFAULT;
	cmd[len] = '\0';
	if (!strncmp(cmd, "hang ", 5)) {
		if (kstrtouint(skip_spaces(cmd + 5), 10, &ms) || ms > GM_HANG_MAX_MS)
			return -EINVAL;
		msleep(ms);
		return len;
	}
	if (!strncmp(cmd, "bench ", 6)) {
		if (kstrtoint(skip_spaces(cmd + 6), 10, &n) || n <= 0 || n > GM_BENCH_MAX)
			return -EINVAL;
		gm_bench(n);
		return len;
	}
	return -EINVAL;
}

int gm_init(void)
{
	if (!proc_create("guarded", 0666, NULL, &gm_proc_ops))
		return -ENOMEM;
	if (!proc_create_data("guarded_bench", 0444, NULL, &gm_proc_ops, &gm_bench_file)) {
		remove_proc_entry("guarded", NULL);
		return -ENOMEM;
	}
	pr_info("guarded: /proc/guarded ready\n");
	return 0;
}

void gm_exit(void)
{
	remove_proc_entry("guarded_bench", NULL);
	remove_proc_entry("guarded", NULL);
}

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("GEARS guarded module: owns I/O port 0x5100, entered through crossings");
