/*
 * virtio guest: PCI configuration mechanism #1 (0xCF8/0xCFC), a bus 0
 * scan for virtio functions, BAR sizing and assignment, capabilities.
 */
#include "virtio.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc

/* Where this guest puts BARs that have no address (or all, with reassign). */
#define BAR_WINDOW_START 0xe0000000u
#define BAR_WINDOW_END   0xfe000000u

static uint32_t bar_next = BAR_WINDOW_START;

static void pci_sel(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t reg)
{
	outl(0x80000000u | ((uint32_t)bus << 16) | ((uint32_t)(dev & 31) << 11) |
		     ((uint32_t)(fn & 7) << 8) | (reg & 0xfc),
	     PCI_ADDR);
}

static uint32_t raw_r32(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t reg)
{
	pci_sel(bus, dev, fn, reg);
	return inl(PCI_DATA);
}

static uint16_t raw_r16(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t reg)
{
	pci_sel(bus, dev, fn, reg);
	return inw(PCI_DATA + (reg & 2));
}

static uint8_t raw_r8(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t reg)
{
	pci_sel(bus, dev, fn, reg);
	return inb(PCI_DATA + (reg & 3));
}

uint8_t pci_r8(const struct pci_fn *p, uint8_t reg)
{
	return raw_r8(p->bus, p->dev, p->fn, reg);
}

uint16_t pci_r16(const struct pci_fn *p, uint8_t reg)
{
	return raw_r16(p->bus, p->dev, p->fn, reg);
}

uint32_t pci_r32(const struct pci_fn *p, uint8_t reg)
{
	return raw_r32(p->bus, p->dev, p->fn, reg);
}

void pci_w8(const struct pci_fn *p, uint8_t reg, uint8_t v)
{
	pci_sel(p->bus, p->dev, p->fn, reg);
	outb(v, PCI_DATA + (reg & 3));
}

void pci_w16(const struct pci_fn *p, uint8_t reg, uint16_t v)
{
	pci_sel(p->bus, p->dev, p->fn, reg);
	outw(v, PCI_DATA + (reg & 2));
}

void pci_w32(const struct pci_fn *p, uint8_t reg, uint32_t v)
{
	pci_sel(p->bus, p->dev, p->fn, reg);
	outl(v, PCI_DATA);
}

static const char *type_name(int t)
{
	switch (t) {
	case 1: return "net";
	case 2: return "blk";
	case 3: return "console";
	case 4: return "rng";
	case 5: return "balloon";
	case 8: return "scsi";
	case 9: return "9p";
	default: return "other";
	}
}

static void probe_fn(uint8_t dev, uint8_t fn, struct pci_fn *devs,
		     unsigned max, unsigned *n)
{
	uint32_t id = raw_r32(0, dev, fn, 0x00);
	uint16_t vendor = (uint16_t)id, device = (uint16_t)(id >> 16);

	if (vendor != 0x1af4 || device < 0x1000 || device > 0x107f)
		return;
	struct pci_fn p;
	memset(&p, 0, sizeof(p));
	p.bus = 0;
	p.dev = dev;
	p.fn = fn;
	p.vendor = vendor;
	p.device = device;
	p.subsys = raw_r16(0, dev, fn, 0x2e);
	p.rev = raw_r8(0, dev, fn, 0x08);
	/* Modern ids are 0x1040 + type; transitional ones (0x1000-0x103f)
	 * carry the type in the subsystem id. */
	p.type = device >= 0x1040 ? device - 0x1040 : p.subsys;
	kprintf("virtio: pci 00:%02x.%u %04x:%04x subsys %04x rev %u: "
		"type %d (%s)%s\n", dev, fn, vendor, device, p.subsys, p.rev,
		p.type, type_name(p.type),
		device < 0x1040 ? " transitional" : "");
	if (*n < max)
		devs[(*n)++] = p;
}

unsigned pci_scan_virtio(struct pci_fn *devs, unsigned max)
{
	unsigned n = 0;

	for (uint8_t dev = 0; dev < 32; dev++) {
		if ((uint16_t)raw_r32(0, dev, 0, 0x00) == 0xffff)
			continue;
		uint8_t nfn = (raw_r8(0, dev, 0, 0x0e) & 0x80) ? 8 : 1;
		for (uint8_t fn = 0; fn < nfn; fn++) {
			if ((uint16_t)raw_r32(0, dev, fn, 0x00) == 0xffff)
				continue;
			probe_fn(dev, fn, devs, max, &n);
		}
	}
	return n;
}

