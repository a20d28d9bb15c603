/*
 * emubench: CPU benchmark kernel for the emulator backend (bench/emu.sh).
 * A multiboot kernel that enters long mode itself (entry.S), so v3 and
 * QEMU run the very same image. Command line:
 *
 *   bench=NAME n=N [size=S]
 *
 * It prints "emubench: start", runs N iterations of one workload, prints
 * "emubench: result 0x..." and leaves through the debug-exit port with 0
 * (VMM status 1). An unknown workload exits with 1 (status 3).
 *
 *   dec    dec/jnz loop, 2 instructions per iteration
 *   mem    loads/stores over a 256 KiB buffer, 8 per iteration
 *   call   call/ret, 4 per iteration
 *   alu    adc/sbb/shifts/setcc chain, 16 per iteration
 *   crc32  table-driven CRC-32 (C) over a 64 KiB buffer; N bytes
 *   sieve  sieve of Eratosthenes (C) over S bytes (at most and by default
 *          1 MiB); N passes
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

void bench_main(uint32_t magic, uint32_t info);

uint64_t loop_dec(uint64_t n, void *buf);
uint64_t loop_mem(uint64_t n, void *buf);
uint64_t loop_call(uint64_t n, void *buf);
uint64_t loop_alu(uint64_t n, void *buf);

#define MEM_BUF_SIZE   (256u * 1024)
#define CRC_BUF_SIZE   (64u * 1024)
#define SIEVE_MAX      (1u << 20)

static uint8_t mem_buf[MEM_BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t crc_buf[CRC_BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t sieve_buf[SIEVE_MAX] __attribute__((aligned(4096)));
static uint32_t crc_table[256];

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void fill(uint8_t *buf, uint32_t len, uint64_t seed)
{
	for (uint32_t i = 0; i < len; i += 8) {
		uint64_t v = xorshift(&seed);
		memcpy(buf + i, &v, 8);
	}
}

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xedb88320u & -(c & 1));
		crc_table[i] = c;
	}
}

/* The buffer repeats every 64 KiB; n is the number of bytes. */
static uint64_t __attribute__((noinline)) crc32_run(uint64_t n)
{
	uint32_t crc = ~0u;

	for (uint64_t i = 0; i < n; i++)
		crc = crc_table[(crc ^ crc_buf[i & (CRC_BUF_SIZE - 1)]) & 0xff] ^
		      (crc >> 8);
	return ~crc;
}

/* n passes of a byte sieve over [0, size); returns the primes found. */
static uint64_t __attribute__((noinline)) sieve_run(uint64_t n, uint32_t size)
{
	volatile uint8_t *flags = sieve_buf; /* keep every pass */
	uint64_t total = 0;

	for (uint64_t pass = 0; pass < n; pass++) {
		uint32_t count = 0;

		for (uint32_t i = 0; i < size; i++)
			flags[i] = 1;
		for (uint32_t i = 2; (uint64_t)i * i < size; i++) {
			if (!flags[i])
				continue;
			for (uint32_t j = i * i; j < size; j += i)
				flags[j] = 0;
		}
		for (uint32_t i = 2; i < size; i++)
			count += flags[i];
		total += count;
	}
	return total;
}

static uint32_t number_word(const char *cmdline, const char *key, uint32_t dflt)
{
	char buf[16];
	uint32_t v;

	if (!cmdline_get(cmdline, key, buf, sizeof(buf)) ||
	    !parse_u32(buf, strlen(buf), &v))
		return dflt;
	return v;
}

void bench_main(uint32_t magic, uint32_t info)
{
	const struct mb_info *mbi = NULL;
	const char *cmdline = "";
	char name[16] = "dec";
	uint64_t result;

	uart_init(COM1);
	if (magic == MB_BOOTLOADER_MAGIC && info)
		mbi = mb_ptr(info);
	if (mbi && (mbi->flags & MB_INFO_CMDLINE))
		cmdline = mb_cmdline(mbi);
	cmdline_get(cmdline, "bench", name, sizeof(name));
	uint32_t n = number_word(cmdline, "n", 1000000);
	uint32_t size = number_word(cmdline, "size", 1u << 20);
	if (size < 16 || size > SIEVE_MAX)
		size = 1u << 20;

	kprintf("emubench: bench=%s n=%u\n", name, n);
	fill(mem_buf, MEM_BUF_SIZE, 0x9e3779b97f4a7c15ull);
	fill(crc_buf, CRC_BUF_SIZE, 0x2545f4914f6cdd1dull);
	crc_init();

	kprintf("emubench: start\n");
	if (!strcmp(name, "dec"))
		result = loop_dec(n, mem_buf);
	else if (!strcmp(name, "mem"))
		result = loop_mem(n, mem_buf);
	else if (!strcmp(name, "call"))
		result = loop_call(n, mem_buf);
	else if (!strcmp(name, "alu"))
		result = loop_alu(n, mem_buf);
	else if (!strcmp(name, "crc32"))
		result = crc32_run(n);
	else if (!strcmp(name, "sieve"))
		result = sieve_run(n, size);
	else {
		kprintf("emubench: unknown bench '%s'\n", name);
		debug_exit(1);
	}
	kprintf("emubench: result 0x%llx\n", (unsigned long long)result);
	debug_exit(0);
}
