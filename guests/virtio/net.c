/*
 * virtio guest: virtio-net driver and the loop-back test.
 *
 * Sends one broadcast frame, ethertype 0x88b5, payload
 * "PALACIOS-VIRTIO-NET xx:xx:xx:xx:xx:xx" (padded to 60 bytes), and waits
 * for a frame with that ethertype and payload to come back.
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC    5
#define VIRTIO_NET_F_STATUS 16

#define NET_HDR_LEN 12 /* virtio_net_hdr with num_buffers (VERSION_1) */
#define NRX 16
#define RX_BUF 2048
#define ETHERTYPE 0x88b5
#define ECHO_TIMEOUT_US 3000000u

static struct vq rxq, txq;
static uint8_t rxbuf[NRX][RX_BUF] __attribute__((aligned(4096)));
static uint8_t txhdr[NET_HDR_LEN] __attribute__((aligned(64)));
static uint8_t txframe[128] __attribute__((aligned(64)));
static int rx_head_buf[256];
static uint8_t mac[6];
static char payload[48];

static void post_rx(int i)
{
	struct sg sg = { (uint32_t)(uintptr_t)rxbuf[i], RX_BUF };
	int head = vq_add(&rxq, &sg, 0, 1);

	if (head >= 0)
		rx_head_buf[head] = i;
}

int net_init(struct vdev *d)
{
	static const uint8_t vecs[3] = { VEC_NET_CONFIG, VEC_NET_RX, VEC_NET_TX };

	if (!vdev_negotiate(d, (uint64_t)1 << VIRTIO_NET_F_MAC))
		return 0;
	d->use_irq = 0;
	if (!opt_poll && vdev_msix_setup(d, vecs, 3) && vdev_config_vector(d, 0))
		d->use_irq = 1;
	wake_timer(d->use_irq);
	if (!vq_setup(d, &rxq, 0, d->use_irq ? 1 : VIRTIO_NO_VECTOR, VEC_NET_RX) ||
	    !vq_setup(d, &txq, 1, d->use_irq ? 2 : VIRTIO_NO_VECTOR, VEC_NET_TX))
		return 0;
	/* Receive buffers go in before DRIVER_OK (spec 5.1.5). */
	for (int i = 0; i < NRX; i++)
		post_rx(i);
	vdev_driver_ok(d);
	vq_kick(&rxq);
	uint8_t st = vdev_status(d);
	if (st != 0x0f) {
		t_fail("net init", "status 0x%x after DRIVER_OK", st);
		return 0;
	}
	t_pass("net init");
	kprintf("virtio: net using %s\n",
		d->use_irq ? "MSI-X interrupts" : "polling");
	return 1;
}

static void hex2(char *p, uint8_t v)
{
	static const char hx[] = "0123456789abcdef";
	p[0] = hx[v >> 4];
	p[1] = hx[v & 15];
}