int pci_setup_bars(struct pci_fn *p, int reassign)
{
	uint16_t cmd = pci_r16(p, 0x04);
	int ok = 1;

	/* No decoding while the BARs are sized and moved. */
	pci_w16(p, 0x04, (uint16_t)(cmd & ~0x0007));
	for (int i = 0; i < 6; i++) {
		uint8_t off = (uint8_t)(0x10 + 4 * i);
		uint32_t lo = pci_r32(p, off);
		struct pci_bar *b = &p->bar[i];

		if (lo & 1) { /* I/O BAR (the legacy interface): left alone */
			b->addr = lo & ~3u;
			continue;
		}
		int is64 = ((lo >> 1) & 3) == 2;
		uint32_t hi = 0, szhi = 0xffffffffu;
		pci_w32(p, off, 0xffffffffu);
		uint32_t szlo = pci_r32(p, off);
		pci_w32(p, off, lo);
		if (is64 && i < 5) {
			hi = pci_r32(p, off + 4);
			pci_w32(p, off + 4, 0xffffffffu);
			szhi = pci_r32(p, off + 4);
			pci_w32(p, off + 4, hi);
		}
		uint32_t mask = szlo & ~0xfu;
		if (!mask) {
			if (is64 && szhi && szhi != 0xffffffffu) {
				kprintf("virtio: %02x.%u BAR%d is 64-bit and "
					"4 GiB or larger: not usable\n",
					p->dev, p->fn, i);
				ok = 0;
			}
			if (is64)
				i++;
			continue; /* not implemented */
		}
		if (is64 && szhi != 0xffffffffu) {
			kprintf("virtio: %02x.%u BAR%d needs more than 4 GiB\n",
				p->dev, p->fn, i);
			ok = 0;
			i++;
			continue;
		}
		uint32_t size = ~mask + 1;
		uint32_t addr = lo & ~0xfu;
		const char *why = NULL;

		if (reassign)
			why = "reassign";
		else if (hi)
			why = "above 4 GiB";
		else if (!addr)
			why = "unassigned";
		if (why) {
			uint32_t a = (bar_next + size - 1) & ~(size - 1);
			if (a < bar_next || a + size > BAR_WINDOW_END ||
			    a + size < a) {
				kprintf("virtio: %02x.%u BAR%d: no room for "
					"0x%x bytes\n", p->dev, p->fn, i, size);
				ok = 0;
				if (is64)
					i++;
				continue;
			}
			pci_w32(p, off, a | (lo & 0xfu));
			if (is64)
				pci_w32(p, off + 4, 0);
			uint32_t back = pci_r32(p, off) & ~0xfu;
			if (hi)
				kprintf("virtio: %02x.%u BAR%d %s: 0x%x%08x -> "
					"0x%x (size 0x%x)\n", p->dev, p->fn, i,
					why, hi, addr, back, size);
			else
				kprintf("virtio: %02x.%u BAR%d %s: 0x%x -> 0x%x "
					"(size 0x%x)\n", p->dev, p->fn, i, why,
					addr, back, size);
			if (back != a)
				ok = 0;
			addr = a;
			bar_next = a + size;
		} else {
			kprintf("virtio: %02x.%u BAR%d mem%s 0x%x size 0x%x\n",
				p->dev, p->fn, i, is64 ? "64" : "32", addr,
				size);
		}
		b->addr = addr;
		b->size = size;
		b->mem = 1;
		b->is64 = (uint8_t)is64;
		if (is64)
			i++;
	}
	/* Memory decode and bus mastering on, INTx off; I/O as it was. */
	pci_w16(p, 0x04, (uint16_t)((cmd & 0x0001) | 0x0006 | 0x0400));
	return ok;
}

uint8_t pci_find_cap(const struct pci_fn *p, uint8_t id, uint8_t after)
{
	if (!(pci_r16(p, 0x06) & 0x10))
		return 0;
	uint8_t at = after ? pci_r8(p, (uint8_t)(after + 1)) : pci_r8(p, 0x34);
	for (int guard = 0; guard < 48 && at >= 0x40; guard++) {
		at &= 0xfc;
		if (pci_r8(p, at) == id)
			return at;
		at = pci_r8(p, (uint8_t)(at + 1));
	}
	return 0;
}
