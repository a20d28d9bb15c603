/* symtest test=bench (exit costs) and test=time (a host interval). */
#include "symtest.h"

#define BENCH_PORT 0x5f0 /* unclaimed: the plain port-exit floor */

static void report(const char *what, uint64_t ticks, uint32_t n)
{
	uint64_t cyc = udiv64(ticks, n);
	uint64_t ns = udiv64(tsc_to_ns(ticks), n);

	kprintf("bench: %s %llu cycles %llu ns\n", what,
		(unsigned long long)cyc, (unsigned long long)ns);
}

static uint64_t bench_port(uint32_t n)
{
	uint64_t t0 = rdtsc();

	for (uint32_t i = 0; i < n; i++)
		__asm__ volatile("outb %%al, %%dx"
				 : : "a"(0), "d"(BENCH_PORT) : "memory");
	return rdtsc() - t0;
}

/*
 * N TEST hypercalls; with VIA_PORT the same loop and register traffic to an
 * unclaimed port (nothing answers, so the registers come back unchanged):
 * the floor a hypercall is compared with. Where the backend emulates guest
 * kernel code (KVM here), the loop's own instructions cost as much as an exit.
 */
static uint64_t bench_hcall(enum hc_via via, uint32_t n, uint32_t *bad)
{
	uint32_t want_a = via == VIA_PORT ? HC_TEST : 0;
	uint32_t want_b = via == VIA_PORT ? 1 : 15;
	uint64_t t0 = rdtsc();

	for (uint32_t i = 0; i < n; i++) {
		struct hregs r = { HC_TEST, 1, 2, 3, 4, 5 };
		hcall_full(via, &r);
		if (r.eax != want_a || r.ebx != want_b)
			(*bad)++;
	}
	return rdtsc() - t0;
}

void run_bench(uint32_t n)
{
	uint32_t bad = 0;

	kprintf("symtest: bench n=%u tsc_khz=%u\n", n, tsc_khz);
	report("port-exit", bench_port(n), n);
	report("port-exit-regs", bench_hcall(VIA_PORT, n, &bad), n);
	report("hcall-doorbell", bench_hcall(VIA_DOORBELL, n, &bad), n);
	if (have_vmcall)
		report("hcall-vmcall", bench_hcall(VIA_VMCALL, n, &bad), n);
	else
		kprintf("bench: hcall-vmcall skip\n");
	if (bad)
		kprintf("symtest: %u TEST hypercalls gave a wrong result\n", bad);
	debug_exit(1);
}

/* --------------------------------------------------------- test=time */

#define PM_HZ   3579545u
#define PM_MASK 0xffffffu

static inline int com1_ready(void)
{
	return inb(COM1 + 5) & 1;
}

/*
 * Waits for the next byte on COM1 while reading the PM timer on every
 * round (far more often than its 4.7 s wrap), adding the 24-bit deltas
 * to *ticks. *pm is the last reading.
 */
static void wait_byte(uint16_t pmtmr, uint32_t *pm, uint64_t *ticks)
{
	for (;;) {
		uint32_t now = inl(pmtmr) & PM_MASK;
		*ticks += (now - *pm) & PM_MASK;
		*pm = now;
		if (com1_ready())
			break;
		cpu_relax();
	}
	(void)inb(COM1);
}

void run_time(uint16_t pmtmr)
{
	uint32_t pm;
	uint64_t ticks = 0, t0, t1;

	kprintf("symtest: time pmtmr=0x%x\n", pmtmr);
	kprintf("TIME ready\n");
	pm = inl(pmtmr) & PM_MASK;
	wait_byte(pmtmr, &pm, &ticks);
	t0 = rdtsc();
	pm = inl(pmtmr) & PM_MASK;
	ticks = 0;
	wait_byte(pmtmr, &pm, &ticks);
	t1 = rdtsc();
	uint32_t now = inl(pmtmr) & PM_MASK;
	ticks += (now - pm) & PM_MASK;

	uint32_t khz = hcall(HC_TIME_CPUFREQ, 0, 0, 0, 0, 0);
	uint64_t pm_us = udiv64(ticks * 1000000, PM_HZ);
	kprintf("TIME tsc_us=%llu pm_us=%llu khz=%u\n",
		(unsigned long long)tsc_to_us(t1 - t0),
		(unsigned long long)pm_us, khz);
	debug_exit(1);
}
