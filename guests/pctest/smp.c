/* pctest: AP start-up (INIT/SIPI/SIPI), IPIs between CPUs and self-IPIs. */
#include "pctest.h"

volatile uint32_t ap_checked_in;
volatile uint32_t ap_apic_ids[PCT_MAX_CPUS];
volatile uint32_t ap_pings;
static int smp_started;
static const char *smp_mode = "none";

/* ------------------------------------------------------------ spin */

/*
 * spin=SECONDS: every core runs a register-only arithmetic loop with IF=0
 * (no HLT, PAUSE, I/O or memory traffic inside a round) and reads the TSC
 * once per round. Each core times its own SECONDS from when it starts, so
 * the TSCs of different cores need not agree, and nothing depends on how
 * much CPU time a core gets: a descheduled core just finds more TSC time
 * gone at its next read.
 *
 * A round is up to SPIN_MAX (1M) iterations of 5 instructions. Where that
 * is slow (a CPU emulator, KVM emulating the guest) a round could run for
 * seconds and overshoot the end by as much, so rounds start at SPIN_MIN,
 * a round that took under 2.5 ms of TSC time doubles the next one (up to
 * SPIN_MAX) and one over 10 ms halves it (down to SPIN_MIN).
 */
#define SPIN_MAX 1000000u
#define SPIN_MIN 1024u

struct spin_result {
	uint64_t loops;    /* iterations run */
	uint64_t ticks;    /* TSC ticks from the start to the last read */
	uint32_t sink;     /* the loop's result, so it computes something */
	int stuck;         /* the TSC stopped moving */
};

static volatile uint32_t spin_go, spin_started, spin_done;
static volatile uint32_t spin_ticks_lo, spin_ticks_hi;
static struct spin_result spin_res[PCT_MAX_CPUS]; /* by CPU index */

/* One round of n iterations (n > 0), registers only. */
static inline void spin_round(uint32_t *x, uint32_t *y, uint32_t n)
{
	__asm__ volatile("1:\n\t"
			 "addl %0, %1\n\t"
			 "roll $5, %1\n\t"
			 "xorl %1, %0\n\t"
			 "decl %2\n\t"
			 "jnz 1b"
			 : "+r"(*x), "+r"(*y), "+r"(n)
			 :
			 : "cc");
}

/*
 * Spin for `ticks` TSC ticks, or (when `stop` is not NULL) until *stop
 * reaches `target`; `ticks` still bounds that wait.
 */
static void spin_for(uint64_t ticks, volatile uint32_t *stop, uint32_t target,
		     struct spin_result *r)
{
	uint64_t t0 = rdtsc(), now = t0, prev = t0, still = 0;
	uint64_t slow = (uint64_t)tsc_per_ms * 10, fast = slow / 4;
	uint32_t x = 0x9e3779b9u, y = 1, n = SPIN_MIN; /* grows in ~10 rounds */

	r->loops = 0;
	r->stuck = 0;
	for (;;) {
		if (stop && *stop >= target)
			break;
		spin_round(&x, &y, n);
		r->loops += n;
		now = rdtsc();
		if (now - t0 >= ticks)
			break;
		if (now == prev) {
			/* 250M instructions without a TSC tick: it is not
			 * running, and this would never end. */
			still += n;
			if (still >= 50u * SPIN_MAX) {
				r->stuck = 1;
				break;
			}
			continue;
		}
		still = 0;
		if (now - prev > slow && n > SPIN_MIN)
			n /= 2;
		else if (now - prev < fast && n < SPIN_MAX)
			n = n * 2 > SPIN_MAX ? SPIN_MAX : n * 2;
		prev = now;
	}
	r->ticks = now - t0;
	r->sink = x ^ y;
}

static void __attribute__((noreturn)) ap_spin(uint32_t idx)
{
	uint64_t ticks = ((uint64_t)spin_ticks_hi << 32) | spin_ticks_lo;
	struct spin_result r;

	atomic_inc(&spin_started);
	spin_for(ticks, NULL, 0, &r);
	if (idx < PCT_MAX_CPUS)
		spin_res[idx] = r;
	__asm__ volatile("" : : : "memory");
	atomic_inc(&spin_done);
	for (;;)
		__asm__ volatile("cli; hlt" : : : "memory");
}

/* ------------------------------------------------------------ APs */

/*
 * On an AP: answer each ping with a pong to the BSP, on a vector of its
 * own (replies from several APs on one vector could merge in the IRR).
 */
