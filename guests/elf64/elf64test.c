/*
 * elf64test.elf: a 64-bit ELF the VMM enters directly in long mode
 * (identity-mapped first 4 GiB, flat GDT, interrupts off). Checks the
 * state it finds and exits with 0x40 on success (VMM status 129), 1 on
 * failure (VMM status 3).
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

#define MSR_EFER  0xc0000080
#define EFER_LMA  (1u << 10)
#define CR0_PG    (1ul << 31)
#define CR4_PAE   (1ul << 5)

void main64(uint64_t rax, uint64_t rbx);

static unsigned passed, failed;

static void __attribute__((format(printf, 3, 4)))
result(int ok, const char *what, const char *detail, ...)
{
	va_list ap;

	if (ok) {
		passed++;
		kprintf("PASS %s\n", what);
		return;
	}
	failed++;
	kprintf("FAIL %s (", what);
	va_start(ap, detail);
	kvprintf(detail, ap);
	va_end(ap);
	kprintf(")\n");
}

/* Write a pattern over a 16-byte window, read it back, restore it. */
static void test_ram(uint64_t addr, const char *what)
{
	volatile uint64_t *p = phys_ptr(addr);
	uint64_t saved[2] = { p[0], p[1] };
	uint64_t want0 = 0x0123456789abcdefull ^ addr, want1 = ~want0;

	p[0] = want0;
	p[1] = want1;
	uint64_t got0 = p[0], got1 = p[1];
	p[0] = saved[0];
	p[1] = saved[1];
	result(got0 == want0 && got1 == want1, what,
	       "at 0x%llx read 0x%llx 0x%llx", (unsigned long long)addr,
	       (unsigned long long)got0, (unsigned long long)got1);
}

/* In 64-bit mode a push moves RSP by 8 (4 in compatibility mode). */
static uint64_t push_width(void)
{
	uint64_t before, after;

	__asm__ volatile("movq %%rsp, %0\n\t"
			 "pushq $0\n\t"
			 "movq %%rsp, %1\n\t"
			 "addq $8, %%rsp"
			 : "=&r"(before), "=&r"(after)
			 :
			 : "memory");
	return before - after;
}

void main64(uint64_t rax, uint64_t rbx)
{
	const struct mb_info *mbi = NULL;
	uint64_t efer = rdmsr(MSR_EFER);
	unsigned long cr0 = read_cr0(), cr4 = read_cr4();
	uint16_t cs;

	uart_init(COM1);
	kprintf("elf64: long mode entered\n");

	result(efer & EFER_LMA, "efer.lma", "efer=0x%llx",
	       (unsigned long long)efer);
	result(cr0 & CR0_PG, "cr0.pg", "cr0=0x%lx", cr0);
	result(cr4 & CR4_PAE, "cr4.pae", "cr4=0x%lx", cr4);

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	kprintf("elf64: cs=0x%x\n", cs);
	uint64_t width = push_width();
	result(width == 8, "cs 64-bit", "push moved rsp by %llu",
	       (unsigned long long)width);

	result(rax == MB_BOOTLOADER_MAGIC, "magic", "rax=0x%llx",
	       (unsigned long long)rax);
	if (rbx && rbx < 0x100000000ull)
		mbi = mb_ptr((uint32_t)rbx);
	result(mbi != NULL, "info pointer", "rbx=0x%llx",
	       (unsigned long long)rbx);

	if (mbi) {
		kprintf("elf64: cmdline '%s'\n", mb_cmdline(mbi));
		if (mbi->flags & MB_INFO_MEM)
			kprintf("elf64: mem_upper %u KiB\n", mbi->mem_upper);
		result(mbi->flags & MB_INFO_MEM, "mem info", "flags 0x%x",
		       mbi->flags);
	}

	test_ram(0x200000, "ram 0x200000");
	if (mbi && (mbi->flags & MB_INFO_MEM) && mbi->mem_upper) {
		uint64_t top = (uint64_t)mbi->mem_upper * 1024 + 0x100000 - 4096;
		if (top + 4096 <= 0x100000000ull)
			test_ram(top, "ram last page");
		else
			kprintf("elf64: last page 0x%llx above 4 GiB, skipped\n",
				(unsigned long long)top);
	}

	kprintf("elf64: %u passed, %u failed\n", passed, failed);
	debug_exit(failed ? 1 : 0x40);
}
