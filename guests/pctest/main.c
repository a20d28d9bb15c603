/*
 * pctest: a multiboot test kernel for the PC platform devices (8259 pair,
 * 8254, local APIC and timer, I/O APIC, SMP start-up and IPIs, MP table,
 * RTC/CMOS, fw_cfg, pc-testdev, i8042 reset).
 *
 * Command line: test=a,b,c (default all)  cpus=N (default 1)
 *               bench=pit|lapic|ipi|idle n=N hz=R ms=M (see bench.c)
 *               ram_mib=N (expected RAM)  sipi=each|bcast (SMP start-up)
 *               iret=1 (return from interrupts with IRET, see cpu.S)
 *               isr_check=0 (only report LAPIC ISR bits clear in handlers)
 *               spin=SECONDS (after the tests, busy every core for SECONDS,
 *               1..600, of TSC time; see run_spin() in smp.c)
 *
 * Output on COM1: "PASS name", "FAIL name: detail" or "SKIP name: why"
 * per test, then "pctest: N passed, M failed", then outl(failed ? 1 : 0)
 * to port 0xf4. See guests/README.md.
 */
#include "multiboot.h"
#include "pctest.h"

uint32_t opt_cpus = 1, opt_ram_mib;
int opt_ram_given, opt_isr_check = 1;
char opt_sipi[16];

static char cmdline[1024];
static char opt_tests[512];
static uint32_t opt_spin; /* spin=SECONDS, 0: none */
static uint32_t mb_flags, mb_mem_lower, mb_mem_upper;

static unsigned n_passed, n_failed, n_skipped;

/* ------------------------------------------------------------ results */

static const char *cur_name;
static int cur_failed, cur_skipped;
static char cur_detail[512];
static unsigned cur_len;

static void detail_putc(char c, void *ctx)
{
	(void)ctx;
	if (cur_len + 1 < sizeof(cur_detail)) {
		cur_detail[cur_len++] = c;
		cur_detail[cur_len] = 0;
	}
}

static void detail_add(const char *fmt, va_list ap)
{
	if (cur_len) {
		detail_putc(';', NULL);
		detail_putc(' ', NULL);
	}
	vformat(detail_putc, NULL, fmt, ap);
}

void t_fail(const char *fmt, ...)
{
	va_list ap;

	cur_failed++;
	va_start(ap, fmt);
	detail_add(fmt, ap);
	va_end(ap);
}

void t_skip(const char *fmt, ...)
{
	va_list ap;

	cur_skipped = 1;
	va_start(ap, fmt);
	detail_add(fmt, ap);
	va_end(ap);
}

int t_failed(void)
{
	return cur_failed;
}

static void t_begin(const char *name)
{
	cur_name = name;
	cur_failed = cur_skipped = 0;
	cur_len = 0;
	cur_detail[0] = 0;
}

static void t_end(void)
{
	if (cur_failed) {
		n_failed++;
		kprintf("FAIL %s: %s\n", cur_name, cur_detail);
	} else if (cur_skipped) {
		n_skipped++;
		kprintf("SKIP %s: %s\n", cur_name, cur_detail);
	} else {
		n_passed++;
		kprintf("PASS %s\n", cur_name);
	}
}

void finish(void)
{
	cli();
	if (n_skipped)
		kprintf("pctest: %u skipped\n", n_skipped);
	kprintf("pctest: %u passed, %u failed\n", n_passed, n_failed);
	debug_exit(n_failed ? 1 : 0);
}

void fatal(const char *fmt, ...)
{
	va_list ap;

	cli();
	kprintf("FAIL %s: ", cur_name ? cur_name : "pctest");
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	kprintf("\n");
	n_failed++;
	finish();
}

/* ------------------------------------------------------------ tests */

struct test {
	const char *name;
	void (*fn)(void);
	int in_all;
};

/* Run order; i8042_reset must stay last. */
static const struct test tests[] = {
	{ "mptable", t_mptable, 1 },
	{ "fw_cfg", t_fw_cfg, 1 },
	{ "cmos_mem", t_cmos_mem, 1 },
	{ "rtc", t_rtc, 1 },
	{ "spurious", t_spurious, 1 },
	{ "pit_pic", t_pit_pic, 1 },
	{ "rtc_periodic", t_rtc_periodic, 1 },
	{ "pit_ioapic", t_pit_ioapic, 1 },
	{ "lapic_oneshot", t_lapic_oneshot, 1 },
	{ "lapic_periodic", t_lapic_periodic, 1 },
	{ "tsc_deadline", t_tsc_deadline, 1 },
	{ "self_ipi", t_self_ipi, 1 },
	{ "testdev", t_testdev, 1 },
	{ "level_irr", t_level_irr, 1 },
	{ "smp", t_smp, 1 },
	{ "ipi", t_ipi, 1 },
	{ "i8042_reset", t_i8042_reset, 0 },
};
#define NTESTS (sizeof(tests) / sizeof(tests[0]))

static int selected[NTESTS];

/* Unknown names count as failures ("FAIL test: unknown test ..."). */
static void select_tests(const char *list)
{
	const char *p = list;

	while (*p) {
		const char *w = p;
		while (*p && *p != ',')
			p++;
		size_t len = (size_t)(p - w);
		if (*p == ',')
			p++;
		if (!len)
			continue;
		if (len == 3 && !strncmp(w, "all", 3)) {
			for (unsigned i = 0; i < NTESTS; i++)
				if (tests[i].in_all)
					selected[i] = 1;
			continue;
		}
		int found = 0;
		for (unsigned i = 0; i < NTESTS; i++) {
			if (strlen(tests[i].name) == len &&
			    !strncmp(tests[i].name, w, len)) {
				selected[i] = found = 1;
				break;
			}
		}
		if (!found) {
			char name[64];
			if (len > sizeof(name) - 1)
				len = sizeof(name) - 1;
			memcpy(name, w, len);
			name[len] = 0;
			n_failed++;
			kprintf("FAIL test: unknown test '%s'\n", name);
		}
	}
}

