/*
 * virtio guest: the virtio 1.x PCI transport (capabilities, device
 * status, feature negotiation, MSI-X or plain MSI) and split virtqueues.
 */
#include "virtio.h"

#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR    3
#define CAP_DEVICE 4
#define CAP_PCI_CFG 5

/* Ring memory: descriptor table, avail ring, used ring, a page each. */
#define MAX_RINGS 4
static uint8_t ring_mem[MAX_RINGS][3 * 4096] __attribute__((aligned(4096)));
static unsigned rings_used;

/* Wait this long for the interrupt once a used entry is visible. */
#define IRQ_GRACE_US 1000000u

/* "<device> <what>" for result lines (a few rotating buffers). */
static const char *tn(struct vdev *d, const char *what)
{
	static char names[4][40];
	static unsigned next;
	char *b = names[next++ & 3];
	unsigned n = 0;

	for (const char *s = d->name; *s && n < sizeof(names[0]) - 2; s++)
		b[n++] = *s;
	b[n++] = ' ';
	for (const char *s = what; *s && n < sizeof(names[0]) - 1; s++)
		b[n++] = *s;
	b[n] = 0;
	return b;
}

/* ------------------------------------------------------------ probe */

static int cap_region(struct vdev *d, uint8_t at, uint32_t *addr, uint32_t *len)
{
	struct pci_fn *p = d->pci;
	uint8_t bar = pci_r8(p, (uint8_t)(at + 4));
	uint32_t off = pci_r32(p, (uint8_t)(at + 8));
	uint32_t length = pci_r32(p, (uint8_t)(at + 12));

	if (bar > 5 || !p->bar[bar].mem || !p->bar[bar].addr) {
		t_fail(tn(d, "caps"), "cfg_type %u in BAR%u, which is not a "
		       "usable memory BAR", pci_r8(p, (uint8_t)(at + 3)), bar);
		return 0;
	}
	if (off > p->bar[bar].size || length > p->bar[bar].size - off) {
		t_fail(tn(d, "caps"), "cfg_type %u region 0x%x+0x%x outside "
		       "BAR%u (size 0x%x)", pci_r8(p, (uint8_t)(at + 3)), off,
		       length, bar, p->bar[bar].size);
		return 0;
	}
	*addr = p->bar[bar].addr + off;
	*len = length;
	return 1;
}

int vdev_probe(struct vdev *d, struct pci_fn *p, const char *name)
{
	uint8_t found[6] = { 0 };
	uint8_t at = 0;
	uint32_t len;

	memset(d, 0, sizeof(*d));
	d->name = name;
	d->pci = p;
	if (!pci_setup_bars(p, opt_reassign)) {
		t_fail(tn(d, "bars"), "a memory BAR could not be placed");
		return 0;
	}
	while ((at = pci_find_cap(p, 0x09, at)) != 0) {
		uint8_t type = pci_r8(p, (uint8_t)(at + 3));
		if (type >= 1 && type <= 5 && !found[type])
			found[type] = at;
	}
	if (!found[CAP_COMMON] || !found[CAP_NOTIFY] || !found[CAP_ISR] ||
	    !found[CAP_DEVICE]) {
		t_fail(tn(d, "caps"), "missing virtio capabilities: common %s "
		       "notify %s isr %s device %s (a legacy-only device?)",
		       found[1] ? "yes" : "no", found[2] ? "yes" : "no",
		       found[3] ? "yes" : "no", found[4] ? "yes" : "no");
		return 0;
	}
	if (!cap_region(d, found[CAP_COMMON], &d->common, &len))
		return 0;
	d->common_cap = found[CAP_COMMON];
	d->pcicfg_cap = found[CAP_PCI_CFG];
	if (len < 0x38) {
		t_fail(tn(d, "caps"), "common config is only %u bytes", len);
		return 0;
	}
	if (!cap_region(d, found[CAP_NOTIFY], &d->notify_base, &len) ||
	    !cap_region(d, found[CAP_ISR], &d->isr, &len) ||
	    !cap_region(d, found[CAP_DEVICE], &d->devcfg, &d->devcfg_len))
		return 0;
	d->notify_mult = pci_r32(p, (uint8_t)(found[CAP_NOTIFY] + 16));
	d->msix_cap = pci_find_cap(p, 0x11, 0);
	d->msi_cap = pci_find_cap(p, 0x05, 0);
	kprintf("virtio: %s caps: common 0x%x notify 0x%x (x%u) isr 0x%x "
		"device 0x%x (%u bytes) msix cap 0x%x msi cap 0x%x pci_cfg "
		"cap 0x%x\n", name, d->common, d->notify_base, d->notify_mult,
		d->isr, d->devcfg, d->devcfg_len, d->msix_cap, d->msi_cap,
		d->pcicfg_cap);
	return 1;
}

