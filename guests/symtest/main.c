/*
 * symtest: the guest side of the Palacios-rs hypercall ABI
 * (docs/hypercalls.md): discovery, hypercalls, SymCall and SymMod.
 *
 * Every mode first looks for the interface with CPUID 0x40000100
 * ("PalaciosRsV3") and prints
 *   interface: port=0xec version=N vmcall=0|1 tsc_khz=N
 * Without it: "FAIL detect (no Palacios-rs interface)" and outl(3, 0xf4).
 *
 * Command line (space-separated words):
 *   test=hcall    (default) hypercall checks through the doorbell, VMCALL
 *                 and VMMCALL: "PASS x" / "FAIL x (detail)" / "SKIP x (why)",
 *                 then "symtest: N passed, M failed" and outl(M ? 2 : 1).
 *   test=symcall  registers a SymCall entry (MSRs 0x536-0x540), prints
 *                 "READY symcall count=0x<addr>" and idles with interrupts
 *                 off, polling COM1; on 'q' prints "symtest: upcalls=N",
 *                 "idle: ok" (the idle loop's registers survived) and
 *                 "DONE", then outl(1). SymCall numbers: see sym.c.
 *   test=bench    bench=N (default 20000): cycles and ns per plain port
 *                 exit, doorbell hypercall and VMCALL hypercall; outl(1).
 *   test=time     pmtmr=0xPORT (default 0x608): prints "TIME ready", then
 *                 measures the time between two bytes received on COM1
 *                 with the TSC and the ACPI PM timer; outl(1).
 * A CPU exception outside a SymCall prints
 * "FAIL exception vector N at EIP x" and exits with outl(4).
 */
#include "multiboot.h"
#include "symtest.h"

char cmdline[1024];
uint32_t tsc_khz;
int have_vmcall;

/* A number in decimal, or in hex with a 0x prefix; dflt on junk. */
static uint32_t parse_num(const char *s, uint32_t dflt)
{
	uint32_t v = 0;
	int hex = s[0] == '0' && (s[1] == 'x' || s[1] == 'X');

	if (hex)
		s += 2;
	if (!*s)
		return dflt;
	for (; *s; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = (unsigned)(*s - '0');
		else if (hex && *s >= 'a' && *s <= 'f')
			d = (unsigned)(*s - 'a' + 10);
		else if (hex && *s >= 'A' && *s <= 'F')
			d = (unsigned)(*s - 'A' + 10);
		else
			return dflt;
		v = v * (hex ? 16 : 10) + d;
	}
	return v;
}

static uint32_t get_num(const char *key, uint32_t dflt)
{
	char buf[24];

	if (!cmdline_get(cmdline, key, buf, sizeof(buf)))
		return dflt;
	return parse_num(buf, dflt);
}

/* CPUID discovery; exits with 3 when the interface is missing or odd. */
static void detect(void)
{
	uint32_t a, b, c, d;
	char sig[13];

	cpuid(PRS_CPUID_BASE, &a, &b, &c, &d);
	memcpy(sig, &b, 4);
	memcpy(sig + 4, &c, 4);
	memcpy(sig + 8, &d, 4);
	sig[12] = 0;
	if (memcmp(sig, "PalaciosRsV3", 12) != 0) {
		kprintf("FAIL detect (no Palacios-rs interface)\n");
		debug_exit(3);
	}
	if (a < PRS_CPUID_BASE + 1) {
		kprintf("FAIL detect (highest leaf 0x%x, no 0x%x)\n", a,
			PRS_CPUID_BASE + 1);
		debug_exit(3);
	}
	cpuid(PRS_CPUID_BASE + 1, &a, &b, &c, &d);
	have_vmcall = c & 1;
	tsc_khz = d;
	kprintf("interface: port=0x%x version=%u vmcall=%d tsc_khz=%u\n", a, b,
		have_vmcall, d);
	if (a != PRS_DOORBELL) {
		kprintf("FAIL detect (doorbell port 0x%x, this guest uses 0x%x)\n",
			a, PRS_DOORBELL);
		debug_exit(3);
	}
	if (tsc_khz) {
		tsc_per_ms = tsc_khz;
		tsc_per_us = tsc_khz / 1000 ? tsc_khz / 1000 : 1;
	}
}

uint64_t tsc_to_ns(uint64_t ticks)
{
	if (!tsc_khz)
		return 0;
	/* ticks * 10^6 / kHz, without overflowing for long intervals */
	if (ticks < ((uint64_t)1 << 44))
		return udiv64(ticks * 1000000, tsc_khz);
	return udiv64(ticks, tsc_khz) * 1000000;
}

uint64_t tsc_to_us(uint64_t ticks)
{
	if (!tsc_khz)
		return 0;
	if (ticks < ((uint64_t)1 << 50))
		return udiv64(ticks * 1000, tsc_khz);
	return udiv64(ticks, tsc_khz) * 1000;
}

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	char test[32];

	(void)eflags;
	__asm__ volatile("cli");
	if (magic == MB_BOOTLOADER_MAGIC && info) {
		const char *cl = mb_cmdline(mb_ptr(info));
		size_t i;
		for (i = 0; i < sizeof(cmdline) - 1 && cl[i]; i++)
			cmdline[i] = cl[i];
		cmdline[i] = 0;
	}

	uart_init(COM1);
	kprintf("symtest: start, cmdline '%s'\n", cmdline);
	if (magic != MB_BOOTLOADER_MAGIC)
		kprintf("symtest: bad multiboot magic 0x%x\n", magic);
	load_gdt();
	idt_init();

	detect();

	if (!cmdline_get(cmdline, "test", test, sizeof(test)))
		memcpy(test, "hcall", 6);
	if (!strcmp(test, "hcall"))
		run_hcall_tests();
	if (!strcmp(test, "symcall"))
		run_symcall();
	if (!strcmp(test, "bench")) {
		uint32_t n = get_num("bench", 20000);
		run_bench(n ? n : 1);
	}
	if (!strcmp(test, "time"))
		run_time((uint16_t)get_num("pmtmr", 0x608));
	kprintf("FAIL test (unknown test '%s')\n", test);
	debug_exit(2);
}