void net_test(struct vdev *d, int echo)
{
	uint32_t irq_rx0 = irq_count[VEC_NET_RX], irq_tx0 = irq_count[VEC_NET_TX];

	/* --- MAC */
	if (d->accepted & ((uint64_t)1 << VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			mac[i] = cfg_r8(d, (uint32_t)i);
		int zero = !(mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]);
		if (zero || (mac[0] & 1))
			t_fail("net mac", "%02x:%02x:%02x:%02x:%02x:%02x is not "
			       "a unicast address", mac[0], mac[1], mac[2],
			       mac[3], mac[4], mac[5]);
		else
			t_pass("net mac");
	} else {
		static const uint8_t dflt[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
		memcpy(mac, dflt, 6);
		t_skip("net mac", "VIRTIO_NET_F_MAC not offered; using "
		       "52:54:00:12:34:56");
	}
	memcpy(payload, "PALACIOS-VIRTIO-NET ", 20);
	for (int i = 0; i < 6; i++) {
		hex2(payload + 20 + 3 * i, mac[i]);
		payload[22 + 3 * i] = i < 5 ? ':' : 0;
	}
	kprintf("virtio: net mac %s", payload + 20);
	if (d->features & ((uint64_t)1 << VIRTIO_NET_F_STATUS))
		kprintf(", link status 0x%x", cfg_r16(d, 6));
	kprintf("\n");

	/* --- transmit */
	size_t plen = strlen(payload);
	memset(txhdr, 0, sizeof(txhdr));
	memset(txframe, 0, sizeof(txframe));
	memset(txframe, 0xff, 6);
	memcpy(txframe + 6, mac, 6);
	txframe[12] = ETHERTYPE >> 8;
	txframe[13] = ETHERTYPE & 0xff;
	memcpy(txframe + 14, payload, plen);
	uint32_t flen = 14 + (uint32_t)plen;
	if (flen < 60)
		flen = 60;
	struct sg sg[2] = {
		{ (uint32_t)(uintptr_t)txhdr, NET_HDR_LEN },
		{ (uint32_t)(uintptr_t)txframe, flen },
	};
	int len = vq_run(&txq, sg, 2, 0, 3000000);
	if (len < 0)
		t_fail("net tx", "no completion within 3 s");
	else
		t_pass("net tx");
	kprintf("virtio: net sent %u-byte frame '%s' (used len %d)\n", flen,
		payload, len);

	/* --- the echo */
	if (!echo) {
		t_skip("net echo", "echo=0");
	} else {
		struct tmo t;
		int got = 0, others = 0;
		tmo_start(&t, ECHO_TIMEOUT_US);
		while (!got && !tmo_done(&t)) {
			uint32_t rlen;
			if (!vq_wait(&rxq, ECHO_TIMEOUT_US / 10))
				continue;
			int head = vq_get_used(&rxq, &rlen);
			if (head < 0)
				continue;
			int b = rx_head_buf[head];
			const uint8_t *f = rxbuf[b] + NET_HDR_LEN;
			uint32_t fl = rlen > NET_HDR_LEN ? rlen - NET_HDR_LEN : 0;
			uint16_t nb = (uint16_t)(rxbuf[b][10] | rxbuf[b][11] << 8);
			if (fl >= 14 + plen && f[12] == (ETHERTYPE >> 8) &&
			    f[13] == (ETHERTYPE & 0xff) &&
			    !memcmp(f + 14, payload, plen)) {
				got = 1;
				kprintf("virtio: net received %u-byte frame from "
					"%02x:%02x:%02x:%02x:%02x:%02x to "
					"%02x:%02x:%02x:%02x:%02x:%02x "
					"(num_buffers %u)\n", fl, f[6], f[7],
					f[8], f[9], f[10], f[11], f[0], f[1],
					f[2], f[3], f[4], f[5], nb);
			} else {
				others++;
				kprintf("virtio: net ignoring a %u-byte frame, "
					"type 0x%02x%02x\n", fl,
					fl >= 14 ? f[12] : 0, fl >= 14 ? f[13] : 0);
			}
			post_rx(b);
			vq_kick(&rxq);
		}
		if (got)
			t_pass("net echo");
		else
			t_fail("net echo", "no frame with our payload within "
			       "%u ms (%d other frames)", ECHO_TIMEOUT_US / 1000,
			       others);
	}

	kprintf("virtio: net interrupts rx %u tx %u config %u\n",
		irq_count[VEC_NET_RX] - irq_rx0, irq_count[VEC_NET_TX] - irq_tx0,
		irq_count[VEC_NET_CONFIG]);
	if (opt_poll)
		t_skip("net msix", "poll");
	else if (d->use_irq)
		t_pass("net msix");
	uint8_t s = vdev_status(d);
	if (s != 0x0f)
		t_fail("net status", "device status 0x%x, want 0x0f", s);
	else
		t_pass("net status");
}