static int get_u32(const char *key, uint32_t *out)
{
	char buf[24];
	uint32_t v;

	if (!cmdline_get(cmdline, key, buf, sizeof(buf)))
		return 0;
	if (!parse_u32(buf, strlen(buf), &v)) {
		kprintf("pctest: ignoring %s=%s (not a decimal number)\n", key,
			buf);
		return 0;
	}
	*out = v;
	return 1;
}

static void platform_init(void)
{
	uint32_t a, b, c, d;

	cpuid(1, &a, &b, &c, &d);
	have_apic = (d >> 9) & 1;
	if (have_apic) {
		uint64_t base = rdmsr(0x1b);
		if (!(base & (1u << 11))) {
			kprintf("pctest: IA32_APIC_BASE 0x%llx has the APIC "
				"disabled; enabling it\n",
				(unsigned long long)base);
			base |= 1u << 11;
			wrmsr(0x1b, base);
		}
		lapic_base = (uint32_t)base & 0xfffff000u;
		lapic_setup();
		bsp_apic_id = lapic_id();
		kprintf("pctest: lapic base 0x%x id %u version 0x%x bsp=%u\n",
			lapic_base, bsp_apic_id, lapic_read(LAPIC_VER),
			(unsigned)((base >> 8) & 1));
	} else {
		kprintf("pctest: CPUID.1:EDX.APIC is clear\n");
	}

	/* Mask every I/O APIC pin; tests unmask what they use. */
	unsigned pins = ioapic_pins();
	uint32_t idr = ioapic_read(0), ver = ioapic_read(1);
	kprintf("pctest: ioapic id 0x%x version 0x%x pins %u\n", idr, ver, pins);
	if (pins > 64)
		pins = 64;
	for (unsigned i = 0; i < pins; i++)
		ioapic_route(i, RED_MASKED | 0xf0, bsp_apic_id);
}

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	(void)eflags;

	/* Copy what we need out of the multiboot info before touching RAM. */
	if (magic == MB_BOOTLOADER_MAGIC && info) {
		const struct mb_info *mbi = mb_ptr(info);
		const char *cl = mb_cmdline(mbi);
		size_t i;

		mb_flags = mbi->flags;
		mb_mem_lower = mbi->mem_lower;
		mb_mem_upper = mbi->mem_upper;
		for (i = 0; i < sizeof(cmdline) - 1 && cl[i]; i++)
			cmdline[i] = cl[i];
		cmdline[i] = 0;
	}

	uart_init(COM1);
	kprintf("pctest: start, cmdline '%s'\n", cmdline);
	if (magic != MB_BOOTLOADER_MAGIC)
		kprintf("pctest: bad multiboot magic 0x%x\n", magic);
	if (mb_flags & MB_INFO_MEM)
		kprintf("pctest: mem_lower %u KiB mem_upper %u KiB\n",
			mb_mem_lower, mb_mem_upper);

	get_u32("cpus", &opt_cpus);
	opt_ram_given = get_u32("ram_mib", &opt_ram_mib);
	if (!cmdline_get(cmdline, "sipi", opt_sipi, sizeof(opt_sipi)))
		opt_sipi[0] = 0;
	uint32_t v;
	if (get_u32("iret", &v))
		use_iret = v != 0;
	if (get_u32("isr_check", &v))
		opt_isr_check = v != 0;
	if (!cmdline_get(cmdline, "test", opt_tests, sizeof(opt_tests)) ||
	    !opt_tests[0])
		memcpy(opt_tests, "all", 4);
	int spin_bad = 0;
	char spin[24];
	if (cmdline_get(cmdline, "spin", spin, sizeof(spin))) {
		if (strlen(spin) > 3 ||
		    !parse_u32(spin, strlen(spin), &opt_spin) ||
		    opt_spin < 1 || opt_spin > 600) {
			kprintf("FAIL spin: spin=%s is not a whole number of "
				"seconds in 1..600\n", spin);
			spin_bad = 1;
			opt_spin = 0;
		}
	}
	if (opt_cpus < 1 || opt_cpus > PCT_MAX_CPUS) {
		kprintf("pctest: cpus=%u out of range 1..%u, using 1\n",
			opt_cpus, PCT_MAX_CPUS);
		opt_cpus = 1;
	}

	load_gdt();
	idt_init();
	pic_init(0xff, 0xff);
	time_init();
	platform_init();

	char bench[16];
	if (cmdline_get(cmdline, "bench", bench, sizeof(bench))) {
		uint32_t n = 1000, hz = 0, ms = 0;
		get_u32("n", &n);
		get_u32("hz", &hz);
		get_u32("ms", &ms);
		run_bench(bench, n, hz, ms);
	}

	n_failed += spin_bad;
	select_tests(opt_tests);
	for (unsigned i = 0; i < NTESTS; i++) {
		if (!selected[i])
			continue;
		quiesce();
		t_begin(tests[i].name);
		tests[i].fn();
		quiesce();
		t_end();
	}
	if (opt_spin) {
		/* Not a test: only a FAIL line if something went wrong. */
		quiesce();
		t_begin("spin");
		run_spin(opt_spin);
		cli();
		if (cur_failed)
			t_end();
	}
	finish();
}
