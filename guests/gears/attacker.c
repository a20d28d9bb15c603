// SPDX-License-Identifier: GPL-2.0
/*
 * attacker.ko: a plain (unguarded) module that tries three ways around guarded.ko's
 * protection of I/O port 0x5100 (guests/gears/README.md). Load guarded.ko first:
 *
 *   insmod /lib/gears/guarded.ko && insmod /lib/gears/attacker.ko
 *
 * On load it logs, in this order, and then stays loaded:
 *   attacker: direct port read 0x%08x    its own inl(0x5100)
 *   attacker: jump into guarded 0x%08x   guarded.ko's exported gm_read_secret(), called
 *                                        directly: into the middle of the guarded module,
 *                                        without the ENTER crossing of its entry points
 *   attacker: forged enter ret=%ld       a hand-made GUARD_ENTER (RAX 0x3200) for guarded's
 *                                        entry 2 (gm_read) with its tag 0x6d67, RCX pointing
 *                                        at a stack slot that holds a kernel text address (this
 *                                        function's return address); a GEARS VMM refuses it
 *                                        and RAX comes back as -1
 * A VMM that enforces guarded modules is expected to stop or refuse the first two as well;
 * what it does to them (fault, kill, a fake value) is its business, not this module's.
 */
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <asm/io.h>

#define GM_PORT 0x5100
#define GM_HC_ENTER 0x3200UL
#define GM_TAG 0x6d67UL
#define GM_ID_GM_READ 2UL

/* Exported by guarded.ko (the build gives modpost its Module.symvers). */
extern u32 gm_read_secret(void);

static int __init attacker_init(void)
{
	unsigned long slot = (unsigned long)__builtin_return_address(0);
	unsigned long ret = GM_HC_ENTER;

	pr_info("attacker: direct port read 0x%08x\n", inl(GM_PORT));
	pr_info("attacker: jump into guarded 0x%08x\n", gm_read_secret());
	/* The slot must be in memory: its address goes in RCX. */
	asm volatile("outb %%al, $0xec"
		     : "+a"(ret)
		     : "b"(GM_ID_GM_READ), "c"(&slot), "d"(GM_TAG), "m"(slot)
		     : "memory");
	pr_info("attacker: forged enter ret=%ld\n", (long)ret);
	return 0;
}

static void __exit attacker_exit(void)
{
}

module_init(attacker_init);
module_exit(attacker_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("GEARS test: tries to reach guarded.ko's port without a crossing");
