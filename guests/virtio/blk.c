/*
 * virtio guest: virtio-blk driver, tests and the random-read benchmark.
 *
 * Disk contract: sector 0 starts with "PALACIOS-VIRTIO-DISK", then byte
 * i & 0xff for i in 20..511. The tests write sectors 8..15 with
 * (sector * 7 + i) & 0xff and read them back.
 */
#include "virtio.h"

#define VIRTIO_BLK_F_RO       5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH    9

#define VIRTIO_BLK_T_IN    0
#define VIRTIO_BLK_T_OUT   1
#define VIRTIO_BLK_T_FLUSH 4

#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define VIRTIO_BLK_S_UNSUPP 2

#define REQ_TIMEOUT_US 5000000u

static const char magic[] = "PALACIOS-VIRTIO-DISK";

struct blk_hdr {
	uint32_t type, reserved;
	uint64_t sector;
};

static struct blk_hdr hdr __attribute__((aligned(64)));
static volatile uint8_t status __attribute__((aligned(64)));
static uint8_t buf[8192] __attribute__((aligned(4096)));

static struct vq q0;
static uint64_t capacity;
static unsigned nreq;

/*
 * Plain MSI (cmdline msi): one message for every interrupt; the handler
 * reads (and so clears) the ISR register and counts what it said.
 */
static struct vdev *msi_dev;
static volatile uint32_t msi_irqs, msi_isr_q, msi_isr_cfg, msi_isr_none;
static int msi_broken; /* set up failed once: MSI-X from then on */

static void blk_msi_irq(void)
{
	if (!msi_dev || !msi_dev->isr)
		return;
	uint8_t isr = mr8(msi_dev->isr);
	msi_irqs++;
	if (isr & 1)
		msi_isr_q++;
	if (isr & 2)
		msi_isr_cfg++;
	if (!(isr & 3))
		msi_isr_none++;
}

/* The vector queue 0's interrupts arrive on (MSI-X entry 1 or the MSI). */
static uint8_t blk_qvec(struct vdev *d)
{
	return d->msi_on ? VEC_BLK_MSI : VEC_BLK_Q0;
}

/*
 * Device start-up (reset, features, MSI-X or MSI, queue 0, DRIVER_OK);
 * 'name' is the check a bad status after DRIVER_OK is reported under
 * (NULL: the caller reports it).
 */
static int blk_start(struct vdev *d, const char *name)
{
	static const uint8_t vecs[2] = { VEC_BLK_CONFIG, VEC_BLK_Q0 };

	if (!vdev_negotiate(d, (uint64_t)1 << VIRTIO_BLK_F_FLUSH))
		return 0;
	d->use_irq = 0;
	d->msi_on = 0;
	if (!opt_poll && opt_msi && d->msi_cap && !msi_broken) {
		/* MSI, not MSI-X: virtio has no vectors, so NO_VECTOR. */
		msi_dev = d;
		irq_hooks[VEC_BLK_MSI] = blk_msi_irq;
		if (vdev_msi_setup(d, VEC_BLK_MSI) &&
		    vdev_config_vector(d, VIRTIO_NO_VECTOR)) {
			d->use_irq = 1;
			d->msi_on = 1;
		} else {
			vdev_msi_disable(d);
			msi_broken = 1;
			kprintf("virtio: blk falling back to MSI-X\n");
		}
	}
	if (!opt_poll && !d->msi_on && vdev_msix_setup(d, vecs, 2) &&
	    vdev_config_vector(d, 0))
		d->use_irq = 1;
	wake_timer(d->use_irq);
	d->vqs = &q0;
	d->nvqs = 1;
	if (!vq_setup(d, &q0, 0,
		      d->use_irq && !d->msi_on ? 1 : VIRTIO_NO_VECTOR,
		      blk_qvec(d)))
		return 0;
	vdev_driver_ok(d);
	uint8_t st = vdev_status(d);
	if (st != 0x0f) {
		if (name)
			t_fail(name, "status 0x%x after DRIVER_OK", st);
		return 0;
	}
	return 1;
}

int blk_init(struct vdev *d)
{
	if (opt_msi && opt_poll)
		t_skip("blk msi", "poll");
	else if (opt_msi && !d->msi_cap)
		t_skip("blk msi", "no MSI capability");
	if (!blk_start(d, "blk init"))
		return 0;
	capacity = cfg_r64(d, 0);
	t_pass("blk init");
	if (d->msi_on)
		kprintf("virtio: blk using MSI interrupts (vector 0x%x, the "
			"handler reads the ISR)\n", VEC_BLK_MSI);
	else
		kprintf("virtio: blk using %s\n",
			d->use_irq ? "MSI-X interrupts" : "polling");
	return 1;
}