static int h_ping(unsigned v, struct frame *f)
{
	uint32_t id = lapic_id();

	(void)v;
	(void)f;
	atomic_inc(&ap_pings);
	for (uint32_t i = 1; i < PCT_MAX_CPUS; i++) {
		if (ap_apic_ids[i] == id) {
			lapic_ipi(bsp_apic_id,
				  ICR_ASSERT | ICR_FIXED | (VEC_PONG_BASE + i));
			break;
		}
	}
	return 0; /* the dispatcher sends the LAPIC EOI */
}

void ap_main(uint32_t idx)
{
	ap_apic_ids[idx] = lapic_id();
	load_idt();
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
	atomic_inc(&ap_checked_in);
	for (;;) {
		/* IF=0 between the check and HLT: STI's shadow covers HLT,
		 * so the VEC_SPIN IPI that follows spin_go cannot be lost. */
		cli();
		if (spin_go)
			ap_spin(idx);
		__asm__ volatile("sti; hlt" : : : "memory");
	}
}

/* ------------------------------------------------------------ start-up */

static int start_sequence(uint32_t dest, uint32_t shorthand)
{
	uint32_t sipi = ICR_STARTUP | ICR_ASSERT | (TRAMP_ADDR >> 12);
	int ok = 1;

	ok &= lapic_ipi(dest, shorthand | ICR_INIT | ICR_ASSERT | ICR_LEVEL);
	delay_ms(10);
	ok &= lapic_ipi(dest, shorthand | sipi);
	delay_us(200);
	ok &= lapic_ipi(dest, shorthand | sipi);
	delay_us(200);
	return ok;
}

static void smp_bringup(void)
{
	const struct mp_info *m = mp_get();
	uint32_t expect = opt_cpus - 1;
	int bcast, icr_ok = 1;
	unsigned targets = 0;

	if (smp_started)
		return;
	smp_started = 1;
	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}
	irq_handlers[VEC_PING] = h_ping;
	memcpy(phys_ptr(TRAMP_ADDR), tramp_start,
	       (size_t)(tramp_end - tramp_start));

	if (!strcmp(opt_sipi, "bcast"))
		bcast = 1;
	else if (!strcmp(opt_sipi, "each"))
		bcast = 0;
	else
		bcast = !(m->found && m->ncpus >= opt_cpus);

	lapic_setup();
	lapic_write(LAPIC_ESR, 0);
	if (bcast) {
		smp_mode = "broadcast";
		if (expect || m->ncpus > 1)
			icr_ok = start_sequence(0, ICR_ALL_BUT_SELF);
	} else {
		smp_mode = "each MP-table APIC id";
		for (unsigned i = 0; i < m->ncpus && i < MP_MAX_CPUS; i++) {
			if (m->cpu_id[i] == bsp_apic_id)
				continue;
			targets++;
			icr_ok &= start_sequence(m->cpu_id[i], 0);
		}
	}
	if (!icr_ok)
		t_fail("ICR delivery status stayed busy");
	kprintf("pctest: smp: INIT/SIPI/SIPI (%s), trampoline at 0x%x\n",
		smp_mode, TRAMP_ADDR);
	if (expect || targets || bcast) {
		wait_count(&ap_checked_in, expect ? expect : 1, 1000000);
		delay_ms(50); /* late or duplicate check-ins */
	}
}

static int reported(uint32_t id)
{
	if (id == bsp_apic_id)
		return 1;
	for (uint32_t i = 1; i <= ap_checked_in && i < PCT_MAX_CPUS; i++)
		if (ap_apic_ids[i] == id)
			return 1;
	return 0;
}

void t_smp(void)
{
	const struct mp_info *m = mp_get();
	uint32_t n;

	smp_bringup();
	if (!have_apic)
		return;
	n = ap_checked_in;
	kprintf("pctest: cpu 0 apic id %u (bsp)\n", bsp_apic_id);
	for (uint32_t i = 1; i <= n && i < PCT_MAX_CPUS; i++)
		kprintf("pctest: cpu %u apic id %u\n", i, ap_apic_ids[i]);

	if (n != opt_cpus - 1)
		t_fail("%u of %u APs checked in within 1 s", n, opt_cpus - 1);
	for (uint32_t i = 1; i <= n && i < PCT_MAX_CPUS; i++) {
		if (ap_apic_ids[i] == bsp_apic_id)
			t_fail("AP %u reports the BSP's APIC id %u", i,
			       bsp_apic_id);
		for (uint32_t j = 1; j < i; j++)
			if (ap_apic_ids[i] == ap_apic_ids[j])
				t_fail("APs %u and %u both report APIC id %u",
				       j, i, ap_apic_ids[i]);
	}
	if (!m->found) {
		t_fail("no MP table to compare with (%s)", m->problem);
		return;
	}
	for (unsigned i = 0; i < m->ncpus && i < MP_MAX_CPUS; i++)
		if (!reported(m->cpu_id[i]))
			t_fail("MP-table APIC id %u never checked in",
			       m->cpu_id[i]);
	for (uint32_t i = 1; i <= n && i < PCT_MAX_CPUS; i++) {
		int listed = 0;
		for (unsigned k = 0; k < m->ncpus && k < MP_MAX_CPUS; k++)
			if (m->cpu_id[k] == ap_apic_ids[i])
				listed = 1;
		if (!listed)
			t_fail("APIC id %u is not in the MP table",
			       ap_apic_ids[i]);
	}
	int bsp_listed = 0;
	for (unsigned k = 0; k < m->ncpus && k < MP_MAX_CPUS; k++)
		if (m->cpu_id[k] == bsp_apic_id)
			bsp_listed = 1;
	if (!bsp_listed)
		t_fail("BSP APIC id %u is not in the MP table", bsp_apic_id);
}