/* ------------------------------------------------------------ status */

uint8_t vdev_status(struct vdev *d)
{
	return mr8(d->common + CC_STATUS);
}

static void set_status(struct vdev *d, uint8_t s)
{
	mw8(d->common + CC_STATUS, s);
}

void vdev_reset(struct vdev *d)
{
	struct tmo t;

	if (!d->common)
		return;
	set_status(d, 0);
	tmo_start(&t, 1000000);
	while (vdev_status(d) != 0 && !tmo_done(&t))
		cpu_relax();
}

int vdev_negotiate(struct vdev *d, uint64_t want)
{
	const char *name = tn(d, "init");
	struct tmo t;

	set_status(d, 0);
	tmo_start(&t, 1000000);
	while (vdev_status(d) != 0) {
		if (tmo_done(&t)) {
			t_fail(name, "device status 0x%x after reset, not 0",
			       vdev_status(d));
			return 0;
		}
		cpu_relax();
	}
	set_status(d, VIRTIO_STATUS_ACK);
	set_status(d, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);

	mw32(d->common + CC_DFSELECT, 0);
	uint32_t lo = mr32(d->common + CC_DF);
	mw32(d->common + CC_DFSELECT, 1);
	uint32_t hi = mr32(d->common + CC_DF);
	d->features = ((uint64_t)hi << 32) | lo;
	d->num_queues = mr16(d->common + CC_NUMQ);
	if (!(d->features & ((uint64_t)1 << VIRTIO_F_VERSION_1))) {
		set_status(d, VIRTIO_STATUS_FAILED);
		t_fail(name, "VIRTIO_F_VERSION_1 not offered (features 0x%llx)",
		       (unsigned long long)d->features);
		return 0;
	}
	d->accepted = (d->features & want) | ((uint64_t)1 << VIRTIO_F_VERSION_1);
	mw32(d->common + CC_GFSELECT, 0);
	mw32(d->common + CC_GF, (uint32_t)d->accepted);
	mw32(d->common + CC_GFSELECT, 1);
	mw32(d->common + CC_GF, (uint32_t)(d->accepted >> 32));
	set_status(d, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER |
			      VIRTIO_STATUS_FEATURES_OK);
	uint8_t st = vdev_status(d);
	kprintf("virtio: %s features offered 0x%llx accepted 0x%llx, "
		"%u queues, status 0x%x\n", d->name,
		(unsigned long long)d->features,
		(unsigned long long)d->accepted, d->num_queues, st);
	if (!(st & VIRTIO_STATUS_FEATURES_OK)) {
		set_status(d, VIRTIO_STATUS_FAILED);
		t_fail(name, "FEATURES_OK did not stick (status 0x%x)", st);
		return 0;
	}
	return 1;
}