/*
 * One request: header, 'nseg' data segments of seglen bytes from buf
 * (device-writable for reads), status. Returns the status byte, or -1 on
 * timeout; *used gets the used length.
 */
static int blk_req(uint32_t type, uint64_t sector, unsigned nseg,
		   uint32_t seglen, uint32_t *used)
{
	struct sg sg[6];
	unsigned n = 0, n_out, n_in;
	int writable = type == VIRTIO_BLK_T_IN;

	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xff;
	sg[n].addr = (uint32_t)(uintptr_t)&hdr;
	sg[n++].len = sizeof(hdr);
	for (unsigned i = 0; i < nseg && i < 4; i++) {
		sg[n].addr = (uint32_t)(uintptr_t)buf + i * seglen;
		sg[n++].len = seglen;
	}
	sg[n].addr = (uint32_t)(uintptr_t)&status;
	sg[n++].len = 1;
	n_out = writable ? 1 : n - 1;
	n_in = n - n_out;
	nreq++;
	int len = vq_run(&q0, sg, n_out, n_in, REQ_TIMEOUT_US);
	if (len < 0)
		return -1;
	if (used)
		*used = (uint32_t)len;
	barrier();
	return status;
}

/* A request that did not complete with VIRTIO_BLK_S_OK. */
static void fail_status(const char *name, int st)
{
	if (st < 0)
		t_fail(name, "no completion within %u ms",
		       REQ_TIMEOUT_US / 1000);
	else
		t_fail(name, "status %d", st);
}

/* Byte i of sector 0 in the test disk layout. */
static uint8_t sector0_byte(int i)
{
	return i < 20 ? (uint8_t)magic[i] : (uint8_t)i;
}

/* The first byte of buf that differs from the sector 0 layout, or -1. */
static int sector0_diff(void)
{
	for (int i = 0; i < 512; i++)
		if (buf[i] != sector0_byte(i))
			return i;
	return -1;
}

static uint8_t pat(uint64_t sector, unsigned i)
{
	return (uint8_t)((uint32_t)sector * 7 + i);
}

/* The first difference between buf and the pattern for 'count' sectors from 'first'. */
static int check_pattern(uint64_t first, unsigned count, unsigned *at)
{
	for (unsigned s = 0; s < count; s++)
		for (unsigned i = 0; i < 512; i++)
			if (buf[s * 512 + i] != pat(first + s, i)) {
				*at = s * 512 + i;
				return 0;
			}
	return 1;
}

/*
 * blk msi: every request had an interrupt through the MSI vector whose
 * ISR read had the queue bit (0); one request is in flight at a time, so
 * that is at least one such interrupt per request.
 */
static void blk_msi_check(struct vdev *d, unsigned nreqs, uint32_t irqs,
			  uint32_t isr_q, uint32_t isr_cfg, uint32_t isr_none)
{
	const char *name = "blk msi";
	struct pci_fn *p = d->pci;
	uint16_t mc = pci_r16(p, (uint8_t)(d->msi_cap + 2));
	uint16_t xmc = d->msix_cap ? pci_r16(p, (uint8_t)(d->msix_cap + 2)) : 0;

	kprintf("virtio: blk msi: %u requests, %u MSI interrupts (vector "
		"0x%x): ISR bit 0 (queue) in %u, bit 1 (config) in %u, neither "
		"in %u; MSI control 0x%x, MSI-X control 0x%x\n", nreqs, irqs,
		VEC_BLK_MSI, isr_q, isr_cfg, isr_none, mc, xmc);
	if (!d->use_irq)
		return; /* "FAIL blk msi (no MSI interrupt ...)" said it */
	if (irqs < nreqs)
		t_fail(name, "%u MSI interrupts (vector 0x%x) for %u requests",
		       irqs, VEC_BLK_MSI, nreqs);
	else if (isr_q < nreqs)
		t_fail(name, "ISR bit 0 (queue interrupt) was set in %u of %u "
		       "interrupts, want at least one per request (%u)", isr_q,
		       irqs, nreqs);
	else if (!(mc & 1) || (xmc & 0x8000))
		t_fail(name, "MSI control 0x%x, MSI-X control 0x%x: want MSI "
		       "enabled and MSI-X disabled", mc, xmc);
	else
		t_pass(name);
}

/*
 * pci cfg window: VIRTIO_PCI_CAP_PCI_CFG (virtio 1.1 4.1.4.7) accesses
 * the BAR through configuration space: bar (+4), offset (+8) and length
 * (+12) choose the location, pci_cfg_data (+16) is the data. Reads
 * num_queues through it, and writes queue_select (0) through it.
 */
