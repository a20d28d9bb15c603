/*
 * pctest: time base, IDT and interrupt dispatch, and small drivers for the
 * 8259 pair, the 8254, the local APIC, the I/O APIC and CMOS.
 */
#include "pctest.h"

irq_handler_t irq_handlers[256];
volatile uint32_t irq_count[256];
volatile uint32_t pic_spurious;
volatile uint32_t isr_unset[256];
uint32_t lapic_base = 0xfee00000u;
int have_apic;
uint32_t bsp_apic_id;

/* ---------------------------------------------------------------- time */

uint32_t us_since(uint64_t t0)
{
	uint64_t q = udiv64(rdtsc() - t0, tsc_per_us ? tsc_per_us : 1);

	return q > 0xffffffffu ? 0xffffffffu : (uint32_t)q;
}

int wait_count(volatile uint32_t *p, uint32_t v, uint32_t us)
{
	struct tmo t;

	tmo_start(&t, us);
	while (*p < v) {
		if (tmo_done(&t))
			return *p >= v;
		cpu_relax();
	}
	return 1;
}

/*
 * Calibrate the TSC against the PIT: channel 0 in mode 2 with the full
 * 65536 count, read back through the latch command, for 50 ms of PIT time.
 */
void time_init(void)
{
	const uint32_t want = PIT_HZ / 20; /* 50 ms */
	uint32_t total = 0, same = 0, iter;
	uint16_t prev, cur;
	uint64_t t0, t1;

	outb(0x34, 0x43); /* ch0, lo/hi, mode 2, binary */
	outb(0x00, 0x40);
	outb(0x00, 0x40);
	prev = pit_read_count();
	t0 = rdtsc();
	for (iter = 0; iter < 50000000 && total < want; iter++) {
		cur = pit_read_count();
		uint16_t d = (uint16_t)(prev - cur);
		if (d == 0) {
			if (++same > 2000000)
				break;
			continue;
		}
		same = 0;
		total += d;
		prev = cur;
	}
	t1 = rdtsc();
	pit_stop();

	if (total >= want && t1 > t0) {
		uint64_t per_ms = udiv64((t1 - t0) * PIT_HZ, total * 1000u);
		if (per_ms >= 1000 && per_ms <= 100000000) {
			tsc_per_ms = (uint32_t)per_ms;
			tsc_per_us = tsc_per_ms / 1000;
			kprintf("pctest: tsc %u kHz (calibrated against the PIT)\n",
				tsc_per_ms);
			return;
		}
	}
	kprintf("pctest: PIT calibration failed (%u of %u ticks, tsc delta "
		"%llu); assuming a 1 GHz TSC\n", total, want,
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
		idt[v].sel = PCT_SEL_CODE;
		idt[v].zero = 0;
		idt[v].attr = 0x8e; /* present, DPL 0, 32-bit interrupt gate */
		idt[v].off_hi = (uint16_t)(a >> 16);
	}
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (uint32_t)(uintptr_t)idt;
	load_idt();
}

void load_idt(void)
{
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

	atomic_inc(&irq_count[v]);
	if (v < 32) {
		if (v == 2) /* NMI: just counted */
			return;
		uint32_t cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		fatal("exception %s (vector %u) err 0x%x eip 0x%x cr2 0x%x "
		      "apic %u", exc_names[v], v, f->err, f->eip, cr2,
		      have_apic ? lapic_id() : 0);
	}

	/* 8259 spurious IRQ7/IRQ15: the ISR bit is not set. */
	if (v == VEC_PIC_MASTER + 7 || v == VEC_PIC_SLAVE + 7) {
		uint16_t port = v == VEC_PIC_MASTER + 7 ? 0x20 : 0xa0;
		if (!(pic_read_isr(port) & 0x80)) {
			atomic_inc(&pic_spurious);
			if (port == 0xa0) /* the master did see IRQ2 */
				outb(0x20, 0x20);
			return;
		}
	}

	/* A fixed LAPIC interrupt is in service while its handler runs. */
	if (have_apic && v >= 0x30 && v != VEC_SPURIOUS &&
	    !(lapic_read(LAPIC_ISR + 0x10 * (v / 32)) & (1u << (v % 32))))
		atomic_inc(&isr_unset[v]);

	if (irq_handlers[v] && irq_handlers[v](v, f))
		return;

	if (v >= VEC_PIC_MASTER && v < VEC_PIC_SLAVE + 8) {
		if (v >= VEC_PIC_SLAVE)
			outb(0x20, 0xa0); /* OCW2 non-specific EOI */
		outb(0x20, 0x20);
	} else if (v != VEC_SPURIOUS) {
		lapic_eoi();
	}
}

