/* pctest: PIT (through the 8259 and the I/O APIC), APIC timer, RTC. */
#include "pctest.h"

#define MEASURE_MS 100
/* 1000 Hz for 100 ms gives 100; accept a wide band around it. */
#define PIT_MIN 10
#define PIT_MAX 300

/*
 * Count interrupts (IF=1) for ms milliseconds of TSC time. A busy host can
 * stall the guest long enough that ticks are dropped, so a count outside
 * lo..hi is measured again, up to three times in all.
 */
static uint32_t count_irqs(volatile uint32_t *ctr, uint32_t ms, uint32_t lo,
			   uint32_t hi, const char *what)
{
	uint32_t n = 0;

	for (int attempt = 0; attempt < 3; attempt++) {
		uint32_t base = *ctr;
		sti();
		delay_ms(ms);
		cli();
		n = *ctr - base;
		if (n >= lo && n <= hi)
			break;
		kprintf("pctest: %s: %u interrupts in %u ms (want %u..%u)%s\n",
			what, n, ms, lo, hi,
			attempt < 2 ? ", measuring again" : "");
	}
	return n;
}

/* ------------------------------------------------------------ pit_pic */

static volatile int pit_first_isr = -1;

static int h_pit_pic(unsigned v, struct frame *f)
{
	(void)v;
	(void)f;
	if (pit_first_isr < 0)
		pit_first_isr = pic_read_isr(0x20);
	return 0; /* OCW2 non-specific EOI by the dispatcher */
}

void t_pit_pic(void)
{
	uint32_t n;
	uint8_t v;

	cli();
	pic_init(0xff, 0xff);
	/* IMR read-back on both chips. */
	pic_set_mask(0xa5, 0x5a);
	if ((v = inb(0x21)) != 0xa5)
		t_fail("master IMR reads 0x%x after writing 0xa5", v);
	if ((v = inb(0xa1)) != 0x5a)
		t_fail("slave IMR reads 0x%x after writing 0x5a", v);
	pic_set_mask(0xff, 0xff);
	lapic_setup(); /* LINT0 = ExtINT: the 8259 reaches the CPU */

	pit_first_isr = -1;
	irq_handlers[VEC_PIC_MASTER] = h_pit_pic;
	pit_periodic(1000);
	pic_set_mask(0xfe, 0xff); /* IRQ0 only */

	/* IF=0: the request must show up in the IRR. */
	delay_ms(5);
	v = pic_read_irr(0x20);
	if (!(v & 1))
		t_fail("IRR 0x%x: IRQ0 not pending after 5 ms with IF=0", v);

	n = count_irqs(&irq_count[VEC_PIC_MASTER], MEASURE_MS, PIT_MIN,
		       PIT_MAX, "pit_pic");
	kprintf("pctest: pit_pic: %u IRQ0 in %u ms at 1000 Hz\n", n,
		MEASURE_MS);
	if (n < PIT_MIN || n > PIT_MAX)
		t_fail("%u interrupts in %u ms, expected %u..%u", n, MEASURE_MS,
		       PIT_MIN, PIT_MAX);
	if (pit_first_isr < 0)
		t_fail("handler never ran");
	else if (!(pit_first_isr & 1))
		t_fail("ISR 0x%x in the handler: IRQ0 bit clear",
		       (unsigned)pit_first_isr);
	if ((v = pic_read_isr(0x20)) != 0)
		t_fail("ISR 0x%x after the EOI", v);

	pic_set_mask(0xff, 0xff);
	pit_stop();
	irq_handlers[VEC_PIC_MASTER] = 0;
}

/* ------------------------------------------------------------ pit_ioapic */

void t_pit_ioapic(void)
{
	const unsigned pin = 2; /* ISA IRQ0 -> INTIN2 on PCs */
	uint32_t n, n2, base, lo, want, ver;

	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}
	cli();
	pic_set_mask(0xff, 0xff);
	lapic_setup();
	ver = ioapic_read(1);
	if (ver == 0xffffffffu || ((ver >> 16) & 0xff) < 15) {
		t_fail("I/O APIC version register 0x%x", ver);
		return;
	}
	want = VEC_PIT_IOAPIC; /* fixed, physical, high, edge, unmasked */
	ioapic_route(pin, want, bsp_apic_id);
	lo = ioapic_redir_lo(pin);
	if ((lo & ~(RED_PENDING | RED_REMOTE_IRR)) != want)
		t_fail("redirection entry reads 0x%x, wrote 0x%x", lo, want);
	if (((ioapic_read(0x11 + 2 * pin) >> 24) & 0xff) != bsp_apic_id)
		t_fail("redirection destination reads 0x%x",
		       ioapic_read(0x11 + 2 * pin));

	uint32_t u0 = isr_unset[VEC_PIT_IOAPIC];
	pit_periodic(1000);
	n = count_irqs(&irq_count[VEC_PIT_IOAPIC], MEASURE_MS, PIT_MIN,
		       PIT_MAX, "pit_ioapic");
	kprintf("pctest: pit_ioapic: %u interrupts on pin %u in %u ms\n", n,
		pin, MEASURE_MS);
	if (n < PIT_MIN || n > PIT_MAX)
		t_fail("%u interrupts in %u ms, expected %u..%u", n, MEASURE_MS,
		       PIT_MIN, PIT_MAX);

	/* Masked: nothing more (one may already be on its way). */
	ioapic_mask(pin);
	sti();
	delay_ms(2);
	base = irq_count[VEC_PIT_IOAPIC];
	delay_ms(20);
	cli();
	n2 = irq_count[VEC_PIT_IOAPIC] - base;
	if (n2)
		t_fail("%u interrupts after masking the pin", n2);
	isr_check(VEC_PIT_IOAPIC, u0);
	pit_stop();
}