static void pci_cfg_window(struct vdev *d)
{
	const char *name = "pci cfg window";
	struct pci_fn *p = d->pci;
	uint8_t c = d->pcicfg_cap;

	if (!c) {
		t_skip(name, "no VIRTIO_PCI_CAP_PCI_CFG capability");
		return;
	}
	uint8_t bar = pci_r8(p, (uint8_t)(d->common_cap + 4));
	uint32_t coff = pci_r32(p, (uint8_t)(d->common_cap + 8));

	/* Read num_queues (le16 at common + 0x12). */
	pci_w8(p, (uint8_t)(c + 4), bar);
	pci_w32(p, (uint8_t)(c + 8), coff + CC_NUMQ);
	pci_w32(p, (uint8_t)(c + 12), 2);
	uint8_t rbar = pci_r8(p, (uint8_t)(c + 4));
	uint32_t roff = pci_r32(p, (uint8_t)(c + 8));
	uint32_t rlen = pci_r32(p, (uint8_t)(c + 12));
	uint16_t win = pci_r16(p, (uint8_t)(c + 16));
	uint16_t direct = mr16(d->common + CC_NUMQ);

	/* Write queue_select = 0 (after setting it to 1 directly). */
	mw16(d->common + CC_Q_SELECT, 1);
	uint16_t sel1 = mr16(d->common + CC_Q_SELECT);
	pci_w32(p, (uint8_t)(c + 8), coff + CC_Q_SELECT);
	pci_w32(p, (uint8_t)(c + 12), 2);
	pci_w16(p, (uint8_t)(c + 16), 0);
	uint16_t sel = mr16(d->common + CC_Q_SELECT);
	mw16(d->common + CC_Q_SELECT, 0);

	kprintf("virtio: %s: cap 0x%x, common cfg in BAR%u at 0x%x; cap bar "
		"%u offset 0x%x length %u read back; num_queues %u through the "
		"window, %u direct; queue_select %u after writing 1 directly, "
		"%u after writing 0 through the window\n", name, c, bar, coff,
		rbar, roff, rlen, win, direct, sel1, sel);
	if (rbar != bar || roff != coff + CC_NUMQ || rlen != 2)
		t_fail(name, "cap bar/offset/length read back %u/0x%x/%u after "
		       "writing %u/0x%x/2", rbar, roff, rlen, bar,
		       coff + CC_NUMQ);
	else if (win != direct)
		t_fail(name, "num_queues reads %u through pci_cfg_data, %u "
		       "through the BAR", win, direct);
	else if (sel != 0)
		t_fail(name, "queue_select reads %u after writing 0 through "
		       "pci_cfg_data (it read %u after writing 1 directly)", sel,
		       sel1);
	else
		t_pass(name);
}

