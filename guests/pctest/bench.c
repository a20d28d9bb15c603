/*
 * pctest benchmarks (bench/platform.sh): each mode runs a fixed amount of work and leaves
 * through the debug-exit port with 0. It prints "pctest: bench start" when the measured part
 * begins, so the host measures wall and CPU time from that line to the exit.
 *   bench=pit n=N hz=R     N IRQ0s from the PIT at R Hz through the 8259
 *   bench=lapic n=N hz=R   N LAPIC periodic-timer interrupts at R Hz (1 GHz APIC clock)
 *   bench=ipi n=N          N IPI round trips BSP -> AP 1 -> BSP (needs 2 cores)
 *   bench=idle ms=M        halt with interrupts on until a LAPIC one-shot M ms later
 */
#include "pctest.h"

extern volatile uint32_t ap_apic_ids[PCT_MAX_CPUS];

/* Sleep until counter *c reaches target. */
static void wait_for(volatile uint32_t *c, uint32_t target)
{
	while (*c < target)
		__asm__ volatile("sti; hlt; cli" : : : "memory");
}

static void bench_pit(uint32_t n, uint32_t hz)
{
	uint32_t base = irq_count[VEC_PIC_MASTER];

	pic_init(0xff, 0xff);
	lapic_setup(); /* LINT0 ExtINT */
	pit_periodic(hz);
	kprintf("pctest: bench start\n");
	pic_set_mask(0xfe, 0xff);
	wait_for(&irq_count[VEC_PIC_MASTER], base + n);
	pic_set_mask(0xff, 0xff);
	pit_stop();
}

static void bench_lapic(uint32_t n, uint32_t hz)
{
	uint32_t base = irq_count[VEC_LAPIC_PER];

	lapic_write(LAPIC_TMR_DIV, 0xb); /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER, (1u << 17) | VEC_LAPIC_PER);
	kprintf("pctest: bench start\n");
	lapic_write(LAPIC_TMR_INIT, 1000000000u / hz);
	wait_for(&irq_count[VEC_LAPIC_PER], base + n);
	lapic_write(LAPIC_TMR_INIT, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_PER);
}

static void bench_ipi(uint32_t n)
{
	volatile uint32_t *pong = &irq_count[VEC_PONG_BASE + 1];

	t_smp(); /* brings the APs up */
	if (t_failed() || !ap_apic_ids[1])
		fatal("bench=ipi: application processors did not start");
	kprintf("pctest: bench start\n");
	for (uint32_t i = 0; i < n; i++) {
		uint32_t before = *pong;
		lapic_ipi(ap_apic_ids[1], ICR_ASSERT | ICR_FIXED | VEC_PING);
		wait_for(pong, before + 1);
	}
}

static void bench_idle(uint32_t ms)
{
	uint32_t base = irq_count[VEC_LAPIC_ONE];

	lapic_write(LAPIC_TMR_DIV, 0x3); /* divide by 16: 62.5 MHz */
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC_ONE);
	kprintf("pctest: bench start\n");
	lapic_write(LAPIC_TMR_INIT, ms * 62500u);
	wait_for(&irq_count[VEC_LAPIC_ONE], base + 1);
}

void run_bench(const char *mode, uint32_t n, uint32_t hz, uint32_t ms)
{
	cli();
	if (!strcmp(mode, "pit"))
		bench_pit(n, hz ? hz : 1000);
	else if (!strcmp(mode, "lapic"))
		bench_lapic(n, hz ? hz : 10000);
	else if (!strcmp(mode, "ipi"))
		bench_ipi(n);
	else if (!strcmp(mode, "idle"))
		bench_idle(ms ? ms : 5000);
	else
		fatal("unknown bench '%s'", mode);
	cli();
	kprintf("pctest: bench %s done\n", mode);
	debug_exit(0);
}