/* ------------------------------------------------------------ IPIs */

static uint32_t pongs(uint32_t n)
{
	uint32_t sum = 0;

	for (uint32_t i = 1; i <= n; i++)
		sum += irq_count[VEC_PONG_BASE + i];
	return sum;
}

void t_ipi(void)
{
	const uint32_t rounds = 10;
	uint32_t n, ok = 0, bc = 0, before[PCT_MAX_CPUS];

	if (opt_cpus < 2) {
		t_skip("needs cpus>1");
		return;
	}
	smp_bringup();
	if (!have_apic)
		return;
	n = ap_checked_in;
	if (!n) {
		t_fail("no AP is running");
		return;
	}
	if (n >= PCT_MAX_CPUS)
		n = PCT_MAX_CPUS - 1;
	lapic_setup();
	uint32_t u0[PCT_MAX_CPUS], uping = isr_unset[VEC_PING];
	for (uint32_t i = 1; i <= n; i++)
		u0[i] = isr_unset[VEC_PONG_BASE + i];
	sti();
	for (uint32_t i = 1; i <= n; i++) {
		uint32_t id = ap_apic_ids[i];
		volatile uint32_t *cnt = &irq_count[VEC_PONG_BASE + i];
		for (uint32_t r = 0; r < rounds; r++) {
			uint32_t b = *cnt, all = pongs(n);
			if (!lapic_ipi(id, ICR_ASSERT | ICR_FIXED | VEC_PING)) {
				t_fail("ICR busy sending to APIC id %u", id);
				break;
			}
			if (!wait_count(cnt, b + 1, 100000)) {
				t_fail("no reply from APIC id %u in round %u",
				       id, r);
				break;
			}
			delay_us(100);
			if (pongs(n) != all + 1) {
				t_fail("unicast to APIC id %u: %u replies",
				       id, pongs(n) - all);
				break;
			}
			ok++;
		}
	}

	/* One all-but-self broadcast: every AP answers exactly once. */
	for (uint32_t i = 1; i <= n; i++)
		before[i] = irq_count[VEC_PONG_BASE + i];
	if (!lapic_ipi(0, ICR_ALL_BUT_SELF | ICR_ASSERT | VEC_PING))
		t_fail("ICR busy on the all-but-self broadcast");
	for (uint32_t i = 1; i <= n; i++)
		wait_count(&irq_count[VEC_PONG_BASE + i], before[i] + 1, 200000);
	delay_ms(20);
	cli();
	for (uint32_t i = 1; i <= n; i++) {
		uint32_t got = irq_count[VEC_PONG_BASE + i] - before[i];
		if (got == 1)
			bc++;
		else
			t_fail("broadcast: APIC id %u replied %u times",
			       ap_apic_ids[i], got);
	}
	kprintf("pctest: ipi: %u of %u unicast round trips, broadcast "
		"answered by %u of %u APs, %u pings seen by APs\n", ok,
		n * rounds, bc, n, ap_pings);
	if (opt_cpus - 1 != n)
		t_fail("only %u of %u APs running", n, opt_cpus - 1);
	for (uint32_t i = 1; i <= n; i++)
		isr_check(VEC_PONG_BASE + i, u0[i]);
	isr_check(VEC_PING, uping); /* on the APs */
}