void blk_tests(struct vdev *d)
{
	uint32_t used = 0;
	int st;
	unsigned at;
	uint8_t qvec = blk_qvec(d);
	uint32_t irq0 = irq_count[qvec];
	uint32_t mi0 = msi_irqs, mq0 = msi_isr_q, mc0 = msi_isr_cfg;
	uint32_t mn0 = msi_isr_none;
	unsigned req0 = nreq;

	/* --- configuration */
	kprintf("virtio: blk capacity %llu sectors (%llu MiB)",
		(unsigned long long)capacity,
		(unsigned long long)(capacity >> 11));
	if (d->features & ((uint64_t)1 << VIRTIO_BLK_F_BLK_SIZE))
		kprintf(", blk_size %u", cfg_r32(d, 20));
	if (d->features & ((uint64_t)1 << VIRTIO_BLK_F_RO))
		kprintf(", read-only");
	kprintf("\n");
	if (capacity < 16)
		t_fail("blk config", "capacity %llu sectors, need at least 16",
		       (unsigned long long)capacity);
	else
		t_pass("blk config");

	/* --- sector 0 */
	memset(buf, 0xee, 512);
	st = blk_req(VIRTIO_BLK_T_IN, 0, 1, 512, &used);
	if (st != VIRTIO_BLK_S_OK) {
		fail_status("blk read sector 0", st);
	} else {
		int bad = sector0_diff();
		if (bad >= 0)
			t_fail("blk read sector 0", "byte %d is 0x%02x, expected "
			       "0x%02x (disk not in the test layout?)", bad,
			       buf[bad], sector0_byte(bad));
		else
			t_pass("blk read sector 0");
	}
	uint32_t r0used = st == VIRTIO_BLK_S_OK ? used : 513;

	/* --- write sectors 8..15 (two 2 KiB data descriptors) */
	for (unsigned s = 0; s < 8; s++)
		for (unsigned i = 0; i < 512; i++)
			buf[s * 512 + i] = pat(8 + s, i);
	st = blk_req(VIRTIO_BLK_T_OUT, 8, 2, 2048, &used);
	if (st != VIRTIO_BLK_S_OK)
		fail_status("blk write sectors 8-15", st);
	else
		t_pass("blk write sectors 8-15");
	uint32_t wused = st == VIRTIO_BLK_S_OK ? used : 1;

	/* --- read them back (one 4 KiB descriptor), then sector 11 alone */
	memset(buf, 0, 4096);
	st = blk_req(VIRTIO_BLK_T_IN, 8, 1, 4096, &used);
	if (st != VIRTIO_BLK_S_OK)
		fail_status("blk read back 8-15", st);
	else if (!check_pattern(8, 8, &at))
		t_fail("blk read back 8-15", "sector %u byte %u is 0x%02x, "
		       "expected 0x%02x", 8 + at / 512, at % 512, buf[at],
		       pat(8 + at / 512, at % 512));
	else
		t_pass("blk read back 8-15");
	uint32_t rused = st == VIRTIO_BLK_S_OK ? used : 4097;

	memset(buf, 0, 512);
	st = blk_req(VIRTIO_BLK_T_IN, 11, 1, 512, &used);
	if (st != VIRTIO_BLK_S_OK)
		fail_status("blk read back 11", st);
	else if (!check_pattern(11, 1, &at))
		t_fail("blk read back 11", "byte %u is 0x%02x, expected 0x%02x",
		       at, buf[at], pat(11, at));
	else
		t_pass("blk read back 11");

	/* --- used lengths: data written by the device plus the status byte */
	if (r0used != 513 || rused != 4097 || wused != 1)
		t_fail("blk used len", "512-byte read %u (want 513), 4 KiB read "
		       "%u (want 4097), write %u (want 1)", r0used, rused, wused);
	else
		t_pass("blk used len");

	/* --- flush */
	if (d->accepted & ((uint64_t)1 << VIRTIO_BLK_F_FLUSH)) {
		st = blk_req(VIRTIO_BLK_T_FLUSH, 0, 0, 0, NULL);
		if (st != VIRTIO_BLK_S_OK)
			fail_status("blk flush", st);
		else
			t_pass("blk flush");
	} else {
		t_skip("blk flush", "VIRTIO_BLK_F_FLUSH not offered");
	}

	/* --- out of range: at the capacity, and straddling the end */
	st = blk_req(VIRTIO_BLK_T_IN, capacity, 1, 512, NULL);
	int st2 = blk_req(VIRTIO_BLK_T_IN, capacity - 1, 1, 1024, NULL);
	if (st != VIRTIO_BLK_S_IOERR || st2 != VIRTIO_BLK_S_IOERR)
		t_fail("blk past capacity", "read at sector %llu: status %d, "
		       "2 sectors at %llu: status %d (want %d)",
		       (unsigned long long)capacity, st,
		       (unsigned long long)(capacity - 1), st2,
		       VIRTIO_BLK_S_IOERR);
	else
		t_pass("blk past capacity");

	/* --- an unknown request type */
	st = blk_req(0x7f, 0, 0, 0, NULL);
	if (st != VIRTIO_BLK_S_UNSUPP)
		t_fail("blk unsupported type", "status %d (want %d)", st,
		       VIRTIO_BLK_S_UNSUPP);
	else
		t_pass("blk unsupported type");

	/* --- interrupts and device status */
	unsigned nreqs = nreq - req0;
	uint32_t nirq = irq_count[qvec] - irq0;
	kprintf("virtio: blk %u requests, %u queue interrupts, %u config "
		"interrupts\n", nreqs, nirq, irq_count[VEC_BLK_CONFIG]);
	if (opt_poll)
		t_skip("blk msix", "poll");
	else if (d->msi_on)
		t_skip("blk msix", "plain MSI in use, not MSI-X");
	else if (d->use_irq)
		t_pass("blk msix");
	if (d->msi_on)
		blk_msi_check(d, nreqs, msi_irqs - mi0, msi_isr_q - mq0,
			      msi_isr_cfg - mc0, msi_isr_none - mn0);

	pci_cfg_window(d);

	uint8_t s = vdev_status(d);
	if (s != 0x0f)
		t_fail("blk status", "device status 0x%x, want 0x0f", s);
	else
		t_pass("blk status");
}

