/*
 * mbtest: the multiboot test kernel (mbtest.elf, and mbaout.bin through the
 * a.out kludge). The command line word "test=NAME" picks a scenario (see
 * README.md); results go to COM1 as "PASS what" / "FAIL what (detail)".
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

#define EFLAGS_IF 0x200
#define CR0_PE    0x1
#define CR0_PG    0x80000000

#define UNCLAIMED_PORT  0x2f0
#define BENCH_PORT      0x2f4
#define UNCLAIMED_MMIO  0xfed00000
#define GENERIC_PORT    0x510

extern const uint32_t mb_header[];

struct boot {
	uint32_t magic, info, eflags;
	const struct mb_info *mbi; /* NULL unless the loader looks sane */
	const char *cmdline;
};

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

static void test_entry_state(const struct boot *b)
{
	uint32_t cr0 = read_cr0();

	result(b->magic == MB_BOOTLOADER_MAGIC, "magic", "eax=0x%08x", b->magic);
	result(b->info != 0, "info pointer", "ebx=0");
	result((cr0 & CR0_PE) && !(cr0 & CR0_PG), "cr0 pe=1 pg=0", "cr0=0x%08x",
	       cr0);
	result(!(b->eflags & EFLAGS_IF), "eflags.if=0", "eflags=0x%08x",
	       b->eflags);
}

/*
 * CS, DS and SS must all see the same flat address space: reading the
 * multiboot header through each of them gives its magic, and linear 0 is
 * readable through DS. (No LSL/LAR: KVM's instruction emulator, which runs
 * these guests on some hosts, does not implement them.)
 */
static void test_segments(void)
{
	uint32_t cs, ds, ss, via_cs, via_ds, via_ss;
	uint32_t addr = (uint32_t)(uintptr_t)mb_header;
	uint8_t zero;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	__asm__ volatile("mov %%ds, %0" : "=r"(ds));
	__asm__ volatile("mov %%ss, %0" : "=r"(ss));
	kprintf("mbtest: cs=0x%x ds=0x%x ss=0x%x\n", cs & 0xffff, ds & 0xffff,
		ss & 0xffff);

	__asm__ volatile("movb %%ds:(%1), %0" : "=q"(zero) : "r"(0));
	__asm__ volatile("movl %%cs:(%1), %0" : "=r"(via_cs) : "r"(addr));
	__asm__ volatile("movl %%ds:(%1), %0" : "=r"(via_ds) : "r"(addr));
	__asm__ volatile("movl %%ss:(%1), %0" : "=r"(via_ss) : "r"(addr));
	(void)zero;

	result(via_cs == MB_HEADER_MAGIC && via_ds == MB_HEADER_MAGIC &&
		       via_ss == MB_HEADER_MAGIC,
	       "flat segments", "header reads cs 0x%08x ds 0x%08x ss 0x%08x",
	       via_cs, via_ds, via_ss);
}

static void test_memory(const struct mb_info *mbi)
{
	if (!(mbi->flags & MB_INFO_MEM)) {
		result(0, "mem_lower", "flags bit 0 clear");
		result(0, "mem_upper", "flags bit 0 clear");
	} else {
		kprintf("mbtest: mem_lower %u KiB mem_upper %u KiB\n",
			mbi->mem_lower, mbi->mem_upper);
		result(mbi->mem_lower == 639 || mbi->mem_lower == 640,
		       "mem_lower", "mem_lower=%u", mbi->mem_lower);
		result(mbi->mem_upper > 0, "mem_upper", "mem_upper=0");
	}

	if (!(mbi->flags & MB_INFO_MMAP)) {
		result(0, "mmap", "flags bit 6 clear");
		return;
	}
	uint64_t ram = 0;
	int at_1m = 0;
	mb_mmap_foreach(mbi, e) {
		kprintf("mbtest: mmap base 0x%llx len 0x%llx type %u\n",
			(unsigned long long)e->addr, (unsigned long long)e->len,
			e->type);
		if (e->type != MB_MMAP_RAM)
			continue;
		ram += e->len;
		if (e->addr == 0x100000)
			at_1m = 1;
	}
	kprintf("mbtest: ram %u KiB\n", (unsigned)(ram >> 10));
	result(at_1m, "mmap", "no type-1 region starting at 0x100000");
}

