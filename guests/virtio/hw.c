/*
 * virtio guest: time base (TSC calibrated against PIT channel 2), IDT and
 * interrupt dispatch, local APIC set-up and the periodic wake-up timer.
 */
#include "virtio.h"

volatile uint32_t irq_count[256];
void (*irq_hooks[256])(void);
uint32_t lapic_base = 0xfee00000u, apic_id;
int have_apic, timer_ok;
static uint32_t timer_period;

/* ---------------------------------------------------------------- time */

uint64_t tsc_to_us(uint64_t ticks)
{
	/* ticks * 1000 / tsc_per_ms, without overflowing for hours of TSC */
	if (ticks < ((uint64_t)1 << 50))
		return udiv64(ticks * 1000, tsc_per_ms);
	return udiv64(ticks, tsc_per_us ? tsc_per_us : 1);
}

/*
 * Calibrate the TSC against PIT channel 2: gate on (port 0x61 bit 0),
 * speaker off, mode 0 with a 50 ms count, then poll OUT2 (port 0x61
 * bit 5), which goes high at terminal count.
 */
void time_init(void)
{
	const uint32_t count = PIT_HZ / 20; /* 59659: 50 ms */
	uint8_t p61 = inb(0x61);
	uint32_t spins = 0;
	uint64_t t0, t1;
	int ok = 1;

	outb((uint8_t)((p61 & ~0x02) | 0x01), 0x61);
	outb(0xb0, 0x43); /* ch2, lo/hi, mode 0, binary */
	outb((uint8_t)count, 0x42);
	outb((uint8_t)(count >> 8), 0x42);
	t0 = rdtsc();
	while (!(inb(0x61) & 0x20)) {
		if (++spins > 100000000u) {
			ok = 0;
			break;
		}
	}
	t1 = rdtsc();
	outb((uint8_t)(p61 & ~0x03), 0x61); /* gate and speaker off */

	if (ok && t1 > t0) {
		uint64_t per_ms = udiv64((t1 - t0) * PIT_HZ, count * 1000u);
		if (per_ms >= 1000 && per_ms <= 100000000) {
			tsc_per_ms = (uint32_t)per_ms;
			tsc_per_us = tsc_per_ms / 1000;
			kprintf("virtio: tsc %u kHz (PIT channel 2, %u polls)\n",
				tsc_per_ms, spins);
			return;
		}
	}
	kprintf("virtio: PIT channel 2 calibration failed (OUT2 %s, tsc "
		"delta %llu); assuming a 1 GHz TSC\n", ok ? "rose" : "stuck",
		(unsigned long long)(t1 - t0));
	tsc_per_ms = 1000000;
	tsc_per_us = 1000;
}

/* ------------------------------------------------------------ IDT */

struct idt_gate {
	uint16_t off_lo, sel;
	uint8_t zero, attr;
	uint16_t off_hi;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));

static struct {
	uint16_t pad;
	uint16_t limit;
	uint32_t base;
} __attribute__((packed, aligned(4))) idtr;

void idt_init(void)
{
	if (isr_stubs_end - isr_stubs != 256 * 16)
		fatal("interrupt stubs are %d bytes, not 4096",
		      (int)(isr_stubs_end - isr_stubs));
	for (int v = 0; v < 256; v++) {
		uint32_t a = (uint32_t)(uintptr_t)(isr_stubs + 16 * v);
		idt[v].off_lo = (uint16_t)a;
		idt[v].sel = SEL_CODE;
		idt[v].zero = 0;
		idt[v].attr = 0x8e; /* present, DPL 0, 32-bit interrupt gate */
		idt[v].off_hi = (uint16_t)(a >> 16);
	}
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (uint32_t)(uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr.limit));
}

static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
	"#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "15",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "22", "23",
	"24",  "25",  "26",  "27",  "28",  "29",  "30", "31",
};