void blk_bench(struct vdev *d, uint32_t n)
{
	uint64_t blocks = capacity >> 3;
	uint32_t x = 12345, errors = 0, nblk;
	uint8_t qvec = blk_qvec(d);
	uint32_t irq0 = irq_count[qvec];

	if (blocks == 0 || n == 0) {
		t_fail("blk bench", "capacity %llu sectors, n %u",
		       (unsigned long long)capacity, n);
		return;
	}
	nblk = blocks > 0xffffffffu ? 0xffffffffu : (uint32_t)blocks;
	uint64_t t0 = rdtsc();
	for (uint32_t i = 0; i < n; i++) {
		x = x * 1103515245u + 12345u;
		uint32_t r = (x >> 16) | ((x * 1103515245u + 12345u) & 0xffff0000u);
		uint32_t blk = r % nblk;
		int st = blk_req(VIRTIO_BLK_T_IN, (uint64_t)blk * 8, 1, 4096, NULL);
		if (st != VIRTIO_BLK_S_OK) {
			if (!errors)
				kprintf("virtio: bench read %u of block %u: %s %d\n",
					i, blk, st < 0 ? "timeout" : "status", st);
			errors++;
			if (st < 0)
				break;
		}
	}
	uint64_t us = tsc_to_us(rdtsc() - t0);
	if (!us)
		us = 1;
	uint64_t per = udiv64(us, n);
	uint64_t iops = udiv64((uint64_t)n * 1000000u, (uint32_t)(us > 0xffffffffu ? 0xffffffffu : us));
	kprintf("BENCH reads=%u usec_per_req=%llu iops=%llu\n", n,
		(unsigned long long)per, (unsigned long long)iops);
	kprintf("virtio: bench %s, %llu us total, %u interrupts\n",
		!d->use_irq ? "poll" : d->msi_on ? "msi" : "msix",
		(unsigned long long)us, irq_count[qvec] - irq0);
	if (errors)
		t_fail("blk bench", "%u of %u reads failed", errors, n);
	else
		t_pass("blk bench");
}

/* ------------------------------------------------------------ test=bad */

/*
 * A misbehaving driver: writes to read-only PCI registers, the modern BAR
 * over the local APIC, a descriptor outside RAM, a descriptor that chains
 * to itself, an avail index far ahead of the used index, a queue size
 * that is not a power of 2 and an MSI-X vector beyond the table. The
 * device must survive each one (with NEEDS_RESET or an error status, as
 * the virtio spec allows) and work again after a reset; no wait is
 * unbounded.
 */

#define BAD_WAIT_US 2000000u
#define LAPIC_PHYS  0xfee00000u
/* Below every PCI hole and MMCONFIG window of the QEMU-like machines. */
#define OOB_LIMIT   0xb0000000u

/* What a bad request led to. */
struct bad_res {
	int used;        /* a used entry appeared */
	int needs_reset; /* device_status has DEVICE_NEEDS_RESET */
	uint32_t len;    /* the used entry's length */
	uint8_t dstatus; /* device_status */
	uint8_t status;  /* the request's status byte (0xff: not written) */
};

/* The device was started and has had no bad request since. */
static int bad_ready;

static void bad_restart_failed(struct vdev *d, const char *name)
{
	t_fail(name, "the device did not start again after a reset (device "
	       "status 0x%x)", vdev_status(d));
}

/* A started device for the next scenario: reset and restart unless ready. */
static int bad_begin(struct vdev *d, const char *name)
{
	if (bad_ready && vdev_status(d) == 0x0f)
		return 1;
	vdev_reset(d);
	if (!blk_start(d, NULL)) {
		bad_restart_failed(d, name);
		return 0;
	}
	bad_ready = 1;
	return 1;
}

/* Publish head on q0 (whatever its chain is) and notify. */
static void bad_publish(uint16_t head)
{
	uint16_t idx = q0.avail->idx;

	q0.avail->ring[idx & (q0.size - 1)] = head;
	barrier();
	q0.avail->idx = (uint16_t)(idx + 1);
	bad_ready = 0;
	vq_kick(&q0);
}

/*
 * Wait up to BAD_WAIT_US for a used entry on q0 or NEEDS_RESET (hlt with
 * the wake-up timer when interrupts are in use, else spin).
 */
static void bad_wait(struct vdev *d, struct bad_res *r)
{
	struct tmo t;

	memset(r, 0, sizeof(*r));
	tmo_start(&t, BAD_WAIT_US);
	for (;;) {
		cli();
		r->used = q0.used->idx != q0.last_used;
		r->dstatus = vdev_status(d);
		r->needs_reset = (r->dstatus & VIRTIO_STATUS_NEEDS_RESET) != 0;
		if (r->used || r->needs_reset || tmo_done(&t))
			break;
		if (d->use_irq && timer_ok)
			sti_hlt();
		else
			cpu_relax();
	}
	cli();
	barrier();
	if (r->used)
		r->len = q0.used->ring[q0.last_used & (q0.size - 1)].len;
	r->status = status;
}

/* "virtio: <name> -> <outcome>; device status 0x..". */
static void bad_report(const char *name, const struct bad_res *r,
		       int has_status)
{
	kprintf("virtio: %s ->", name);
	if (r->used) {
		if (has_status)
			kprintf(" status %u,", r->status);
		kprintf(" used len %u%s", r->len,
			r->needs_reset ? ", and NEEDS_RESET" : "");
	} else if (r->needs_reset) {
		kprintf(" NEEDS_RESET");
	} else {
		kprintf(" nothing within %u ms", BAD_WAIT_US / 1000);
	}
	kprintf("; device status 0x%x\n", r->dstatus);
}