static void show_modules(const struct mb_info *mbi)
{
	if (!(mbi->flags & MB_INFO_MODS)) {
		kprintf("mbtest: modules 0\n");
		return;
	}
	const struct mb_module *mod = mb_ptr(mbi->mods_addr);
	kprintf("mbtest: modules %u\n", mbi->mods_count);
	for (uint32_t i = 0; i < mbi->mods_count; i++, mod++) {
		const char *data = mb_ptr(mod->mod_start);
		uint32_t size = mod->mod_end - mod->mod_start;
		char first[61];
		uint32_t n = 0;

		while (n < size && n < sizeof(first) - 1 && data[n] != '\n' &&
		       data[n] != '\r' && data[n] != '\0') {
			char c = data[n];
			first[n++] = (c >= ' ' && c <= '~') ? c : '.';
		}
		first[n] = '\0';
		kprintf("mbtest: module '%s' size %u first-line '%s'\n",
			mod->string ? (const char *)mb_ptr(mod->string) : "",
			size, first);
	}
}

static void test_page0(void)
{
	volatile uint8_t *p = phys_ptr(0x10);
	uint8_t saved[16];
	int bad = -1;

	for (int i = 0; i < 16; i++) {
		saved[i] = p[i];
		p[i] = (uint8_t)(0xa5 ^ (i * 0x11));
	}
	for (int i = 0; i < 16 && bad < 0; i++)
		if (p[i] != (uint8_t)(0xa5 ^ (i * 0x11)))
			bad = i;
	result(bad < 0, "page0 ram", "byte 0x%x reads 0x%02x",
	       bad < 0 ? 0 : 0x10 + bad, bad < 0 ? 0 : p[bad]);
	for (int i = 0; i < 16; i++)
		p[i] = saved[i];
}

static void test_unclaimed(void)
{
	uint8_t b = inb(UNCLAIMED_PORT);
	uint16_t w = inw(UNCLAIMED_PORT);
	uint32_t l = inl(UNCLAIMED_PORT);

	result(b == 0xff && w == 0xffff && l == 0xffffffff, "unclaimed port",
	       "inb 0x%x inw 0x%x inl 0x%x", b, w, l);

	uint32_t m = *(volatile uint32_t *)phys_ptr(UNCLAIMED_MMIO);
	result(m == 0xffffffff, "unclaimed mmio", "read 0x%08x at 0x%x", m,
	       UNCLAIMED_MMIO);
}

static void test_debug_ports(void)
{
	port_puts(0xe9, "hello bochs\n");
	port_puts(0x402, "info port\n");
	kprintf("mbtest: wrote bochs debug ports 0xe9 and 0x402\n");

	port_puts(0xc0c0, "hello osdebug\n");
	outl(0x1234, 0x99);
	kprintf("mbtest: wrote os_debug 0xc0c0 and heartbeat 0x99\n");

	outb(0x5a, GENERIC_PORT);
	uint8_t v = inb(GENERIC_PORT);
	result(v == 0, "generic ignore reads 0", "read 0x%02x", v);

	uart_init(COM2);
	uart_puts(COM2, "com2 says hi\n");
	kprintf("mbtest: wrote com2\n");
}

