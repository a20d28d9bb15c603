/*
 * concord.elf: a multiboot guest for memory-sharing (content-deduplication) tests. It
 * lays out a region of `mib=N` MiB (default 16) at 16 MiB as pages of known content:
 *
 *   pages [0, S)          "shared":  content from the page index only (the same in every
 *                         VM that has the same S), S = `shared=` (default 512)
 *   pages [S, S+P)        "private": content from the VM identity `id=K` (default 0) and
 *                         the page index (distinct across VMs and pages), P = `private=`
 *                         (default 256)
 *   pages [S+P, S+P+D)    "dups":    D copies of one page whose content depends on the id
 *                         (identical within a VM, different across VMs), D = `dups=`
 *                         (default 64)
 *   the rest              left alone (zero: the guest never writes it)
 *
 * Every written page holds its generation (0 at first) in word 0, the two halves of a
 * bijective 64-bit mix of (page key, generation) in words 1-2 (so two different
 * (key, generation) never give the same page), the constant "CONC" in word 3 (so no
 * written page is all zero), and mixed words in 4..1023. After filling it prints
 * "concord ready S P D".
 *
 * With `churn=C` (C <= P) it then rewrites the private pages [S, S+C) one after another
 * with generation + 1, prints "churn N" after each full pass, and every 16 passes checks
 * the whole region (kinds, generations, zero tail), printing "verify ok" or
 * "verify FAIL page X". With churn=0 (the default) it spins on PAUSE and never writes
 * memory again (so a content scanner settles), and never halts.
 *
 * `verify_only=1` skips the fill and checks the region as it finds it (private pages
 * may have any generation; the others must have generation 0), prints
 * "verify ok"/"verify FAIL page X", then behaves as with churn=0 (or churns).
 *
 * A layout larger than the region prints "concord FAIL layout" and halts.
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

#define REGION 0x1000000u
#define MAGIC 0x434f4e43u /* "CONC" */
#define ANY_GEN 0xffffffffu

#define KIND_SHARED 1ull
#define KIND_PRIVATE 2ull
#define KIND_DUP 3ull

/* Page keys: injective over (kind, id < 2^30, index < 2^32). */
static uint64_t key_shared(uint32_t page)
{
	return KIND_SHARED << 62 | page;
}

static uint64_t key_private(uint32_t id, uint32_t page)
{
	return KIND_PRIVATE << 62 | (uint64_t)(id & 0x3fffffffu) << 32 | page;
}

static uint64_t key_dup(uint32_t id)
{
	return KIND_DUP << 62 | (uint64_t)(id & 0x3fffffffu) << 32;
}

/* A bijection of 64-bit values (the splitmix64 finaliser). */
static uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

/* For a fixed generation, key -> seed is a bijection. */
static uint64_t seed(uint64_t key, uint32_t gen)
{
	return mix64(key ^ (uint64_t)gen * 0x9e3779b97f4a7c15ull);
}

static uint32_t word(uint64_t s, uint32_t i)
{
	uint32_t x = (uint32_t)s ^ (uint32_t)(s >> 32) * 40503u ^ i * 2246822519u;
	x ^= x >> 15;
	x *= 2654435761u;
	x ^= x >> 13;
	return x;
}

static void fill(volatile uint32_t *p, uint64_t key, uint32_t gen)
{
	uint64_t s = seed(key, gen);
	p[0] = gen;
	p[1] = (uint32_t)s;
	p[2] = (uint32_t)(s >> 32);
	p[3] = MAGIC;
	for (uint32_t i = 4; i < 1024; i++)
		p[i] = word(s, i);
}

/* The page matches key with generation gen (or any generation for ANY_GEN). */
static int check(volatile uint32_t *p, uint64_t key, uint32_t gen)
{
	uint32_t g = p[0];
	if (gen != ANY_GEN && g != gen)
		return 0;
	uint64_t s = seed(key, g);
	if (p[1] != (uint32_t)s || p[2] != (uint32_t)(s >> 32) || p[3] != MAGIC)
		return 0;
	for (uint32_t i = 4; i < 1024; i++)
		if (p[i] != word(s, i))
			return 0;
	return 1;
}