static void bad_no_reaction(const char *name, const struct bad_res *r)
{
	t_fail(name, "neither a used entry nor NEEDS_RESET within %u ms "
	       "(device status 0x%x)", BAD_WAIT_US / 1000, r->dstatus);
}

/* Reset, start again and read sector 0. */
static void bad_recover(struct vdev *d, const char *name)
{
	uint32_t used = 0;
	int at;

	vdev_reset(d);
	if (!blk_start(d, NULL)) {
		bad_restart_failed(d, name);
		return;
	}
	bad_ready = 1;
	memset(buf, 0xee, 512);
	int st = blk_req(VIRTIO_BLK_T_IN, 0, 1, 512, &used);
	if (st != VIRTIO_BLK_S_OK)
		fail_status(name, st);
	else if ((at = sector0_diff()) >= 0)
		t_fail(name, "sector 0 byte %d is 0x%02x, expected 0x%02x", at,
		       buf[at], sector0_byte(at));
	else if (used != 513)
		t_fail(name, "used len %u, want 513", used);
	else
		t_pass(name);
}

/* 1. Writes to read-only configuration registers (PCI 3.0 6.2). */
static void bad_ro_config(struct vdev *d)
{
	static const uint8_t regs[3] = { 0x00, 0x08, 0x34 };
	const char *name = "bad ro config";
	struct pci_fn *p = d->pci;
	uint32_t before[3], after[3];
	int bad = -1;

	for (int i = 0; i < 3; i++) {
		before[i] = pci_r32(p, regs[i]);
		pci_w32(p, regs[i], 0xffffffffu);
		after[i] = pci_r32(p, regs[i]);
		if (after[i] != before[i] && bad < 0)
			bad = i;
	}
	uint16_t st0 = pci_r16(p, 0x06);
	pci_w16(p, 0x06, 0xffff);
	uint16_t st1 = pci_r16(p, 0x06);
	kprintf("virtio: %s -> after writing all-ones: id 0x%08x -> 0x%08x, "
		"class/rev 0x%08x -> 0x%08x, 0x34 0x%08x -> 0x%08x, status "
		"0x%04x -> 0x%04x\n", name, before[0], after[0], before[1],
		after[1], before[2], after[2], st0, st1);
	if (bad >= 0)
		t_fail(name, "config 0x%02x reads 0x%08x after writing "
		       "0xffffffff, was 0x%08x", regs[bad], after[bad],
		       before[bad]);
	else if (!(st1 & 0x10))
		t_fail(name, "status register reads 0x%04x after writing "
		       "0xffff (was 0x%04x): the capability list bit 4 went "
		       "away", st1, st0);
	else
		t_pass(name);
}

/* 2. The modern BAR moved over the local APIC, then back. */
static void bad_bar_overlap(struct vdev *d)
{
	const char *name = "bad bar overlap";
	struct pci_fn *p = d->pci;
	int bi = -1;

	for (int i = 0; i < 6 && bi < 0; i++)
		if (p->bar[i].mem && p->bar[i].size &&
		    d->common >= p->bar[i].addr &&
		    d->common - p->bar[i].addr < p->bar[i].size)
			bi = i;
	if (bi < 0) {
		t_fail(name, "no memory BAR holds the common config at 0x%x",
		       d->common);
		return;
	}
	if (!have_apic || lapic_base != LAPIC_PHYS) {
		t_skip(name, "no local APIC at 0x%x (base 0x%x)", LAPIC_PHYS,
		       lapic_base);
		return;
	}
	uint8_t off = (uint8_t)(0x10 + 4 * bi);
	int is64 = p->bar[bi].is64;
	uint16_t cmd = pci_r16(p, 0x04);
	uint8_t off_hi = (uint8_t)(off + 4);
	uint32_t lo = pci_r32(p, off), hi = is64 ? pci_r32(p, off_hi) : 0;
	uint16_t nq0 = mr16(d->common + CC_NUMQ);

	cli();
	uint32_t id0 = mr32(LAPIC_PHYS + LAPIC_ID);
	uint32_t ver0 = mr32(LAPIC_PHYS + LAPIC_VER);
	pci_w32(p, off, LAPIC_PHYS | (lo & 0xfu));
	if (is64)
		pci_w32(p, off_hi, 0);
	pci_w16(p, 0x04, (uint16_t)(cmd | 0x0002)); /* memory decode on */
	uint32_t moved = pci_r32(p, off);
	uint32_t id1 = mr32(LAPIC_PHYS + LAPIC_ID);
	uint32_t ver1 = mr32(LAPIC_PHYS + LAPIC_VER);
	pci_w32(p, off, lo);
	if (is64)
		pci_w32(p, off_hi, hi);
	pci_w16(p, 0x04, cmd);
	uint32_t back = pci_r32(p, off);
	uint16_t nq1 = mr16(d->common + CC_NUMQ);
	uint8_t ds = vdev_status(d);

	kprintf("virtio: %s -> BAR%d 0x%x moved to 0x%x: lapic id 0x%x ver "
		"0x%x (before 0x%x 0x%x); put back (reads 0x%x): num_queues %u "
		"(before %u), device status 0x%x\n", name, bi, lo & ~0xfu,
		moved & ~0xfu, id1, ver1, id0, ver0, back & ~0xfu, nq1, nq0,
		ds);
	if (id1 != id0 || ver1 != ver0)
		t_fail(name, "with BAR%d at 0x%x the local APIC id/version "
		       "read 0x%x/0x%x, not 0x%x/0x%x", bi, LAPIC_PHYS, id1,
		       ver1, id0, ver0);
	else if (back != lo)
		t_fail(name, "BAR%d reads 0x%x after writing back 0x%x", bi,
		       back, lo);
	else if (nq1 != nq0 || nq1 == 0 || nq1 == 0xffff)
		t_fail(name, "num_queues reads %u with the BAR back, was %u",
		       nq1, nq0);
	else
		t_pass(name);
}

