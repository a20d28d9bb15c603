/* pctest: MP specification 1.4 table (floating pointer and "PCMP"). */
#include "pctest.h"

static struct mp_info mp;

static uint8_t sum8(uint32_t addr, uint32_t len)
{
	const volatile uint8_t *p = phys_ptr(addr);
	uint8_t s = 0;

	while (len--)
		s = (uint8_t)(s + *p++);
	return s;
}

static uint8_t rd8(uint32_t a) { return *(const volatile uint8_t *)phys_ptr(a); }
static uint16_t rd16(uint32_t a) { return *(const volatile uint16_t *)phys_ptr(a); }
static uint32_t rd32(uint32_t a) { return *(const volatile uint32_t *)phys_ptr(a); }

static int is_sig(uint32_t a, const char *sig)
{
	for (int i = 0; i < 4; i++)
		if (rd8(a + i) != (uint8_t)sig[i])
			return 0;
	return 1;
}

/* A "_MP_" at 16-byte alignment with length 1 and a zero checksum. */
static uint32_t scan(uint32_t start, uint32_t end)
{
	for (uint32_t a = start; a + 16 <= end; a += 16)
		if (is_sig(a, "_MP_") && rd8(a + 8) == 1 && sum8(a, 16) == 0)
			return a;
	/* Report a floating pointer with a bad checksum too. */
	for (uint32_t a = start; a + 16 <= end; a += 16)
		if (is_sig(a, "_MP_") && rd8(a + 8) == 1)
			return a | 1;
	return 0;
}