void vdev_driver_ok(struct vdev *d)
{
	set_status(d, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER |
			      VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

/* ------------------------------------------------------------ config */

uint8_t cfg_r8(struct vdev *d, uint32_t off)
{
	return mr8(d->devcfg + off);
}

uint16_t cfg_r16(struct vdev *d, uint32_t off)
{
	return mr16(d->devcfg + off);
}

uint32_t cfg_r32(struct vdev *d, uint32_t off)
{
	return mr32(d->devcfg + off);
}

uint64_t cfg_r64(struct vdev *d, uint32_t off)
{
	uint32_t lo, hi;
	uint8_t gen;
	int tries = 0;

	do {
		gen = mr8(d->common + CC_CFGGEN);
		lo = mr32(d->devcfg + off);
		hi = mr32(d->devcfg + off + 4);
	} while (gen != mr8(d->common + CC_CFGGEN) && ++tries < 100);
	return ((uint64_t)hi << 32) | lo;
}

/* ------------------------------------------------------------ MSI-X */

int vdev_msix_setup(struct vdev *d, const uint8_t *vectors, unsigned n)
{
	const char *name = tn(d, "msix");
	struct pci_fn *p = d->pci;

	if (!have_apic) {
		t_fail(name, "no local APIC");
		return 0;
	}
	if (!d->msix_cap) {
		t_fail(name, "no MSI-X capability");
		return 0;
	}
	vdev_msi_disable(d); /* never both MSI and MSI-X */
	uint16_t mc = pci_r16(p, (uint8_t)(d->msix_cap + 2));
	uint32_t tbl = pci_r32(p, (uint8_t)(d->msix_cap + 4));
	unsigned bir = tbl & 7;
	d->msix_entries = (uint16_t)((mc & 0x7ff) + 1);
	if (d->msix_entries < n) {
		t_fail(name, "table has %u entries, need %u", d->msix_entries, n);
		return 0;
	}
	if (bir > 5 || !p->bar[bir].mem || !p->bar[bir].addr ||
	    (tbl & ~7u) + 16u * d->msix_entries > p->bar[bir].size) {
		t_fail(name, "table in BAR%u offset 0x%x is not usable", bir,
		       tbl & ~7u);
		return 0;
	}
	d->msix_table = p->bar[bir].addr + (tbl & ~7u);
	kprintf("virtio: %s msix table BAR%u+0x%x (0x%x), %u entries\n",
		d->name, bir, tbl & ~7u, d->msix_table, d->msix_entries);

	/* Enable with the function masked, fill the table, then unmask. */
	mc = (uint16_t)(mc | 0x8000 | 0x4000);
	pci_w16(p, (uint8_t)(d->msix_cap + 2), mc);
	for (unsigned i = 0; i < d->msix_entries; i++) {
		uint32_t e = d->msix_table + 16 * i;
		mw32(e + 12, 1);
		if (i >= n)
			continue;
		mw32(e + 0, 0xfee00000u | (apic_id << 12));
		mw32(e + 4, 0);
		mw32(e + 8, vectors[i]); /* fixed, edge */
		mw32(e + 12, 0);
	}
	for (unsigned i = 0; i < n; i++) {
		uint32_t e = d->msix_table + 16 * i;
		if (mr32(e) != (0xfee00000u | (apic_id << 12)) ||
		    mr32(e + 8) != vectors[i] || (mr32(e + 12) & 1)) {
			t_fail(name, "table entry %u reads back addr 0x%x data "
			       "0x%x ctrl 0x%x", i, mr32(e), mr32(e + 8),
			       mr32(e + 12));
			return 0;
		}
	}
	mc = (uint16_t)(mc & ~0x4000);
	pci_w16(p, (uint8_t)(d->msix_cap + 2), mc);
	uint16_t back = pci_r16(p, (uint8_t)(d->msix_cap + 2));
	if ((back & 0xc000) != 0x8000) {
		t_fail(name, "message control reads 0x%x after writing 0x%x",
		       back, mc);
		return 0;
	}
	return 1;
}

/* ------------------------------------------------------------ MSI */

void vdev_msi_disable(struct vdev *d)
{
	if (!d->msi_cap)
		return;
	uint8_t at = (uint8_t)(d->msi_cap + 2);
	uint16_t mc = pci_r16(d->pci, at);
	if (mc & 1)
		pci_w16(d->pci, at, (uint16_t)(mc & ~1u));
}

/*
 * PCI 3.0 6.8.1: message control at +2 (bit 0 enable, bits 6:4 multiple
 * message enable, bit 7 64-bit address, bit 8 per-vector masking),
 * address at +4, then either the upper address at +8 and data at +12
 * (64-bit) or data at +8; the mask bits follow the data (+16 or +12).
 */
int vdev_msi_setup(struct vdev *d, uint8_t vector)
{
	const char *name = tn(d, "msi");
	struct pci_fn *p = d->pci;
	uint8_t c = d->msi_cap;

	if (!have_apic) {
		t_fail(name, "no local APIC");
		return 0;
	}
	if (!c) {
		t_fail(name, "no MSI capability");
		return 0;
	}
	/* MSI-X off: the device then uses MSI (PCI 3.0 6.8.3.3). */
	if (d->msix_cap) {
		uint8_t xat = (uint8_t)(d->msix_cap + 2);
		uint16_t xmc = pci_r16(p, xat);
		if (xmc & 0x8000)
			pci_w16(p, xat, (uint16_t)(xmc & ~0xc000u));
	}
	uint8_t mc_at = (uint8_t)(c + 2);
	uint16_t mc = pci_r16(p, mc_at);
	int is64 = (mc >> 7) & 1, pvm = (mc >> 8) & 1;
	uint8_t data_at = (uint8_t)(c + (is64 ? 12 : 8));
	uint8_t mask_at = (uint8_t)(c + (is64 ? 16 : 12));
	uint32_t addr = 0xfee00000u | (apic_id << 12);

	/* Disabled while it is programmed; one message (MME 0). */
	mc = (uint16_t)(mc & ~0x0071u);
	pci_w16(p, mc_at, mc);
	pci_w32(p, (uint8_t)(c + 4), addr);
	if (is64)
		pci_w32(p, (uint8_t)(c + 8), 0);
	pci_w16(p, data_at, vector); /* fixed, edge */
	if (pvm)
		pci_w32(p, mask_at, pci_r32(p, mask_at) & ~1u);
	pci_w16(p, mc_at, (uint16_t)(mc | 1));

	uint16_t mc1 = pci_r16(p, mc_at);
	uint32_t a = pci_r32(p, (uint8_t)(c + 4));
	uint32_t ahi = is64 ? pci_r32(p, (uint8_t)(c + 8)) : 0;
	uint16_t data = pci_r16(p, data_at);
	uint16_t xmc = d->msix_cap ? pci_r16(p, (uint8_t)(d->msix_cap + 2)) : 0;
	kprintf("virtio: %s msi cap 0x%x: %s-bit address%s; address 0x%x "
		"(high 0x%x) data 0x%x control 0x%x (MSI-X control 0x%x)\n",
		d->name, c, is64 ? "64" : "32", pvm ? ", per-vector masking" : "",
		a, ahi, data, mc1, xmc);
	if (!(mc1 & 1) || (mc1 & 0x70) || a != addr || ahi || data != vector ||
	    (xmc & 0x8000)) {
		t_fail(name, "MSI reads back control 0x%x address 0x%x (high "
		       "0x%x) data 0x%x (MSI-X control 0x%x) after programming "
		       "address 0x%x data 0x%x enable 1", mc1, a, ahi, data, xmc,
		       addr, vector);
		vdev_msi_disable(d);
		return 0;
	}
	return 1;
}

int vdev_config_vector(struct vdev *d, uint16_t entry)
{
	mw16(d->common + CC_MSIX, entry);
	uint16_t back = mr16(d->common + CC_MSIX);
	if (back != entry) {
		t_fail(tn(d, "msix"), "config_msix_vector %u reads back 0x%x",
		       entry, back);
		return 0;
	}
	return 1;
}

/* ------------------------------------------------------------ queues */

int vq_setup(struct vdev *d, struct vq *q, uint16_t index, uint16_t entry,
	     uint8_t vec)
{
	const char *name = tn(d, "queue");
	/* A queue set up again (after a device reset) keeps its ring memory. */
	uint8_t *mem = (uint8_t *)q->desc;

	memset(q, 0, sizeof(*q));
	q->desc = (struct virtq_desc *)mem;
	q->dev = d;
	q->index = index;
	if (index >= d->num_queues) {
		t_fail(name, "queue %u: device has %u queues", index,
		       d->num_queues);
		return 0;
	}
	if (!mem && rings_used >= MAX_RINGS) {
		t_fail(name, "out of ring memory");
		return 0;
	}
	mw16(d->common + CC_Q_SELECT, index);
	uint16_t max = mr16(d->common + CC_Q_SIZE);
	if (!max) {
		t_fail(name, "queue %u size 0 (not available)", index);
		return 0;
	}
	uint16_t size = 1;
	while ((uint32_t)size * 2 <= max && (uint32_t)size * 2 <= opt_qsize)
		size = (uint16_t)(size * 2);
	mw16(d->common + CC_Q_SIZE, size);
	q->size = size;

	mw16(d->common + CC_Q_MSIX, entry);
	uint16_t back = mr16(d->common + CC_Q_MSIX);
	if (back != entry) {
		t_fail(tn(d, "msix"), "queue %u msix_vector %u reads back 0x%x",
		       index, entry, back);
		return 0;
	}
	/* Plain MSI has no virtio vectors: one message for everything. */
	q->vec = entry != VIRTIO_NO_VECTOR || d->msi_on ? vec : 0;
	q->irq_seen = q->vec ? irq_count[q->vec] : 0;

	if (!mem)
		mem = ring_mem[rings_used++];
	memset(mem, 0, 3 * 4096);
	q->desc = (struct virtq_desc *)mem;
	q->avail = (volatile struct virtq_avail *)(mem + 4096);
	q->used = (volatile struct virtq_used *)(mem + 8192);
	for (uint16_t i = 0; i < size; i++)
		q->desc[i].next = (uint16_t)(i + 1);
	q->free_head = 0;
	q->num_free = size;
	if (!q->vec)
		q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;

	mw32(d->common + CC_Q_DESCLO, (uint32_t)(uintptr_t)q->desc);
	mw32(d->common + CC_Q_DESCHI, 0);
	mw32(d->common + CC_Q_AVAILLO, (uint32_t)(uintptr_t)q->avail);
	mw32(d->common + CC_Q_AVAILHI, 0);
	mw32(d->common + CC_Q_USEDLO, (uint32_t)(uintptr_t)q->used);
	mw32(d->common + CC_Q_USEDHI, 0);
	uint16_t noff = mr16(d->common + CC_Q_NOFF);
	q->notify = d->notify_base + (uint32_t)noff * d->notify_mult;
	mw16(d->common + CC_Q_ENABLE, 1);
	uint16_t en = mr16(d->common + CC_Q_ENABLE);
	kprintf("virtio: %s queue %u: max %u size %u msix %u vector 0x%x "
		"notify_off %u (0x%x) rings 0x%x/0x%x/0x%x enable %u\n",
		d->name, index, max, size, entry, q->vec, noff, q->notify,
		(uint32_t)(uintptr_t)q->desc, (uint32_t)(uintptr_t)q->avail,
		(uint32_t)(uintptr_t)q->used, en);
	if (en != 1) {
		t_fail(name, "queue %u: queue_enable reads back %u", index, en);
		return 0;
	}
	return 1;
}

int vq_add(struct vq *q, const struct sg *sg, unsigned n_out, unsigned n_in)
{
	unsigned n = n_out + n_in;

	if (!n || n > q->num_free)
		return -1;
	uint16_t head = q->free_head, i = head, last = head;
	for (unsigned k = 0; k < n; k++) {
		struct virtq_desc *dsc = &q->desc[i];
		dsc->addr = sg[k].addr;
		dsc->len = sg[k].len;
		dsc->flags = (uint16_t)((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) |
					(k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		last = i;
		i = dsc->next;
	}
	q->free_head = q->desc[last].next;
	q->num_free = (uint16_t)(q->num_free - n);
	q->chain_len[head] = (uint16_t)n;

	uint16_t idx = q->avail->idx;
	q->avail->ring[idx & (q->size - 1)] = head;
	barrier(); /* the ring entry before the index (x86: stores in order) */
	q->avail->idx = (uint16_t)(idx + 1);
	return head;
}

void vq_kick(struct vq *q)
{
	mb(); /* the avail index is visible before the notification */
	mw16(q->notify, q->index);
}

int vq_get_used(struct vq *q, uint32_t *len)
{
	if (q->used->idx == q->last_used)
		return -1;
	barrier();
	volatile struct virtq_used_elem *e =
		&q->used->ring[q->last_used & (q->size - 1)];
	uint32_t id = e->id;
	if (len)
		*len = e->len;
	q->last_used++;
	if (id >= q->size || !q->chain_len[id]) {
		t_fail(tn(q->dev, "used ring"), "queue %u: bad id %u", q->index,
		       id);
		return -1;
	}
	/* Return the chain to the free list. */
	uint16_t n = q->chain_len[id], last = (uint16_t)id;
	for (uint16_t k = 1; k < n; k++)
		last = q->desc[last].next;
	q->desc[last].next = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + n);
	q->chain_len[id] = 0;
	return (int)id;
}

/*
 * A used entry counts as signalled once an interrupt was seen after it
 * was published: when the interrupt count moves, every entry up to the
 * used index read then is covered (several entries may share one
 * interrupt, since MSIs to the same vector can merge in the IRR).
 */
int vq_wait(struct vq *q, uint32_t timeout_us)
{
	struct vdev *d = q->dev;
	struct tmo t;
	int have = 0, grace = 0;
	uint16_t *cov = &q->covered;

	tmo_start(&t, timeout_us);
	for (;;) {
		if (d->use_irq && q->vec) {
			cli();
			uint32_t c = irq_count[q->vec];
			if (c != q->irq_seen) {
				q->irq_seen = c;
				*cov = q->used->idx;
			}
		}
		have = q->used->idx != q->last_used;
		if (have && (!d->use_irq || !q->vec ||
			     (int16_t)(*cov - q->last_used) > 0))
			return 1;
		/* A used entry but no interrupt yet: give it IRQ_GRACE_US. */
		if (have && !grace) {
			grace = 1;
			tmo_start(&t, IRQ_GRACE_US);
		}
		if (tmo_done(&t))
			break;
		if (d->use_irq && q->vec) {
			if (timer_ok) {
				sti_hlt();
			} else {
				sti();
				cpu_relax();
			}
		} else {
			cpu_relax();
		}
	}
	cli();
	if (!have)
		return 0;
	/* A completion without its interrupt: report it once, then poll. */
	t_fail(tn(d, d->msi_on ? "msi" : "msix"), "no %s interrupt (vector "
	       "0x%x, queue %u) within %u ms of a used entry; polling the used "
	       "ring from now on", d->msi_on ? "MSI" : "MSI-X", q->vec,
	       q->index, IRQ_GRACE_US / 1000);
	d->use_irq = 0;
	wake_timer(0);
	return 1;
}

int vq_run(struct vq *q, const struct sg *sg, unsigned n_out, unsigned n_in,
	   uint32_t timeout_us)
{
	uint32_t len = 0;
	int head = vq_add(q, sg, n_out, n_in);

	if (head < 0)
		return -1;
	vq_kick(q);
	if (!vq_wait(q, timeout_us))
		return -1;
	int got = vq_get_used(q, &len);
	if (got != head) {
		if (got >= 0)
			t_fail(tn(q->dev, "used ring"), "queue %u: id %d, "
			       "expected %d", q->index, got, head);
		return -1;
	}
	return (int)len;
}
