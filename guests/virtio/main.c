/*
 * virtio: a multiboot test kernel with minimal drivers for virtio 1.x
 * ("modern") PCI block and network devices, using MSI-X interrupts.
 *
 * Command line (space-separated words; see guests/README.md):
 *   test=LIST   comma-separated: blk, net, all (blk and net), bad (a
 *               misbehaving driver against the block device), none.
 *               Default: every kind of device found, or none with bench=.
 *               The bare words blk and net also select those tests.
 *   bench=N     N random 4 KiB reads from the block device (one in flight)
 *   poll        no interrupts: poll the used rings (MSI-X left disabled)
 *   msi         blk: plain MSI (capability 0x05) instead of MSI-X, the ISR
 *               read in the handler (MSI-X if there is no MSI capability)
 *   reassign    give every memory BAR of the devices used a new address
 *               (from 0xe0000000) before using it
 *   qsize=N     largest queue size to use (power of two, default 64)
 *   echo=0      net: only send, do not wait for the frame to come back
 *
 * Output on COM1: "PASS name", "FAIL name (detail)", "SKIP name (why)",
 * "BENCH reads=N usec_per_req=X iops=Y", then "virtio: N passed, M failed"
 * and outl(M ? 1 : 0, 0xf4).
 */
#include "multiboot.h"
#include "virtio.h"

int opt_poll, opt_reassign, opt_msi;
uint32_t opt_qsize = 64;
uint32_t ram_end;

static char cmdline[1024];
static unsigned n_passed, n_failed, n_skipped;

static struct pci_fn fns[16];
static struct vdev blkdev, netdev;

/* ------------------------------------------------------------ results */

void t_pass(const char *name)
{
	n_passed++;
	kprintf("PASS %s\n", name);
}

void t_fail(const char *name, const char *fmt, ...)
{
	va_list ap;

	n_failed++;
	kprintf("FAIL %s (", name);
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	kprintf(")\n");
}

void t_skip(const char *name, const char *fmt, ...)
{
	va_list ap;

	n_skipped++;
	kprintf("SKIP %s (", name);
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	kprintf(")\n");
}

void finish(void)
{
	cli();
	wake_timer(0);
	/* Stop the devices (no more DMA into our memory). */
	vdev_reset(&blkdev);
	vdev_reset(&netdev);
	if (n_skipped)
		kprintf("virtio: %u skipped\n", n_skipped);
	kprintf("virtio: %u passed, %u failed\n", n_passed, n_failed);
	debug_exit(n_failed ? 1 : 0);
}

void fatal(const char *fmt, ...)
{
	va_list ap;

	cli();
	kprintf("FAIL virtio (");
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	kprintf(")\n");
	n_failed++;
	kprintf("virtio: %u passed, %u failed\n", n_passed, n_failed);
	debug_exit(1);
}

/* ------------------------------------------------------------ cmdline */

int word_present(const char *word)
{
	size_t wl = strlen(word);
	const char *p = cmdline;

	while (*p) {
		while (*p == ' ')
			p++;
		const char *w = p;
		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - w) == wl && !strncmp(w, word, wl))
			return 1;
	}
	return 0;
}

static int get_u32(const char *key, uint32_t *out)
{
	char buf[24];
	uint32_t v;

	if (!cmdline_get(cmdline, key, buf, sizeof(buf)))
		return 0;
	if (!parse_u32(buf, strlen(buf), &v)) {
		kprintf("virtio: ignoring %s=%s (not a decimal number)\n", key,
			buf);
		return 0;
	}
	*out = v;
	return 1;
}

/* Sets *blk / *net / *bad from test=LIST; unknown names are failures. */
static void parse_tests(const char *list, int *blk, int *net, int *bad)
{
	const char *p = list;

	while (*p) {
		const char *w = p;
		while (*p && *p != ',')
			p++;
		size_t len = (size_t)(p - w);
		if (*p == ',')
			p++;
		if (!len)
			continue;
		if (len == 3 && !strncmp(w, "all", 3)) {
			*blk = *net = 1;
		} else if (len == 3 && !strncmp(w, "blk", 3)) {
			*blk = 1;
		} else if (len == 3 && !strncmp(w, "net", 3)) {
			*net = 1;
		} else if (len == 3 && !strncmp(w, "bad", 3)) {
			*bad = 1;
		} else if (len == 4 && !strncmp(w, "none", 4)) {
			/* device set-up (and bench=) only */
		} else {
			char name[32];
			if (len > sizeof(name) - 1)
				len = sizeof(name) - 1;
			memcpy(name, w, len);
			name[len] = 0;
			t_fail("test", "unknown test '%s'", name);
		}
	}
}

