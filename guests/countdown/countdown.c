/*
 * countdown.elf: a multiboot guest for pause, checkpoint and restore tests. It counts
 * down from `from=N` (default 30), one step every `step=T` TSC ticks (default 20000000),
 * printing "countdown N tsc T" on COM1 for each step, then "countdown done" and halts
 * (VMM exit status 0). Between steps it reads the TSC only, so a paused VM stops the
 * count, and a restored one continues it where it was rather than starting again. With
 * `echo=1` it also answers each byte typed on COM1 with "got X".
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	const struct mb_info *mbi = mb_ptr(info);
	const char *cmdline = 0;

	(void)eflags;
	uart_init(COM1);
	if (magic == MB_BOOTLOADER_MAGIC && info && (mbi->flags & MB_INFO_CMDLINE))
		cmdline = mb_ptr(mbi->cmdline);
	uint32_t from = cmdline_u32(cmdline, "from", 30);
	uint32_t step = cmdline_u32(cmdline, "step", 20000000);
	uint32_t echo = cmdline_u32(cmdline, "echo", 0);

	kprintf("countdown start from %u step %u\n", from, step);
	for (uint32_t n = from; n > 0; n--) {
		uint64_t t = rdtsc();
		kprintf("countdown %u tsc %llu\n", n, (unsigned long long)t);
		while (rdtsc() - t < step) {
			if (echo && (inb(COM1 + 5) & 1))
				kprintf("got %c\n", (char)inb(COM1));
		}
	}
	kprintf("countdown done\n");
	__asm__ volatile("cli; hlt");
}