/* ------------------------------------------------------------ APIC timer */

static uint32_t apic_timer_per_ms; /* at divide 16 */

/* Returns the count rate (per ms, divide by 16); 0 if it does not count. */
static uint32_t apic_timer_rate(void)
{
	uint32_t c0, c1;
	uint64_t t0;

	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
	lapic_write(LAPIC_TMR_DIV, 0x3); /* divide by 16 */
	lapic_write(LAPIC_TMR_INIT, 0xffffffffu);
	c0 = lapic_read(LAPIC_TMR_CUR);
	t0 = rdtsc();
	delay_ms(10);
	c1 = lapic_read(LAPIC_TMR_CUR);
	uint32_t us = us_since(t0);
	lapic_write(LAPIC_TMR_INIT, 0);
	if (c1 >= c0 || !us)
		return 0;
	uint32_t rate = (uint32_t)udiv64((uint64_t)(c0 - c1) * 1000, us);
	kprintf("pctest: apic timer %u counts/ms at divide 16 (%u -> %u)\n",
		rate, c0, c1);
	return rate;
}

static int apic_timer_prepare(void)
{
	uint32_t div;

	if (!have_apic) {
		t_fail("no local APIC");
		return 0;
	}
	cli();
	lapic_setup();
	lapic_write(LAPIC_TMR_DIV, 0x3);
	if (((div = lapic_read(LAPIC_TMR_DIV)) & 0xb) != 0x3)
		t_fail("divide configuration reads 0x%x, wrote 0x3", div);
	if (!apic_timer_per_ms)
		apic_timer_per_ms = apic_timer_rate();
	if (!apic_timer_per_ms) {
		t_fail("current count (0x390) does not decrease");
		return 0;
	}
	return 1;
}

void t_lapic_oneshot(void)
{
	uint32_t count, cur, base, us;
	uint64_t t0;

	if (!apic_timer_prepare())
		return;
	count = apic_timer_per_ms * 10; /* 10 ms */
	if (count < 100)
		count = 100;
	uint32_t u0 = isr_unset[VEC_LAPIC_ONE];
	base = irq_count[VEC_LAPIC_ONE];
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC_ONE); /* one-shot, unmasked */
	lapic_write(LAPIC_TMR_INIT, count);
	t0 = rdtsc();
	cur = lapic_read(LAPIC_TMR_CUR);
	if (cur == 0 || cur > count)
		t_fail("current count 0x%x right after loading 0x%x", cur,
		       count);
	sti();
	if (!wait_count(&irq_count[VEC_LAPIC_ONE], base + 1, 1000000)) {
		cli();
		t_fail("no interrupt within 1 s (expected after 10 ms)");
		return;
	}
	us = us_since(t0);
	delay_ms(30);
	cli();
	kprintf("pctest: lapic_oneshot: fired after %u us (10000 expected)\n",
		us);
	if (us < 5000)
		t_fail("fired after %u us, expected 10000", us);
	if (irq_count[VEC_LAPIC_ONE] - base != 1)
		t_fail("fired %u times", irq_count[VEC_LAPIC_ONE] - base);
	if ((cur = lapic_read(LAPIC_TMR_CUR)) != 0)
		t_fail("current count 0x%x after expiry, expected 0", cur);
	isr_check(VEC_LAPIC_ONE, u0);
}

