/*
 * pctest: CMOS memory size, fw_cfg, pc-testdev (scratch port, edge and
 * level IRQ lines through the I/O APIC), APIC spurious vector register,
 * i8042 reset.
 */
#include "pctest.h"

/* ------------------------------------------------------------ cmos_mem */

static uint32_t cmos16(uint8_t lo_reg)
{
	return cmos_read(lo_reg) | ((uint32_t)cmos_read(lo_reg + 1) << 8);
}

void t_cmos_mem(void)
{
	uint32_t base = cmos16(0x15), ext = cmos16(0x17), ext2 = cmos16(0x30);
	uint32_t hi = cmos16(0x34), want;

	kprintf("pctest: cmos_mem: base %u KiB, ext (0x17) %u KiB, ext (0x30) "
		"%u KiB, above 16 MiB (0x34) %u x 64 KiB = %u MiB total\n",
		base, ext, ext2, hi, hi ? 16 + hi / 16 : 0);

	if (opt_ram_given) {
		if (opt_ram_mib <= 3072) {
			want = opt_ram_mib > 16 ? (opt_ram_mib - 16) * 16 : 0;
			if (hi != want)
				t_fail("0x34/0x35 = %u (x 64 KiB above 16 MiB), "
				       "expected %u for ram_mib=%u", hi, want,
				       opt_ram_mib);
		}
		want = opt_ram_mib ? (opt_ram_mib - 1) * 1024 : 0;
		if (want > 0xffff)
			want = 0xffff;
		if (ext != want)
			t_fail("0x17/0x18 = %u KiB, expected %u for ram_mib=%u",
			       ext, want, opt_ram_mib);
	} else if (hi) {
		/* No ram_mib: the two fields must at least agree. */
		want = 16 * 1024 + hi * 64 - 1024;
		if (want > 0xffff)
			want = 0xffff;
		if (ext != want)
			t_fail("0x17/0x18 = %u KiB, but 0x34/0x35 implies %u",
			       ext, want);
	} else {
		t_fail("0x34/0x35 is 0 and no ram_mib= to compare with");
	}
}

/* ------------------------------------------------------------ fw_cfg */

static void fw_select(uint16_t key)
{
	outw(key, 0x510);
}

static uint32_t fw_read(unsigned bytes)
{
	uint32_t v = 0;

	for (unsigned i = 0; i < bytes; i++)
		v |= (uint32_t)inb(0x511) << (8 * i);
	return v;
}

void t_fw_cfg(void)
{
	uint8_t sig[4];
	uint32_t id, n, ram_lo, ram_hi;

	fw_select(0x0000);
	for (int i = 0; i < 4; i++)
		sig[i] = inb(0x511);
	if (memcmp(sig, "QEMU", 4)) {
		t_fail("signature (key 0x0000) is %02x %02x %02x %02x, not "
		       "\"QEMU\"", sig[0], sig[1], sig[2], sig[3]);
		return;
	}
	fw_select(0x0001);
	id = fw_read(4);
	fw_select(0x0005);
	n = fw_read(2);
	fw_select(0x0003);
	ram_lo = fw_read(4);
	ram_hi = fw_read(4);
	kprintf("pctest: fw_cfg: id 0x%x, nb_cpus %u, ram_size 0x%x%08x\n", id,
		n, ram_hi, ram_lo);
	if (n != opt_cpus)
		t_fail("key 0x0005 (nb_cpus) is %u, expected cpus=%u", n,
		       opt_cpus);
}

/* ------------------------------------------------------------ testdev */

#define TESTDEV_SCRATCH 0xe0
#define TESTDEV_IRQ(n)  (0x2000 + (n))
#define EDGE_PIN        11
#define LEVEL_PIN       10