void isr_dispatch(struct frame *f)
{
	unsigned v = f->vector & 0xff;

	irq_count[v]++;
	if (v < 32) {
		if (v == 2) /* NMI: just counted */
			return;
		uint32_t cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		fatal("exception %s (vector %u) err 0x%x eip 0x%x cr2 0x%x",
		      exc_names[v], v, f->err, f->eip, cr2);
	}
	/* 0x20-0x2f: the 8259s are masked; only spurious IRQ7/15 can come. */
	if (v >= 0x30 && v != VEC_SPURIOUS && irq_hooks[v])
		irq_hooks[v]();
	if (v >= 0x30 && v != VEC_SPURIOUS && have_apic)
		lapic_write(LAPIC_EOI, 0);
}

/* ------------------------------------------------------------ LAPIC */

uint32_t lapic_read(uint32_t reg)
{
	return mr32(lapic_base + reg);
}

void lapic_write(uint32_t reg, uint32_t v)
{
	mw32(lapic_base + reg, v);
}

static void ioapic_mask_all(void)
{
	mw32(IOAPIC_BASE, 1);
	uint32_t ver = mr32(IOAPIC_BASE + 0x10);
	if (ver == 0xffffffffu)
		return;
	unsigned pins = ((ver >> 16) & 0xff) + 1;
	if (pins > 64)
		pins = 64;
	for (unsigned i = 0; i < pins; i++) {
		mw32(IOAPIC_BASE, 0x10 + 2 * i);
		mw32(IOAPIC_BASE + 0x10, (1u << 16) | 0xf0);
	}
}

/*
 * 8259s remapped to 0x20/0x28 and masked, every I/O APIC pin masked, the
 * local APIC software-enabled (SVR 0x1ff) with LINT0 masked, and its
 * timer calibrated for a ~10 ms periodic wake-up while we wait in hlt.
 */
void platform_init(void)
{
	uint32_t a, b, c, d;

	outb(0x11, 0x20);
	outb(0x11, 0xa0);
	outb(VEC_PIC_MASTER, 0x21);
	outb(VEC_PIC_SLAVE, 0xa1);
	outb(0x04, 0x21);
	outb(0x02, 0xa1);
	outb(0x01, 0x21);
	outb(0x01, 0xa1);
	outb(0xff, 0x21);
	outb(0xff, 0xa1);

	cpuid(1, &a, &b, &c, &d);
	have_apic = (d >> 9) & 1;
	if (!have_apic) {
		kprintf("virtio: CPUID.1:EDX.APIC is clear: no MSI-X delivery\n");
		return;
	}
	uint64_t base = rdmsr(0x1b);
	if (!(base & (1u << 11))) {
		base |= 1u << 11;
		wrmsr(0x1b, base);
	}
	lapic_base = (uint32_t)base & 0xfffff000u;
	ioapic_mask_all();
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED | 0x700);
	lapic_write(LAPIC_LVT_LINT1, 0x400);
	lapic_write(LAPIC_TMR_INIT, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
	lapic_write(LAPIC_LVT_ERROR, LVT_MASKED | VEC_APIC_ERROR);
	if (((lapic_read(LAPIC_VER) >> 16) & 0xff) >= 4)
		lapic_write(LAPIC_LVT_PERF, LVT_MASKED);
	lapic_write(LAPIC_ESR, 0);
	apic_id = lapic_read(LAPIC_ID) >> 24;

	/* Timer rate: divide by 16, count down for 2 ms of TSC time. */
	lapic_write(LAPIC_TMR_DIV, 0x3);
	lapic_write(LAPIC_TMR_INIT, 0xffffffffu);
	delay_us(2000);
	uint32_t left = lapic_read(LAPIC_TMR_CUR);
	lapic_write(LAPIC_TMR_INIT, 0);
	uint32_t per_ms = (0xffffffffu - left) / 2;
	if (per_ms >= 10 && per_ms < 0x10000000u) {
		timer_ok = 1;
		timer_period = per_ms * 10;
	}
	kprintf("virtio: lapic base 0x%x id %u; timer %u ticks/ms%s\n",
		lapic_base, apic_id, per_ms,
		timer_ok ? "" : " (not counting: waits will spin, not hlt)");
}

void wake_timer(int on)
{
	if (!have_apic || !timer_ok)
		return;
	if (on) {
		lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
		lapic_write(LAPIC_TMR_INIT, timer_period);
	} else {
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
		lapic_write(LAPIC_TMR_INIT, 0);
	}
}