void t_lapic_periodic(void)
{
	uint32_t period, base, n, c0, c1;

	if (!apic_timer_prepare())
		return;
	period = apic_timer_per_ms * 2; /* 2 ms: 25 in 50 ms */
	if (period < 100)
		period = 100;
	uint32_t u0 = isr_unset[VEC_LAPIC_PER];
	base = irq_count[VEC_LAPIC_PER];
	lapic_write(LAPIC_LVT_TIMER, VEC_LAPIC_PER | (1u << 17));
	lapic_write(LAPIC_TMR_INIT, period);
	c0 = lapic_read(LAPIC_TMR_CUR);
	delay_us(200);
	c1 = lapic_read(LAPIC_TMR_CUR);
	n = count_irqs(&irq_count[VEC_LAPIC_PER], 50, 5, 75,
		       "lapic_periodic");
	uint32_t cur = lapic_read(LAPIC_TMR_CUR);
	kprintf("pctest: lapic_periodic: %u interrupts in 50 ms (25 "
		"expected)\n", n);
	if (n < 5 || n > 75)
		t_fail("%u interrupts in 50 ms with a 2 ms period", n);
	if (c1 >= c0)
		t_fail("current count did not decrease (0x%x -> 0x%x)", c0, c1);
	if (cur == 0 || cur > period)
		t_fail("current count 0x%x in periodic mode (period 0x%x)", cur,
		       period);

	/* Stop it: initial count 0. */
	lapic_write(LAPIC_TMR_INIT, 0);
	sti();
	delay_ms(3);
	base = irq_count[VEC_LAPIC_PER];
	delay_ms(10);
	cli();
	if (irq_count[VEC_LAPIC_PER] != base)
		t_fail("still firing after writing initial count 0");
	isr_check(VEC_LAPIC_PER, u0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
}

void t_tsc_deadline(void)
{
	uint32_t a, b, c, d, base, lvt;
	uint64_t dl, fired, msr;

	cpuid(1, &a, &b, &c, &d);
	if (!(c & (1u << 24))) {
		t_skip("CPUID.1:ECX.TSC_DEADLINE is clear");
		return;
	}
	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}
	cli();
	lapic_setup();
	uint32_t u0 = isr_unset[VEC_TSC_DL];
	base = irq_count[VEC_TSC_DL];
	lapic_write(LAPIC_LVT_TIMER, VEC_TSC_DL | (2u << 17));
	lvt = lapic_read(LAPIC_LVT_TIMER);
	if (((lvt >> 17) & 3) != 2)
		t_fail("LVT timer reads 0x%x: mode is not TSC-deadline", lvt);
	cpuid(0, &a, &b, &c, &d); /* serialise the LVT write and the MSR */
	dl = rdtsc() + (uint64_t)tsc_per_ms * 10;
	wrmsr(0x6e0, dl);
	msr = rdmsr(0x6e0);
	if (msr != dl && msr != 0)
		t_fail("IA32_TSC_DEADLINE reads 0x%llx, wrote 0x%llx",
		       (unsigned long long)msr, (unsigned long long)dl);
	sti();
	if (!wait_count(&irq_count[VEC_TSC_DL], base + 1, 1000000)) {
		cli();
		wrmsr(0x6e0, 0);
		t_fail("no interrupt within 1 s (deadline 10 ms ahead)");
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
		return;
	}
	fired = rdtsc();
	delay_ms(30);
	cli();
	if (fired < dl)
		t_fail("fired %llu TSC cycles before the deadline",
		       (unsigned long long)(dl - fired));
	if (irq_count[VEC_TSC_DL] - base != 1)
		t_fail("fired %u times", irq_count[VEC_TSC_DL] - base);
	if ((msr = rdmsr(0x6e0)) != 0)
		t_fail("IA32_TSC_DEADLINE reads 0x%llx after firing",
		       (unsigned long long)msr);
	isr_check(VEC_TSC_DL, u0);
	wrmsr(0x6e0, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
}

/* ------------------------------------------------------------ RTC */

static int bcd_ok(uint8_t v, uint8_t max)
{
	return (v & 0xf) <= 9 && (v >> 4) <= 9 && v <= max;
}

static unsigned bcd(uint8_t v)
{
	return (v >> 4) * 10 + (v & 0xf);
}

/* Poll UIP until clear, for up to 10 ms; returns 1 when it cleared. */
static int rtc_uip_clear(void)
{
	struct tmo t;

	tmo_start(&t, 10000);
	while (cmos_read(0x0a) & 0x80)
		if (tmo_done(&t))
			return 0;
	return 1;
}

/* Seconds since midnight, or -1 (with t_fail) on trouble. */
static int rtc_time(uint8_t regb, char *txt)
{
	uint8_t s, m, h;

	for (int tries = 0; tries < 5; tries++) {
		if (!rtc_uip_clear()) {
			t_fail("UIP (register A bit 7) stuck at 1 for 10 ms");
			return -1;
		}
		s = cmos_read(0x00);
		m = cmos_read(0x02);
		h = cmos_read(0x04);
		if (s != cmos_read(0x00) || m != cmos_read(0x02) ||
		    h != cmos_read(0x04))
			continue;
		int pm = 0;
		uint8_t hmax = 0x23;
		if (!(regb & 2)) { /* 12-hour mode */
			pm = h & 0x80;
			h &= 0x7f;
			hmax = 0x12;
		}
		if (!bcd_ok(s, 0x59) || !bcd_ok(m, 0x59) || !bcd_ok(h, hmax)) {
			t_fail("not valid BCD: %02x:%02x:%02x", h, m, s);
			return -1;
		}
		unsigned hh = bcd(h);
		if (!(regb & 2))
			hh = hh % 12 + (pm ? 12 : 0);
		txt[0] = (char)('0' + hh / 10);
		txt[1] = (char)('0' + hh % 10);
		txt[2] = ':';
		txt[3] = (char)('0' + (m >> 4));
		txt[4] = (char)('0' + (m & 0xf));
		txt[5] = ':';
		txt[6] = (char)('0' + (s >> 4));
		txt[7] = (char)('0' + (s & 0xf));
		txt[8] = 0;
		return (int)(hh * 3600 + bcd(m) * 60 + bcd(s));
	}
	t_fail("time keeps changing between reads");
	return -1;
}

void t_rtc(void)
{
	uint8_t a = cmos_read(0x0a), b = cmos_read(0x0b), d = cmos_read(0x0d);
	char t1s[9], t2s[9];
	int t1, t2;

	kprintf("pctest: rtc: A 0x%x B 0x%x D 0x%x\n", a, b, d);
	if (!(d & 0x80))
		t_fail("register D 0x%x: VRT (bit 7) clear", d);
	if (b & 0x80)
		t_fail("register B 0x%x: SET (bit 7) stops the clock", b);
	if (b & 4) {
		kprintf("pctest: rtc: register B in binary mode, switching to "
			"BCD\n");
		cmos_write(0x0b, b & ~4);
	}
	t1 = rtc_time(b & ~4, t1s);
	if (t1 < 0)
		goto out;
	delay_ms(1000);
	t2 = rtc_time(b & ~4, t2s);
	if (t2 < 0)
		goto out;
	int delta = (t2 - t1 + 86400) % 86400;
	kprintf("pctest: rtc: %s -> %s after 1 s\n", t1s, t2s);
	if (delta < 1 || delta > 3)
		t_fail("%s -> %s after 1 s of TSC time", t1s, t2s);
out:
	if (b & 4)
		cmos_write(0x0b, b);
}

static volatile uint32_t rtc_bad_c;
static volatile uint8_t rtc_last_c;

static int h_rtc(unsigned v, struct frame *f)
{
	(void)v;
	(void)f;
	uint8_t c = cmos_read(0x0c); /* acknowledges the interrupt */
	rtc_last_c = c;
	if ((c & 0xc0) != 0xc0)
		atomic_inc(&rtc_bad_c);
	return 0; /* EOI to the slave, then the master */
}

void t_rtc_periodic(void)
{
	uint8_t a, b, v;
	uint32_t n;

	cli();
	pic_init(0xff, 0xff);
	lapic_setup();
	a = cmos_read(0x0a);
	b = cmos_read(0x0b);
	cmos_write(0x0a, (uint8_t)((a & 0xf0) | 6)); /* 1024 Hz */
	if (((v = cmos_read(0x0a)) & 0x0f) != 6)
		t_fail("register A reads 0x%x after writing rate 6", v);
	(void)cmos_read(0x0c);
	rtc_bad_c = 0;
	irq_handlers[VEC_PIC_SLAVE] = h_rtc;
	pic_set_mask(0xfb, 0xfe); /* cascade IRQ2, IRQ8 */
	cmos_write(0x0b, (uint8_t)(b | 0x40)); /* PIE */

	n = count_irqs(&irq_count[VEC_PIC_SLAVE], MEASURE_MS, 20, 400,
		       "rtc_periodic");

	cmos_write(0x0b, (uint8_t)(b & ~0x40));
	cmos_write(0x0a, a);
	(void)cmos_read(0x0c);
	pic_set_mask(0xff, 0xff);
	irq_handlers[VEC_PIC_SLAVE] = 0;

	kprintf("pctest: rtc_periodic: %u IRQ8 in %u ms at 1024 Hz\n", n,
		MEASURE_MS);
	if (n < 20 || n > 400)
		t_fail("%u interrupts in %u ms, expected about 102", n,
		       MEASURE_MS);
	if (rtc_bad_c)
		t_fail("register C lacked IRQF|PF in %u handlers (last 0x%x)",
		       rtc_bad_c, rtc_last_c);
	if ((v = pic_read_isr(0xa0)) != 0 || (v = pic_read_isr(0x20)) != 0)
		t_fail("ISR 0x%x after the EOIs", v);
}