static int is_zero(volatile uint32_t *p)
{
	for (uint32_t i = 0; i < 1024; i++)
		if (p[i])
			return 0;
	return 1;
}

struct layout {
	uint32_t npages, id, shared, private, dups, churn;
};

/*
 * Check the whole region. Churned private pages [S, S+C) must have generation
 * churn_gen, the other private pages generation 0 (or any generation with
 * ANY_GEN, for all private pages). Returns the first bad page, or npages.
 */
static uint32_t verify(volatile uint32_t *region, const struct layout *l, uint32_t churn_gen)
{
	uint32_t s = l->shared, pe = s + l->private, de = pe + l->dups;
	for (uint32_t p = 0; p < l->npages; p++) {
		volatile uint32_t *pp = region + p * 1024;
		int ok;
		if (p < s)
			ok = check(pp, key_shared(p), 0);
		else if (p < pe) {
			uint32_t g = churn_gen == ANY_GEN ? ANY_GEN : p < s + l->churn ? churn_gen : 0;
			ok = check(pp, key_private(l->id, p), g);
		} else if (p < de)
			ok = check(pp, key_dup(l->id), 0);
		else
			ok = is_zero(pp);
		if (!ok)
			return p;
	}
	return l->npages;
}

static void report(uint32_t bad, uint32_t npages)
{
	if (bad == npages)
		kprintf("verify ok\n");
	else
		kprintf("verify FAIL page %u\n", bad);
}

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	const struct mb_info *mbi = mb_ptr(info);
	const char *cmdline = 0;

	(void)eflags;
	uart_init(COM1);
	if (magic == MB_BOOTLOADER_MAGIC && info && (mbi->flags & MB_INFO_CMDLINE))
		cmdline = mb_ptr(mbi->cmdline);
	struct layout l = {
		.npages = cmdline_u32(cmdline, "mib", 16) * 256,
		.id = cmdline_u32(cmdline, "id", 0),
		.shared = cmdline_u32(cmdline, "shared", 512),
		.private = cmdline_u32(cmdline, "private", 256),
		.dups = cmdline_u32(cmdline, "dups", 64),
		.churn = cmdline_u32(cmdline, "churn", 0),
	};
	uint32_t verify_only = cmdline_u32(cmdline, "verify_only", 0);
	volatile uint32_t *region = phys_ptr(REGION);

	uint64_t used = (uint64_t)l.shared + l.private + l.dups;
	if (used > l.npages || l.churn > l.private) {
		kprintf("concord FAIL layout\n");
		for (;;)
			__asm__ volatile("cli; hlt");
	}

	if (verify_only) {
		report(verify(region, &l, ANY_GEN), l.npages);
	} else {
		uint32_t s = l.shared, pe = s + l.private, de = pe + l.dups;
		for (uint32_t p = 0; p < s; p++)
			fill(region + p * 1024, key_shared(p), 0);
		for (uint32_t p = s; p < pe; p++)
			fill(region + p * 1024, key_private(l.id, p), 0);
		for (uint32_t p = pe; p < de; p++)
			fill(region + p * 1024, key_dup(l.id), 0);
		kprintf("concord ready %u %u %u\n", l.shared, l.private, l.dups);
	}

	if (!l.churn) {
		/*
		 * No memory writes from here on. Sleep with interrupts enabled: nothing in
		 * this guest programs a timer or a device interrupt, so the core idles (a
		 * HLT with interrupts disabled would end the VM). `spin=1` spins instead.
		 */
		if (cmdline_u32(cmdline, "spin", 0))
			for (;;)
				__asm__ volatile("pause");
		for (;;)
			__asm__ volatile("sti; hlt");
	}

	/*
	 * After verify_only the churned pages may hold any generation: continue from
	 * the one the first churned page has.
	 */
	uint32_t gen = region[l.shared * 1024];
	for (uint32_t pass = 1;; pass++) {
		gen++;
		for (uint32_t p = l.shared; p < l.shared + l.churn; p++)
			fill(region + p * 1024, key_private(l.id, p), gen);
		kprintf("churn %u\n", pass);
		if (pass % 16 == 0)
			report(verify(region, &l, verify_only ? ANY_GEN : gen), l.npages);
	}
}