/* 3. A device-writable data descriptor outside guest RAM. */
static void bad_desc_oob(struct vdev *d)
{
	const char *name = "bad desc oob";
	struct pci_fn *p = d->pci;
	struct bad_res r;

	/* RAM end, rounded up to 1 MiB, plus 256 MiB. */
	uint32_t addr = ((ram_end + 0xfffffu) & ~0xfffffu) + 0x10000000u;
	int in_bar = 0;
	for (int i = 0; i < 6; i++)
		if (p->bar[i].mem && p->bar[i].size &&
		    addr + 4096 > p->bar[i].addr &&
		    addr < p->bar[i].addr + p->bar[i].size)
			in_bar = 1;
	if (!ram_end || ram_end > OOB_LIMIT - 0x10100000u || in_bar) {
		t_skip(name, "no free address above RAM (RAM end 0x%x, "
		       "candidate 0x%x)", ram_end, addr);
		return;
	}
	if (!bad_begin(d, name))
		return;
	kprintf("virtio: %s: RAM ends at 0x%x; data descriptor 0x%x, 4096 "
		"bytes, device-writable\n", name, ram_end, addr);
	hdr.type = VIRTIO_BLK_T_IN;
	hdr.reserved = 0;
	hdr.sector = 0;
	status = 0xff;
	struct sg sg[3] = {
		{ (uint32_t)(uintptr_t)&hdr, sizeof(hdr) },
		{ addr, 4096 },
		{ (uint32_t)(uintptr_t)&status, 1 },
	};
	int head = vq_add(&q0, sg, 1, 2);
	if (head < 0) {
		t_fail(name, "no free descriptors");
		return;
	}
	bad_ready = 0;
	vq_kick(&q0);
	bad_wait(d, &r);
	bad_report(name, &r, 1);
	/*
	 * Neither virtio 1.2 nor PCI asks for an error here: to PCI the
	 * write is a master abort, which is dropped (QEMU completes it OK).
	 */
	if (r.used && r.status == VIRTIO_BLK_S_OK)
		t_skip(name, "completed with status OK, used len %u: the data "
		       "for 0x%x, outside RAM, was dropped; the spec requires "
		       "no error for that", r.len, addr);
	else if (!r.used && !r.needs_reset)
		bad_no_reaction(name, &r);
	else
		t_pass(name);
	bad_recover(d, "bad recover oob");
}

/* 4. A header descriptor whose next is itself (VIRTQ_DESC_F_NEXT set). */
static void bad_desc_loop(struct vdev *d)
{
	const char *name = "bad desc loop";
	struct bad_res r;

	if (!bad_begin(d, name))
		return;
	hdr.type = VIRTIO_BLK_T_IN;
	hdr.reserved = 0;
	hdr.sector = 0;
	status = 0xff;
	uint16_t h = q0.free_head;
	q0.desc[h].addr = (uint32_t)(uintptr_t)&hdr;
	q0.desc[h].len = sizeof(hdr);
	q0.desc[h].flags = VIRTQ_DESC_F_NEXT;
	q0.desc[h].next = h;
	kprintf("virtio: %s: descriptor %u chains to itself\n", name, h);
	bad_publish(h);
	bad_wait(d, &r);
	bad_report(name, &r, 0);
	/* The chain has no device-writable buffer: nothing can be written. */
	if (r.used && r.len)
		t_fail(name, "returned with used len %u, but the chain has no "
		       "device-writable buffer", r.len);
	else if (!r.used && !r.needs_reset)
		bad_no_reaction(name, &r);
	else
		t_pass(name);
	bad_recover(d, "bad recover loop");
}

