// SPDX-License-Identifier: GPL-2.0
/*
 * gears.ko: the GEARS guest helper (guests/gears/README.md).
 *
 * On load it tells the VMM where the kernel keeps what GEARS needs to find processes from
 * outside: it fills a struct gears_linux_info (below; packed, little-endian, version 1) and
 * makes hypercall 0x3100 (GEARS_REGISTER) with RBX = the structure's kernel virtual address
 * and RCX = its size. The VMM is expected to copy the structure during the hypercall.
 *
 *   insmod /lib/gears/gears.ko
 *   dmesg | grep gears:        -> "gears: registered with the VMM (ret=N)"
 *
 * A VMM without the GEARS extension answers -1; the module says so and loads all the same,
 * so the guest behaves identically with or without GEARS. It stays loaded (its exit does
 * nothing; the structure lives in the module's data, so the VMM must not read it later).
 *
 * Hypercall ABI (Palacios-rs, CPL0 only): RAX = id, arguments in RBX, RCX, RDX, RSI, RDI,
 * then `outb %al, $0xec`; the result comes back in RAX.
 *
 * Built out of tree against the guest kernel's headers by scripts/build-gears-guest.sh.
 */
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/mm_types.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/stddef.h>
#include <asm/current.h>
#include <asm/page.h>
#include <asm/page_types.h>
#include <asm/tlbflush.h>

#define GEARS_HC_REGISTER 0x3100UL
#define GEARS_INFO_MAGIC 0x53524547u /* the bytes 'G', 'E', 'R', 'S' */
#define GEARS_INFO_VERSION 1u

struct gears_linux_info {
	u32 magic;		/* GEARS_INFO_MAGIC */
	u32 version;		/* GEARS_INFO_VERSION */
	u64 current_task;	/* per-cpu offset of current_task: the VMM reads *(gs_base + this) */
	u64 init_task;		/* &init_task */
	u64 page_offset;	/* PAGE_OFFSET (page_offset_base) */
	u64 kernel_pgd;		/* physical address of init_mm's page directory */
	u32 off_pid;		/* offsetof(struct task_struct, ...) */
	u32 off_tgid;
	u32 off_comm;
	u32 off_mm;
	u32 off_tasks;		/* the list_head linking all tasks */
	u32 off_stack;
	u32 off_mm_pgd;		/* offsetof(struct mm_struct, pgd) */
	u32 thread_size;	/* THREAD_SIZE */
	u32 off_real_parent;	/* offsetof(struct task_struct, real_parent) */
	u32 reserved;
} __packed;

/* 80 bytes; aligned so that it never straddles a page (module data is vmalloc'ed). */
static struct gears_linux_info gears_info __aligned(128);

static long gears_hypercall2(unsigned long id, unsigned long a0, unsigned long a1)
{
	unsigned long ret = id;

	asm volatile("outb %%al, $0xec" : "+a"(ret) : "b"(a0), "c"(a1) : "memory");
	return (long)ret;
}

static int __init gears_init(void)
{
	struct gears_linux_info *gi = &gears_info;
	long ret;

	BUILD_BUG_ON(sizeof(struct gears_linux_info) != 80);
	gi->magic = GEARS_INFO_MAGIC;
	gi->version = GEARS_INFO_VERSION;
	/* On x86-64 SMP a per-cpu symbol's "address" is its offset in the per-cpu area. */
	gi->current_task = (u64)(unsigned long)&current_task;
	gi->init_task = (u64)(unsigned long)&init_task;
	gi->page_offset = (u64)PAGE_OFFSET;
	/*
	 * This process's page directory (init_mm is not exported, and the idle task's active_mm
	 * may be NULL): its kernel half maps what every process's does. The VMM uses it only to
	 * find init's (pid 1) page directory, which lives as long as the guest, and keeps that.
	 */
	gi->kernel_pgd = (u64)read_cr3_pa();
	gi->off_pid = offsetof(struct task_struct, pid);
	gi->off_tgid = offsetof(struct task_struct, tgid);
	gi->off_comm = offsetof(struct task_struct, comm);
	gi->off_mm = offsetof(struct task_struct, mm);
	gi->off_tasks = offsetof(struct task_struct, tasks);
	gi->off_stack = offsetof(struct task_struct, stack);
	gi->off_mm_pgd = offsetof(struct mm_struct, pgd);
	gi->thread_size = THREAD_SIZE;
	gi->off_real_parent = offsetof(struct task_struct, real_parent);
	gi->reserved = 0;

	ret = gears_hypercall2(GEARS_HC_REGISTER, (unsigned long)gi, sizeof(*gi));
	if (ret == -1)
		pr_info("gears: the VMM refused (no GEARS extension?)\n");
	else
		pr_info("gears: registered with the VMM (ret=%ld)\n", ret);
	return 0;
}

static void __exit gears_exit(void)
{
}

module_init(gears_init);
module_exit(gears_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("GEARS guest helper: tells the Palacios-rs VMM the kernel's task layout");