static void run_all(const struct boot *b, int have_exit, uint32_t exit_value)
{
	test_entry_state(b);
	test_segments();
	if (b->mbi) {
		test_memory(b->mbi);
		kprintf("mbtest: cmdline '%s'\n", b->cmdline);
		show_modules(b->mbi);
	} else {
		result(0, "multiboot info", "not usable, skipped memory checks");
	}
	test_page0();
	test_unclaimed();
	test_debug_ports();

	kprintf("mbtest: %u passed, %u failed\n", passed, failed);
	debug_exit(have_exit ? exit_value : failed ? 1 : 0);
}

static void run_echo(void)
{
	char line[128];
	unsigned n = 0;

	kprintf("mbtest: echo ready\n");
	for (;;) {
		char c = (char)uart_getc(COM1);
		if (c == '\n' || c == '\r')
			break;
		if (c >= 'a' && c <= 'z')
			c = (char)(c - 'a' + 'A');
		if (n < sizeof(line) - 1)
			line[n++] = c;
	}
	line[n] = '\0';
	kprintf("ECHO: %s\n", line);
	debug_exit(0);
}

static void run_triple(void)
{
	static const struct {
		uint16_t limit;
		uint32_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };

	/*
	 * #UD with an empty IDT: #UD -> #GP -> #DF -> triple fault. (Not
	 * int3: KVM's instruction emulator cannot emulate INT n in protected
	 * mode and stops with an internal error instead.)
	 */
	kprintf("mbtest: triple fault next\n");
	__asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt) : "memory");
	kprintf("mbtest: still running after ud2 with an empty IDT\n");
	debug_exit(1);
}

static void run_iobench(uint32_t n)
{
	kprintf("mbtest: iobench %u\n", n);
	if (n)
		__asm__ volatile("1:\n\t"
				 "outb %%al, %%dx\n\t"
				 "decl %%ecx\n\t"
				 "jnz 1b"
				 : "+c"(n)
				 : "a"(0), "d"(BENCH_PORT)
				 : "memory");
	/* bench/bench.py times the gap between the line above and this one. */
	kprintf("mbtest: iobench done\n");
	debug_exit(0);
}

static uint32_t number_word(const char *cmdline, const char *key, uint32_t dflt,
			    int *found)
{
	char buf[16];
	uint32_t v;

	if (found)
		*found = 0;
	if (!cmdline_get(cmdline, key, buf, sizeof(buf)) ||
	    !parse_u32(buf, strlen(buf), &v))
		return dflt;
	if (found)
		*found = 1;
	return v;
}

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	struct boot b = { magic, info, eflags, NULL, "" };
	char test[32] = "all";
	int have_exit;
	uint32_t exit_value;

	if (magic == MB_BOOTLOADER_MAGIC && info) {
		b.mbi = mb_ptr(info);
		b.cmdline = mb_cmdline(b.mbi);
	}
	cmdline_get(b.cmdline, "test", test, sizeof(test));
	exit_value = number_word(b.cmdline, "exit", 0, &have_exit);

	if (strcmp(test, "quick") == 0)
		debug_exit(0);

	uart_init(COM1);
	if (strcmp(test, "all") == 0) {
		run_all(&b, have_exit, exit_value);
	} else if (strcmp(test, "halt") == 0) {
		kprintf("mbtest: halting\n");
		halt_forever();
	} else if (strcmp(test, "exit") == 0) {
		uint32_t n = have_exit ? exit_value : 7;
		kprintf("mbtest: exiting with %u\n", n);
		debug_exit(n);
	} else if (strcmp(test, "echo") == 0) {
		run_echo();
	} else if (strcmp(test, "triple") == 0) {
		run_triple();
	} else if (strcmp(test, "iobench") == 0) {
		run_iobench(number_word(b.cmdline, "n", 100000, NULL));
	} else if (strcmp(test, "regs") == 0) {
		kprintf("mbtest: eax=0x%08x ebx=0x%08x flags=0x%08x eflags=0x%08x\n",
			magic, info, b.mbi ? b.mbi->flags : 0, eflags);
		debug_exit(0);
	}
	result(0, "test", "unknown test '%s'", test);
	debug_exit(1);
}