void isr_check(unsigned vec, uint32_t before)
{
	uint32_t n = isr_unset[vec] - before;

	if (!n)
		return;
	if (opt_isr_check)
		t_fail("LAPIC ISR bit for vector 0x%x clear inside the handler "
		       "(%u times)", vec, n);
	else
		kprintf("pctest: (isr_check=0) LAPIC ISR bit for vector 0x%x "
			"clear inside the handler (%u times)\n", vec, n);
}

/* ------------------------------------------------------------ 8259 */

void pic_init(uint8_t master_mask, uint8_t slave_mask)
{
	outb(0x11, 0x20); /* ICW1: edge, cascade, ICW4 follows */
	outb(0x11, 0xa0);
	outb(VEC_PIC_MASTER, 0x21); /* ICW2: vector base */
	outb(VEC_PIC_SLAVE, 0xa1);
	outb(0x04, 0x21); /* ICW3: slave on IRQ2 */
	outb(0x02, 0xa1); /*       slave identity 2 */
	outb(0x01, 0x21); /* ICW4: 8086 mode, normal EOI */
	outb(0x01, 0xa1);
	pic_set_mask(master_mask, slave_mask);
	outb(0x0a, 0x20); /* OCW3: reads return IRR */
	outb(0x0a, 0xa0);
}

void pic_set_mask(uint8_t master_mask, uint8_t slave_mask)
{
	outb(master_mask, 0x21);
	outb(slave_mask, 0xa1);
}

uint8_t pic_read_irr(uint16_t port)
{
	uint32_t fl = irq_save();
	outb(0x0a, port);
	uint8_t v = inb(port);
	irq_restore(fl);
	return v;
}

uint8_t pic_read_isr(uint16_t port)
{
	uint32_t fl = irq_save();
	outb(0x0b, port);
	uint8_t v = inb(port);
	outb(0x0a, port);
	irq_restore(fl);
	return v;
}

/* ------------------------------------------------------------ 8254 */

void pit_periodic(uint32_t hz)
{
	uint32_t n = (PIT_HZ + hz / 2) / hz;

	outb(0x34, 0x43); /* ch0, lo/hi, mode 2 (rate generator) */
	outb((uint8_t)n, 0x40);
	outb((uint8_t)(n >> 8), 0x40);
}

/* Mode 0 with a tiny count: one last edge, then the output stays high. */
void pit_stop(void)
{
	outb(0x30, 0x43);
	outb(0x02, 0x40);
	outb(0x00, 0x40);
}

uint16_t pit_read_count(void)
{
	outb(0x00, 0x43); /* latch ch0 */
	uint8_t lo = inb(0x40);
	uint8_t hi = inb(0x40);
	return (uint16_t)(lo | (hi << 8));
}

/* ------------------------------------------------------------ local APIC */

uint32_t lapic_read(uint32_t reg)
{
	return *(volatile uint32_t *)phys_ptr(lapic_base + reg);
}

void lapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)phys_ptr(lapic_base + reg) = v;
}

void lapic_eoi(void)
{
	lapic_write(LAPIC_EOI, 0);
}

