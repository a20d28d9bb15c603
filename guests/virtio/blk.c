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

int blk_init(struct vdev *d)
{
	static const uint8_t vecs[2] = { VEC_BLK_CONFIG, VEC_BLK_Q0 };

	if (!vdev_negotiate(d, (uint64_t)1 << VIRTIO_BLK_F_FLUSH))
		return 0;
	d->use_irq = 0;
	if (!opt_poll && vdev_msix_setup(d, vecs, 2) &&
	    vdev_config_vector(d, 0))
		d->use_irq = 1;
	wake_timer(d->use_irq);
	d->vqs = &q0;
	d->nvqs = 1;
	if (!vq_setup(d, &q0, 0, d->use_irq ? 1 : VIRTIO_NO_VECTOR,
		      VEC_BLK_Q0))
		return 0;
	vdev_driver_ok(d);
	uint8_t st = vdev_status(d);
	if (st != 0x0f) {
		t_fail("blk init", "status 0x%x after DRIVER_OK", st);
		return 0;
	}
	capacity = cfg_r64(d, 0);
	t_pass("blk init");
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

void blk_tests(struct vdev *d)
{
	uint32_t used = 0;
	int st;
	unsigned at;
	uint32_t irq0 = irq_count[VEC_BLK_Q0];
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
		int bad = -1;
		for (unsigned i = 0; i < 512 && bad < 0; i++) {
			uint8_t want = i < 20 ? (uint8_t)magic[i] : (uint8_t)i;
			if (buf[i] != want)
				bad = (int)i;
		}
		if (bad >= 0)
			t_fail("blk read sector 0", "byte %d is 0x%02x, expected "
			       "0x%02x (disk not in the test layout?)", bad,
			       buf[bad], bad < 20 ? (uint8_t)magic[bad] :
			       (uint8_t)bad);
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
	uint32_t nirq = irq_count[VEC_BLK_Q0] - irq0;
	kprintf("virtio: blk %u requests, %u queue interrupts, %u config "
		"interrupts\n", nreq - req0, nirq, irq_count[VEC_BLK_CONFIG]);
	if (opt_poll)
		t_skip("blk msix", "poll");
	else if (d->use_irq)
		t_pass("blk msix");
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
	uint32_t irq0 = irq_count[VEC_BLK_Q0];

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
		d->use_irq ? "msix" : "poll", (unsigned long long)us,
		irq_count[VEC_BLK_Q0] - irq0);
	if (errors)
		t_fail("blk bench", "%u of %u reads failed", errors, n);
	else
		t_pass("blk bench");
}
