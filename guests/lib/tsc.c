/* TSC timeouts shared by the test guests (see tsc.h). */
#include "io.h"
#include "tsc.h"

uint32_t tsc_per_ms = 1000000, tsc_per_us = 1000;

uint64_t udiv64(uint64_t n, uint32_t d)
{
	uint64_t q = 0, r = 0;

	if (!d)
		return 0;
	for (int bit = 63; bit >= 0; bit--) {
		r = (r << 1) | ((n >> bit) & 1);
		if (r >= d) {
			r -= d;
			q |= (uint64_t)1 << bit;
		}
	}
	return q;
}

void tmo_start(struct tmo *t, uint32_t us)
{
	t->end = rdtsc() + (uint64_t)us * tsc_per_us;
	t->spins = 0;
	/* Backstop if the TSC is stuck: no loop iteration is under ~5 ns. */
	t->max_spins = (uint64_t)us * 200 + 1000;
}

int tmo_done(struct tmo *t)
{
	if (++t->spins > t->max_spins)
		return 1;
	return rdtsc() >= t->end;
}

void delay_us(uint32_t us)
{
	struct tmo t;

	tmo_start(&t, us);
	while (!tmo_done(&t))
		cpu_relax();
}