void t_self_ipi(void)
{
	uint32_t base;

	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}
	lapic_setup();
	cli();
	base = irq_count[VEC_SELF_IPI];
	uint32_t u0 = isr_unset[VEC_SELF_IPI];

	/* Self shorthand with IF=0: it must wait in the IRR. */
	if (!lapic_ipi(0, ICR_SELF | ICR_ASSERT | ICR_FIXED | VEC_SELF_IPI))
		t_fail("ICR delivery status stuck (self shorthand)");
	delay_us(100);
	if (!lapic_irr_bit(VEC_SELF_IPI))
		t_fail("self IPI not pending in the IRR while IF=0");
	sti();
	wait_count(&irq_count[VEC_SELF_IPI], base + 1, 100000);
	delay_ms(5);
	cli();
	if (irq_count[VEC_SELF_IPI] != base + 1)
		t_fail("self shorthand: %u interrupts, expected 1",
		       irq_count[VEC_SELF_IPI] - base);
	if (lapic_read(LAPIC_ISR + 0x10 * (VEC_SELF_IPI / 32)) &
	    (1u << (VEC_SELF_IPI % 32)))
		t_fail("ISR bit still set after EOI");

	/* Physical destination = own APIC id. */
	if (!lapic_ipi(bsp_apic_id, ICR_ASSERT | ICR_FIXED | VEC_SELF_IPI))
		t_fail("ICR delivery status stuck (physical)");
	sti();
	wait_count(&irq_count[VEC_SELF_IPI], base + 2, 100000);
	delay_ms(5);
	cli();
	if (irq_count[VEC_SELF_IPI] != base + 2)
		t_fail("physical destination %u: %u interrupts, expected 1",
		       bsp_apic_id, irq_count[VEC_SELF_IPI] - base - 1);

	lapic_write(LAPIC_ESR, 0);
	uint32_t esr = lapic_read(LAPIC_ESR);
	if (esr)
		t_fail("ESR 0x%x", esr);
	isr_check(VEC_SELF_IPI, u0);
}

/* ------------------------------------------------------------ spin */

static void spin_report(uint32_t cpu, const struct spin_result *r)
{
	uint64_t ms = udiv64(r->ticks, tsc_per_ms ? tsc_per_ms : 1);

	kprintf("pctest: spin: cpu %u: %llu loops in %u ms%s\n", cpu,
		(unsigned long long)r->loops, (uint32_t)ms,
		r->stuck ? " (TSC stopped)" : "");
}

void run_spin(uint32_t secs)
{
	uint64_t ticks = (uint64_t)secs * 1000u * tsc_per_ms;
	/* Grace for the APs to finish after the BSP: they start later, and
	 * a throttled AP may wait a while for CPU time. */
	uint64_t grace = (uint64_t)60 * 1000u * tsc_per_ms;
	struct spin_result bsp, wait;
	uint32_t n = 0, ipi_ok = 1, started, done;

	if (opt_cpus > 1)
		smp_bringup(); /* no-op if smp or ipi started them */
	if (have_apic && smp_started) {
		n = ap_checked_in;
		if (n >= PCT_MAX_CPUS)
			n = PCT_MAX_CPUS - 1;
		if (n != opt_cpus - 1)
			t_fail("%u of %u APs running", n, opt_cpus - 1);
	}

	cli();
	kprintf("pctest: spinning %u s on %u cores\n", secs, n + 1);
	spin_ticks_lo = (uint32_t)ticks;
	spin_ticks_hi = (uint32_t)(ticks >> 32);
	__asm__ volatile("" : : : "memory");
	spin_go = 1;
	__asm__ volatile("" : : : "memory");
	for (uint32_t i = 1; i <= n; i++)
		ipi_ok &= lapic_ipi(ap_apic_ids[i],
				    ICR_ASSERT | ICR_FIXED | VEC_SPIN);

	spin_for(ticks, NULL, 0, &bsp);
	/* Keep busy (not HLT) while the APs finish. */
	spin_for(grace, &spin_done, n, &wait);
	started = spin_started;
	done = spin_done;
	__asm__ volatile("" : : : "memory");

	spin_report(0, &bsp);
	for (uint32_t i = 1; i <= n; i++) {
		if (spin_res[i].loops)
			spin_report(i, &spin_res[i]);
		else
			kprintf("pctest: spin: cpu %u (apic id %u) did not "
				"finish\n", i, ap_apic_ids[i]);
	}
	if (!ipi_ok)
		t_fail("ICR delivery status stayed busy");
	if (started != n || done != n)
		t_fail("%u of %u APs started spinning, %u finished within "
		       "60 s", started, n, done);
	if (bsp.stuck)
		t_fail("the TSC stopped moving");
	for (uint32_t i = 1; i <= n; i++)
		if (spin_res[i].stuck)
			t_fail("the TSC of cpu %u stopped moving", i);
	kprintf("pctest: spun %u s on %u cores\n", secs, done + 1);
}