static void problem(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

struct pbuf {
	char *b;
	unsigned n, cap;
};

static void pb_putc(char c, void *ctx)
{
	struct pbuf *p = ctx;
	if (p->n + 1 < p->cap) {
		p->b[p->n++] = c;
		p->b[p->n] = 0;
	}
}

static void problem(const char *fmt, ...)
{
	struct pbuf p = { mp.problem, 0, sizeof(mp.problem) };
	va_list ap;

	if (mp.problem[0])
		return;
	va_start(ap, fmt);
	vformat(pb_putc, &p, fmt, ap);
	va_end(ap);
}

static void parse(void)
{
	uint32_t fp = 0, ebda = (uint32_t)rd16(0x40e) << 4;

	mp.parsed = 1;
	mp.bp_id = -1;
	mp.isa_bus = -1;
	mp.irq0_pin = -1;

	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = scan(ebda, ebda + 1024);
	if (!fp)
		fp = scan(0x9fc00, 0xa0000);
	if (!fp)
		fp = scan(0xf0000, 0x100000);
	if (!fp) {
		problem("no _MP_ floating pointer in the EBDA, 0x9fc00-0x9ffff "
			"or 0xf0000-0xfffff");
		return;
	}
	if (fp & 1) {
		fp &= ~1u;
		problem("floating pointer at 0x%x has a bad checksum", fp);
	}
	mp.found = 1;
	mp.fp_addr = fp;
	uint8_t rev = rd8(fp + 9), feat1 = rd8(fp + 11);
	mp.table_addr = rd32(fp + 4);
	if (rev != 1 && rev != 4)
		problem("floating pointer spec revision %u", rev);
	if (feat1) {
		problem("default configuration %u instead of a table", feat1);
		return;
	}
	uint32_t t = mp.table_addr;
	if (!t) {
		problem("table address 0x%x", t);
		return;
	}
	if (!is_sig(t, "PCMP")) {
		problem("no PCMP signature at 0x%x", t);
		return;
	}
	uint16_t len = rd16(t + 4);
	uint16_t count = rd16(t + 0x22);
	uint16_t ext_len = rd16(t + 0x28);
	if (len < 0x2c) {
		problem("base table length %u", len);
		return;
	}
	if (sum8(t, len))
		problem("base table checksum is wrong");
	if (rd8(t + 6) != 1 && rd8(t + 6) != 4)
		problem("table spec revision %u", rd8(t + 6));
	if (ext_len &&
	    (uint8_t)(sum8(t + len, ext_len) + rd8(t + 0x2a)) != 0)
		problem("extended table checksum is wrong");
	mp.lapic_addr = rd32(t + 0x24);
	mp.entries = count;

	uint32_t e = t + 0x2c, end = t + len;
	for (unsigned i = 0; i < count; i++) {
		if (e >= end) {
			problem("entry %u of %u is past the table length", i,
				count);
			return;
		}
		uint8_t type = rd8(e);
		switch (type) {
		case 0: /* processor */
			if (e + 20 > end)
				break;
			if (rd8(e + 3) & 1) {
				if (mp.ncpus < MP_MAX_CPUS)
					mp.cpu_id[mp.ncpus] = rd8(e + 1);
				mp.ncpus++;
			}
			if (rd8(e + 3) & 2) {
				mp.bp_id = rd8(e + 1);
				mp.nbp++;
			}
			e += 20;
			continue;
		case 1: { /* bus */
			static const char isa[6] = { 'I', 'S', 'A', ' ', ' ', ' ' };
			int ok = 1;
			for (int k = 0; k < 6; k++)
				if (rd8(e + 2 + k) != (uint8_t)isa[k])
					ok = 0;
			if (ok && mp.isa_bus < 0)
				mp.isa_bus = rd8(e + 1);
			e += 8;
			continue;
		}
		case 2: /* I/O APIC */
			if (mp.nioapic < 8) {
				mp.ioapic_addr[mp.nioapic] = rd32(e + 4);
				mp.ioapic_flags[mp.nioapic] = rd8(e + 3);
			}
			mp.nioapic++;
			e += 8;
			continue;
		case 3: /* I/O interrupt */
			if (mp.isa_bus >= 0 && rd8(e + 4) == mp.isa_bus &&
			    rd8(e + 5) == 0 && rd8(e + 1) == 0 /* INT */)
				mp.irq0_pin = rd8(e + 7);
			e += 8;
			continue;
		case 4: /* local interrupt */
			e += 8;
			continue;
		default:
			break;
		}
		problem("entry %u has unknown type %u", i, type);
		return;
	}
	if (e != end)
		problem("entries end at +0x%x, base table length is 0x%x",
			e - t, len);
}

const struct mp_info *mp_get(void)
{
	if (!mp.parsed)
		parse();
	return &mp;
}

void t_mptable(void)
{
	const struct mp_info *m = mp_get();

	if (!m->found) {
		t_fail("%s", m->problem);
		return;
	}
	kprintf("pctest: mp floating pointer at 0x%x, table at 0x%x, %u "
		"entries, %u cpus, lapic 0x%x, irq0 -> pin %d\n",
		m->fp_addr, m->table_addr, m->entries, m->ncpus, m->lapic_addr,
		m->irq0_pin);
	if (m->problem[0])
		t_fail("%s", m->problem);
	if (m->ncpus != opt_cpus)
		t_fail("%u enabled processor entries, expected cpus=%u",
		       m->ncpus, opt_cpus);
	for (unsigned i = 0; i < m->ncpus && i < MP_MAX_CPUS; i++)
		for (unsigned j = 0; j < i; j++)
			if (m->cpu_id[i] == m->cpu_id[j])
				t_fail("APIC id %u listed twice", m->cpu_id[i]);
	if (m->nbp != 1)
		t_fail("%u processor entries with the BP flag", m->nbp);
	else if (have_apic && (uint32_t)m->bp_id != bsp_apic_id)
		t_fail("BP entry has APIC id %d, the BSP is %u", m->bp_id,
		       bsp_apic_id);
	if (m->lapic_addr != 0xfee00000u)
		t_fail("local APIC address 0x%x", m->lapic_addr);
	int io = 0;
	for (unsigned i = 0; i < m->nioapic && i < 8; i++)
		if (m->ioapic_addr[i] == IOAPIC_BASE && (m->ioapic_flags[i] & 1))
			io = 1;
	if (!io)
		t_fail("no enabled I/O APIC entry at 0x%x (%u I/O APIC entries)",
		       IOAPIC_BASE, m->nioapic);
	if (m->isa_bus < 0)
		t_fail("no ISA bus entry");
}