/* 5. avail->idx moved more than the queue size ahead of the used index. */
static void bad_avail_idx(struct vdev *d)
{
	const char *name = "bad avail idx";
	struct bad_res r;

	if (!bad_begin(d, name))
		return;
	/* A valid read as head 0 (the zeroed ring slots all name head 0). */
	hdr.type = VIRTIO_BLK_T_IN;
	hdr.reserved = 0;
	hdr.sector = 0;
	status = 0xff;
	struct sg sg[3] = {
		{ (uint32_t)(uintptr_t)&hdr, sizeof(hdr) },
		{ (uint32_t)(uintptr_t)buf, 512 },
		{ (uint32_t)(uintptr_t)&status, 1 },
	};
	if (vq_add(&q0, sg, 1, 2) < 0) {
		t_fail(name, "no free descriptors");
		return;
	}
	uint16_t used_idx = q0.used->idx;
	uint16_t bogus = (uint16_t)(used_idx + 1000);
	barrier();
	q0.avail->idx = bogus;
	kprintf("virtio: %s: avail idx %u, used idx %u, queue size %u\n", name,
		bogus, used_idx, q0.size);
	bad_ready = 0;
	vq_kick(&q0);
	bad_wait(d, &r);
	bad_report(name, &r, 1);
	if (r.used && r.status == VIRTIO_BLK_S_OK)
		t_fail(name, "a request completed with status OK although "
		       "avail idx is %u ahead of the used idx (queue size %u)",
		       (uint16_t)(bogus - used_idx), q0.size);
	else
		t_pass(name);
	bad_recover(d, "bad recover idx");
}

/* 6. queue_size 3 and queue_msix_vector 0x7fff before the queue is enabled. */
static void bad_queue_cfg(struct vdev *d)
{
	const char *name = "bad queue size", *vname = "bad queue vector";

	vdev_reset(d);
	bad_ready = 0;
	if (!vdev_negotiate(d, (uint64_t)1 << VIRTIO_BLK_F_FLUSH)) {
		bad_restart_failed(d, name);
		return;
	}
	mw16(d->common + CC_Q_SELECT, 0);
	uint16_t max = mr16(d->common + CC_Q_SIZE);
	mw16(d->common + CC_Q_SIZE, 3);
	uint16_t qs = mr16(d->common + CC_Q_SIZE);
	kprintf("virtio: %s -> queue 0 size %u after writing 3 (maximum %u)\n",
		name, qs, max);
	/* virtio 1.2, common configuration structure layout, device
	 * requirements: without VIRTIO_F_RING_PACKED the device MUST present
	 * either 0 or a power of 2 in queue_size. */
	if (qs == 3)
		t_fail(name, "queue_size reads 3 after writing 3; without "
		       "VIRTIO_F_RING_PACKED the device must present a power "
		       "of 2");
	else if (!qs || (qs & (qs - 1)) || qs > max)
		t_fail(name, "queue_size reads %u after writing 3, not a power "
		       "of 2 up to the maximum %u", qs, max);
	else
		t_pass(name);

	if (!d->msix_cap) {
		t_skip(vname, "no MSI-X capability");
	} else {
		uint16_t mc = pci_r16(d->pci, (uint8_t)(d->msix_cap + 2));
		unsigned entries = (mc & 0x7ffu) + 1;
		mw16(d->common + CC_Q_MSIX, 0x7fff);
		uint16_t v = mr16(d->common + CC_Q_MSIX);
		kprintf("virtio: %s -> queue 0 msix_vector 0x%x after writing "
			"0x7fff (MSI-X table of %u entries)\n", vname, v,
			entries);
		/* A mapping the device cannot make MUST read back NO_VECTOR. */
		if (v != VIRTIO_NO_VECTOR)
			t_fail(vname, "queue_msix_vector reads 0x%x after "
			       "writing 0x7fff (table of %u entries), not "
			       "NO_VECTOR 0xffff", v, entries);
		else
			t_pass(vname);
	}
	vdev_reset(d);
}

void blk_bad_tests(struct vdev *d)
{
	kprintf("virtio: bad driver tests (each waits up to %u ms)\n",
		BAD_WAIT_US / 1000);
	bad_ready = 0;
	bad_ro_config(d);
	bad_bar_overlap(d);
	bad_desc_oob(d);
	bad_desc_loop(d);
	bad_avail_idx(d);
	bad_queue_cfg(d);
}