uint32_t lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

/*
 * Software-enable the APIC (spurious vector 0xff) and put it in
 * virtual-wire mode: LINT0 ExtINT (the 8259), LINT1 NMI, other LVTs masked.
 */
void lapic_setup(void)
{
	if (!have_apic)
		return;
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_LVT_LINT0, 0x700);
	lapic_write(LAPIC_LVT_LINT1, 0x400);
	lapic_write(LAPIC_TMR_INIT, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
	lapic_write(LAPIC_LVT_ERROR, LVT_MASKED | VEC_APIC_ERROR);
	if (((lapic_read(LAPIC_VER) >> 16) & 0xff) >= 4)
		lapic_write(LAPIC_LVT_PERF, LVT_MASKED);
	lapic_write(LAPIC_ESR, 0);
}

int lapic_icr_wait(uint32_t us)
{
	struct tmo t;

	tmo_start(&t, us);
	while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
		if (tmo_done(&t))
			return 0;
	return 1;
}

int lapic_ipi(uint32_t dest, uint32_t icr_lo)
{
	uint32_t fl = irq_save();
	int ok;

	lapic_icr_wait(10000);
	lapic_write(LAPIC_ICR_HI, dest << 24);
	lapic_write(LAPIC_ICR_LO, icr_lo);
	ok = lapic_icr_wait(10000);
	irq_restore(fl);
	return ok;
}

int lapic_irr_bit(unsigned vec)
{
	return (lapic_read(LAPIC_IRR + 0x10 * (vec / 32)) >> (vec % 32)) & 1;
}

/* ------------------------------------------------------------ I/O APIC */

uint32_t ioapic_read(uint32_t reg)
{
	uint32_t fl = irq_save();
	*(volatile uint32_t *)phys_ptr(IOAPIC_BASE) = reg;
	uint32_t v = *(volatile uint32_t *)phys_ptr(IOAPIC_BASE + 0x10);
	irq_restore(fl);
	return v;
}

void ioapic_write(uint32_t reg, uint32_t v)
{
	uint32_t fl = irq_save();
	*(volatile uint32_t *)phys_ptr(IOAPIC_BASE) = reg;
	*(volatile uint32_t *)phys_ptr(IOAPIC_BASE + 0x10) = v;
	irq_restore(fl);
}

uint32_t ioapic_redir_lo(unsigned pin)
{
	return ioapic_read(0x10 + 2 * pin);
}

/* Physical destination; the low word last so the entry is complete. */
void ioapic_route(unsigned pin, uint32_t lo, uint32_t dest_apic)
{
	ioapic_write(0x10 + 2 * pin, RED_MASKED);
	ioapic_write(0x11 + 2 * pin, dest_apic << 24);
	ioapic_write(0x10 + 2 * pin, lo);
}

void ioapic_mask(unsigned pin)
{
	ioapic_write(0x10 + 2 * pin, ioapic_redir_lo(pin) | RED_MASKED);
}

unsigned ioapic_pins(void)
{
	uint32_t v = ioapic_read(1);

	if (v == 0xffffffffu)
		return 0;
	return ((v >> 16) & 0xff) + 1;
}

/* ------------------------------------------------------------ CMOS */

uint8_t cmos_read(uint8_t reg)
{
	uint32_t fl = irq_save();
	outb(reg, 0x70);
	uint8_t v = inb(0x71);
	irq_restore(fl);
	return v;
}

void cmos_write(uint8_t reg, uint8_t v)
{
	uint32_t fl = irq_save();
	outb(reg, 0x70);
	outb(v, 0x71);
	irq_restore(fl);
}

/* ------------------------------------------------------------ */

void quiesce(void)
{
	cli();
	pic_set_mask(0xff, 0xff);
	if (have_apic) {
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_LAPIC_ONE);
		lapic_write(LAPIC_TMR_INIT, 0);
	}
}
