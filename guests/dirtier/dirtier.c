/*
 * dirtier.elf: a multiboot guest for live-migration tests. It keeps writing a region of
 * `mib=N` MiB (default 64) at 16 MiB, one page after another, each page filled with words
 * derived from the page number and that page's own generation (kept in its first word),
 * and prints "seq N" after every `pages=P` pages written (default 256), with no pause.
 * Every `verify=V` lines (default 64) it checks the whole region against the rule and
 * prints "verify ok N pages" or "verify FAIL page X": after a migration the memory it
 * finds must be exactly what it wrote. With `step=T` it starts a line's writes only every
 * T TSC ticks (a paced dirty rate, for benchmarks); by default it never waits. With
 * `light=1` it writes only each page's first word (cheap dirtying; no verification).
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

#define REGION 0x1000000u

static uint32_t word(uint32_t page, uint32_t gen, uint32_t i)
{
	uint32_t x = page * 2654435761u ^ gen * 40503u ^ i * 2246822519u;
	x ^= x >> 15;
	return x * 2654435761u;
}

static void fill(volatile uint32_t *p, uint32_t page, uint32_t gen)
{
	p[0] = gen;
	for (uint32_t i = 1; i < 1024; i++)
		p[i] = word(page, gen, i);
}

static int check(volatile uint32_t *p, uint32_t page)
{
	uint32_t gen = p[0];
	for (uint32_t i = 1; i < 1024; i++)
		if (p[i] != word(page, gen, i))
			return 0;
	return 1;
}

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	const struct mb_info *mbi = mb_ptr(info);
	const char *cmdline = 0;

	(void)eflags;
	uart_init(COM1);
	if (magic == MB_BOOTLOADER_MAGIC && info && (mbi->flags & MB_INFO_CMDLINE))
		cmdline = mb_ptr(mbi->cmdline);
	uint32_t npages = cmdline_u32(cmdline, "mib", 64) * 256;
	uint32_t per_line = cmdline_u32(cmdline, "pages", 256);
	uint32_t verify = cmdline_u32(cmdline, "verify", 64);
	uint64_t step = cmdline_u32(cmdline, "step", 0);
	uint32_t light = cmdline_u32(cmdline, "light", 0);
	if (light)
		verify = 0;
	volatile uint32_t *region = phys_ptr(REGION);

	kprintf("dirtier start %u pages\n", npages);
	for (uint32_t p = 0; p < npages; p++)
		fill(region + p * 1024, p, 0);
	uint32_t page = 0, seq = 0;
	uint64_t next = rdtsc();
	for (;;) {
		if (step) {
			while (rdtsc() < next)
				;
			next += step;
		}
		for (uint32_t k = 0; k < per_line; k++) {
			volatile uint32_t *pp = region + page * 1024;
			if (light)
				pp[0] = pp[0] + 1;
			else
				fill(pp, page, pp[0] + 1);
			page = (page + 1) % npages;
		}
		seq++;
		kprintf("seq %u\n", seq);
		if (verify && seq % verify == 0) {
			uint32_t bad = npages;
			for (uint32_t p = 0; p < npages && bad == npages; p++)
				if (!check(region + p * 1024, p))
					bad = p;
			if (bad == npages)
				kprintf("verify ok %u pages\n", npages);
			else
				kprintf("verify FAIL page %u\n", bad);
		}
	}
}