void t_testdev(void)
{
	static const uint32_t pat[] = { 0xa5a55a5au, 0x12345678u, 0 };
	uint32_t base, n, lo;

	for (unsigned i = 0; i < 3; i++) {
		outl(pat[i], TESTDEV_SCRATCH);
		uint32_t r = inl(TESTDEV_SCRATCH);
		if (r != pat[i]) {
			t_fail("port 0xe0 reads 0x%x after writing 0x%x", r,
			       pat[i]);
			break;
		}
	}
	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}

	/* ISA IRQ 11 -> I/O APIC pin 11, edge, active high. */
	outb(0, TESTDEV_IRQ(EDGE_PIN));
	cli();
	pic_set_mask(0xff, 0xff);
	lapic_setup();
	ioapic_route(EDGE_PIN, VEC_EDGE, bsp_apic_id);
	uint32_t u0 = isr_unset[VEC_EDGE];
	base = irq_count[VEC_EDGE];
	sti();
	delay_ms(5);
	if ((n = irq_count[VEC_EDGE] - base) != 0)
		t_fail("%u interrupts with the line low", n);
	base = irq_count[VEC_EDGE];

	outb(1, TESTDEV_IRQ(EDGE_PIN));
	wait_count(&irq_count[VEC_EDGE], base + 1, 100000);
	delay_ms(20);
	n = irq_count[VEC_EDGE] - base;
	if (n != 1)
		t_fail("raising IRQ %u: %u interrupts, expected 1", EDGE_PIN, n);
	lo = ioapic_redir_lo(EDGE_PIN);
	if (lo & RED_REMOTE_IRR)
		t_fail("remote IRR set on an edge-triggered pin (0x%x)", lo);

	outb(0, TESTDEV_IRQ(EDGE_PIN));
	delay_ms(10);
	if ((n = irq_count[VEC_EDGE] - base) != 1 && !t_failed())
		t_fail("lowering the line: %u interrupts in total", n);

	outb(1, TESTDEV_IRQ(EDGE_PIN));
	wait_count(&irq_count[VEC_EDGE], base + 2, 100000);
	delay_ms(10);
	outb(0, TESTDEV_IRQ(EDGE_PIN));
	delay_ms(10);
	cli();
	if ((n = irq_count[VEC_EDGE] - base) != 2 && !t_failed())
		t_fail("second edge: %u interrupts in total, expected 2", n);
	isr_check(VEC_EDGE, u0);
	ioapic_mask(EDGE_PIN);
}

/* ------------------------------------------------------------ level_irr */

static volatile uint32_t lvl_n, lvl_irr_bits, lvl_stop_at;
/* Per delivery: entry TSC, redirection entry at entry / after the EOI,
 * and the LAPIC IRR bit for the vector right after the EOI. */
#define LVL_LOG 8
static uint64_t lvl_tsc[LVL_LOG];
static uint32_t lvl_red_in[LVL_LOG], lvl_red_out[LVL_LOG], lvl_irr_out[LVL_LOG];

/* Level handler: look at remote IRR, lower the line only at the end. */
static int h_level(unsigned v, struct frame *f)
{
	(void)v;
	(void)f;
	uint32_t n = ++lvl_n;
	uint32_t red = ioapic_redir_lo(LEVEL_PIN);
	if ((red & RED_REMOTE_IRR) && n <= 32)
		lvl_irr_bits |= 1u << (n - 1);
	if (n >= lvl_stop_at)
		outb(0, TESTDEV_IRQ(LEVEL_PIN));
	lapic_eoi();
	if (n <= LVL_LOG) {
		lvl_tsc[n - 1] = rdtsc();
		lvl_red_in[n - 1] = red;
		lvl_red_out[n - 1] = ioapic_redir_lo(LEVEL_PIN);
		lvl_irr_out[n - 1] = lapic_irr_bit(VEC_LEVEL);
	}
	return 1;
}

static void lvl_dump(const char *what, uint64_t t0)
{
	for (uint32_t i = 0; i < lvl_n && i < LVL_LOG; i++)
		kprintf("pctest: level_irr: %s delivery %u at +%u us: entry "
			"0x%x, after EOI 0x%x, LAPIC IRR %u\n", what, i + 1,
			(uint32_t)udiv64(lvl_tsc[i] - t0, tsc_per_us),
			lvl_red_in[i], lvl_red_out[i], lvl_irr_out[i]);
}