/* ------------------------------------------------------------ memory */

/*
 * The end of RAM below 4 GiB: the highest type-1 memory-map entry, or
 * 1 MiB + mem_upper when there is no map.
 */
static uint32_t find_ram_end(const struct mb_info *mbi)
{
	uint64_t end = 0;

	if (mbi->flags & MB_INFO_MEM)
		end = 0x100000u + (uint64_t)mbi->mem_upper * 1024;
	if ((mbi->flags & MB_INFO_MMAP) && mbi->mmap_addr) {
		mb_mmap_foreach(mbi, e) {
			if (e->type != MB_MMAP_RAM || e->addr >= 0x100000000ull)
				continue;
			uint64_t top = e->addr + e->len;
			if (top > 0x100000000ull)
				top = 0x100000000ull;
			if (top > end)
				end = top;
		}
	}
	return end >= 0x100000000ull ? 0xfffff000u : (uint32_t)end;
}

/* ------------------------------------------------------------ main */

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	(void)eflags;

	if (magic == MB_BOOTLOADER_MAGIC && info) {
		const char *cl = mb_cmdline(mb_ptr(info));
		size_t i;
		for (i = 0; i < sizeof(cmdline) - 1 && cl[i]; i++)
			cmdline[i] = cl[i];
		cmdline[i] = 0;
		ram_end = find_ram_end(mb_ptr(info));
	}

	uart_init(COM1);
	kprintf("virtio: start, cmdline '%s'\n", cmdline);
	if (magic != MB_BOOTLOADER_MAGIC)
		kprintf("virtio: bad multiboot magic 0x%x\n", magic);

	load_gdt();
	idt_init();
	time_init();
	platform_init();

	/* BARs and rings are used by physical address: paging must be off. */
	unsigned long cr0 = read_cr0();
	if (cr0 & 0x80000000ul)
		fatal("paging is on (cr0 0x%lx); this guest needs it off", cr0);

	opt_poll = word_present("poll");
	opt_reassign = word_present("reassign");
	opt_msi = word_present("msi");
	get_u32("qsize", &opt_qsize);
	if (opt_qsize < 2 || opt_qsize > VQ_MAX) {
		kprintf("virtio: qsize=%u out of range 2..%u, using 64\n",
			opt_qsize, VQ_MAX);
		opt_qsize = 64;
	}
	uint32_t echo = 1, bench = 0;
	get_u32("echo", &echo);
	int do_bench = get_u32("bench", &bench);

	int want_blk = 0, want_net = 0, want_bad = 0, explicit = 0;
	char tests[128];
	if (cmdline_get(cmdline, "test", tests, sizeof(tests))) {
		parse_tests(tests, &want_blk, &want_net, &want_bad);
		explicit = 1;
	}
	if (word_present("blk")) {
		want_blk = 1;
		explicit = 1;
	}
	if (word_present("net")) {
		want_net = 1;
		explicit = 1;
	}

	unsigned n = pci_scan_virtio(fns, sizeof(fns) / sizeof(fns[0]));
	struct pci_fn *blk = NULL, *net = NULL;
	for (unsigned i = 0; i < n; i++) {
		if (fns[i].type == 2 && !blk)
			blk = &fns[i];
		if (fns[i].type == 1 && !net)
			net = &fns[i];
	}
	if (!explicit && !do_bench) {
		want_blk = blk != NULL;
		want_net = net != NULL;
	}
	kprintf("virtio: %u virtio functions; tests:%s%s%s%s; %s%s\n", n,
		want_blk ? " blk" : "", want_net ? " net" : "",
		do_bench ? " bench" : "", want_bad ? " bad" : "",
		opt_poll ? "poll" : opt_msi ? "msi (blk)" : "msi-x",
		opt_reassign ? ", reassign BARs" : "");

	if ((want_blk || want_bad || do_bench) && !blk)
		t_fail("pci scan", "no virtio block device on bus 0");
	else if (want_net && !net)
		t_fail("pci scan", "no virtio network device on bus 0");
	else if (!blk && !net)
		t_fail("pci scan", "no virtio block or network device on bus 0");
	else
		t_pass("pci scan");

	if (blk && (want_blk || want_bad || do_bench)) {
		if (vdev_probe(&blkdev, blk, "blk") && blk_init(&blkdev)) {
			if (want_blk)
				blk_tests(&blkdev);
			if (do_bench)
				blk_bench(&blkdev, bench);
			if (want_bad)
				blk_bad_tests(&blkdev);
		}
	}
	if (net && want_net) {
		if (vdev_probe(&netdev, net, "net") && net_init(&netdev))
			net_test(&netdev, echo != 0);
	}
	finish();
}
