/* TSC-based time for the test guests: the calibration result (set by each guest's own
 * calibration), 64-bit division without libgcc, and timeouts that cannot hang on a stuck TSC. */
#ifndef LIB_TSC_H
#define LIB_TSC_H

#include "kstd.h"

/* TSC ticks per millisecond and per microsecond (defaults until calibrated). */
extern uint32_t tsc_per_ms, tsc_per_us;

static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

uint64_t udiv64(uint64_t n, uint32_t d);

/*
 * Timeouts: a TSC deadline plus a spin budget, so that even a TSC that
 * does not move cannot hang the guest.
 */
struct tmo {
	uint64_t end;
	uint64_t spins, max_spins;
};
void tmo_start(struct tmo *t, uint32_t us);
int tmo_done(struct tmo *t);
void delay_us(uint32_t us);
static inline void delay_ms(uint32_t ms) { delay_us(ms * 1000); }

#endif