void t_level_irr(void)
{
	const uint32_t rounds = 3;
	const uint32_t level = VEC_LEVEL | RED_LEVEL; /* high, fixed, physical */
	uint32_t n, lo;

	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}
	outb(0, TESTDEV_IRQ(LEVEL_PIN));
	cli();
	pic_set_mask(0xff, 0xff);
	lapic_setup();
	lvl_n = lvl_irr_bits = 0;
	lvl_stop_at = rounds;
	irq_handlers[VEC_LEVEL] = h_level;
	uint32_t u0 = isr_unset[VEC_LEVEL];
	ioapic_route(LEVEL_PIN, level, bsp_apic_id);
	lo = ioapic_redir_lo(LEVEL_PIN);
	if ((lo & ~(RED_PENDING | RED_REMOTE_IRR)) != level)
		t_fail("redirection entry reads 0x%x, wrote 0x%x", lo, level);
	sti();
	delay_ms(5);
	if (lvl_n)
		t_fail("%u interrupts with the line low", lvl_n);
	lvl_n = 0;

	/* Raise and keep high: each EOI must bring it back, until the
	 * handler lowers the line before its third EOI. */
	uint64_t t0 = rdtsc();
	outb(1, TESTDEV_IRQ(LEVEL_PIN));
	wait_count(&lvl_n, rounds, 500000);
	delay_ms(20);
	cli();
	n = lvl_n;
	if (n != rounds)
		lvl_dump("raise", t0);
	kprintf("pctest: level_irr: %u deliveries, remote IRR seen in "
		"handler mask 0x%x\n", n, lvl_irr_bits);
	if (n == 0)
		t_fail("no interrupt after raising IRQ %u", LEVEL_PIN);
	else if (n < rounds)
		t_fail("%u deliveries: not re-delivered after EOI while the "
		       "line stayed high", n);
	else if (n > rounds)
		t_fail("%u deliveries, expected %u (more after the line was "
		       "lowered)", n, rounds);
	uint32_t want_bits = (1u << (n < rounds ? n : rounds)) - 1;
	if ((lvl_irr_bits & want_bits) != want_bits)
		t_fail("remote IRR (bit 14) clear in the handler (set in "
		       "deliveries mask 0x%x)", lvl_irr_bits);
	lo = ioapic_redir_lo(LEVEL_PIN);
	if (lo & RED_REMOTE_IRR)
		t_fail("remote IRR still set after the line was lowered and "
		       "EOIed (0x%x)", lo);

	/* A level request that arrives while masked is delivered on unmask. */
	outb(0, TESTDEV_IRQ(LEVEL_PIN));
	lvl_n = lvl_irr_bits = 0;
	lvl_stop_at = 1;
	ioapic_mask(LEVEL_PIN);
	outb(1, TESTDEV_IRQ(LEVEL_PIN));
	sti();
	delay_ms(5);
	if (lvl_n)
		t_fail("%u interrupts while the pin was masked", lvl_n);
	lvl_n = 0;
	t0 = rdtsc();
	ioapic_route(LEVEL_PIN, level, bsp_apic_id);
	wait_count(&lvl_n, 1, 100000);
	delay_ms(10);
	cli();
	if (lvl_n != 1)
		lvl_dump("unmask", t0);
	if (lvl_n != 1)
		t_fail("unmasking with the line high: %u deliveries, expected 1",
		       lvl_n);
	ioapic_mask(LEVEL_PIN);
	outb(0, TESTDEV_IRQ(LEVEL_PIN));
	irq_handlers[VEC_LEVEL] = 0;
	isr_check(VEC_LEVEL, u0);
}

/* ------------------------------------------------------------ spurious */

void t_spurious(void)
{
	uint32_t v;

	if (!have_apic) {
		t_fail("no local APIC");
		return;
	}
	cli();
	lapic_write(LAPIC_SVR, 0x1ff);
	if (((v = lapic_read(LAPIC_SVR)) & 0x1ff) != 0x1ff)
		t_fail("SVR reads 0x%x after writing 0x1ff", v);
	lapic_write(LAPIC_SVR, 0x1ef);
	if (((v = lapic_read(LAPIC_SVR)) & 0x1ff) != 0x1ef)
		t_fail("SVR reads 0x%x after writing 0x1ef", v);
	lapic_write(LAPIC_SVR, 0x0ff); /* software disable */
	if (((v = lapic_read(LAPIC_SVR)) & 0x1ff) != 0x0ff)
		t_fail("SVR reads 0x%x after writing 0x0ff", v);
	kprintf("pctest: spurious: software-disabled: LVT LINT0 0x%x timer "
		"0x%x\n", lapic_read(LAPIC_LVT_LINT0),
		lapic_read(LAPIC_LVT_TIMER));
	lapic_write(LAPIC_SVR, 0x1ff);
	if (((v = lapic_read(LAPIC_SVR)) & 0x1ff) != 0x1ff)
		t_fail("SVR reads 0x%x after re-enabling", v);
	lapic_setup();
	if (pic_spurious)
		kprintf("pctest: spurious: %u 8259 spurious interrupts so far\n",
			pic_spurious);
}

/* ------------------------------------------------------------ i8042 */

void t_i8042_reset(void)
{
	struct tmo t;

	kprintf("pctest: i8042_reset: writing 0xfe to port 0x64\n");
	cli();
	tmo_start(&t, 10000);
	while ((inb(0x64) & 2) && !tmo_done(&t))
		;
	outb(0xfe, 0x64);
	delay_ms(100);
	t_fail("still running 100 ms after the reset command");
}
