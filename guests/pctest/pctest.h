/* pctest: shared declarations (see main.c for the overview). */
#ifndef PCTEST_H
#define PCTEST_H

#include <stdint.h>

#include "io.h"
#include "kstd.h"
#include "tsc.h"

/* Must match cpu.S. */
#define PCT_MAX_CPUS    64
#define PCT_SEL_CODE    0x08
#define PCT_SEL_DATA    0x10

/* The AP start-up page (SIPI vector = page number). */
#define TRAMP_ADDR      0x7000

/* --- interrupt vectors ------------------------------------------------- */
#define VEC_PIC_MASTER  0x20 /* IRQ0-7  */
#define VEC_PIC_SLAVE   0x28 /* IRQ8-15 */
#define VEC_PIT_IOAPIC  0x40
#define VEC_LAPIC_ONE   0x41
#define VEC_LAPIC_PER   0x42
#define VEC_TSC_DL      0x43
#define VEC_SELF_IPI    0x50
#define VEC_PING        0x51 /* BSP -> AP */
#define VEC_SPIN        0x52 /* BSP -> AP: start spinning (spin=) */
#define VEC_PONG_BASE   0x80 /* AP n -> BSP on 0x80 + n (own vector: no
				      coalescing in the BSP's IRR) */
#define VEC_LEVEL       0x60
#define VEC_EDGE        0x61
#define VEC_APIC_ERROR  0xfe
#define VEC_SPURIOUS    0xff

/* --- local APIC registers ------------------------------------------------ */
#define LAPIC_ID        0x020
#define LAPIC_VER       0x030
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ISR       0x100
#define LAPIC_TMR       0x180
#define LAPIC_IRR       0x200
#define LAPIC_ESR       0x280
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_PERF  0x340
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TMR_INIT  0x380
#define LAPIC_TMR_CUR   0x390
#define LAPIC_TMR_DIV   0x3e0

#define LVT_MASKED      (1u << 16)
#define ICR_BUSY        (1u << 12)
#define ICR_ASSERT      (1u << 14)
#define ICR_LEVEL       (1u << 15)
#define ICR_SELF        (1u << 18)
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_FIXED       (0u << 8)
#define ICR_INIT        (5u << 8)
#define ICR_STARTUP     (6u << 8)

#define IOAPIC_BASE     0xfec00000u
#define RED_MASKED      (1u << 16)
#define RED_LEVEL       (1u << 15)
#define RED_REMOTE_IRR  (1u << 14)
#define RED_PENDING     (1u << 12)

#define PIT_HZ          1193182u

/* --- cpu.S ---------------------------------------------------------------- */
struct frame {
	uint32_t edi, esi, ebp, esp0, ebx, edx, ecx, eax;
	uint32_t vector, err;
	uint32_t eip, cs, eflags;
};

extern const char isr_stubs[], isr_stubs_end[];
extern const char tramp_start[], tramp_end[];
void load_gdt(void);
extern uint8_t use_iret; /* 1: return from interrupts with IRET */

/* --- hw.c ------------------------------------------------------------------ */
/* A handler returns 1 when it has sent the EOI itself. */
typedef int (*irq_handler_t)(unsigned vec, struct frame *f);

extern irq_handler_t irq_handlers[256];
extern volatile uint32_t irq_count[256];
extern volatile uint32_t pic_spurious;
/* Per vector: deliveries whose LAPIC ISR bit was clear in the handler. */
extern volatile uint32_t isr_unset[256];
extern uint32_t lapic_base;
extern int have_apic;
extern uint32_t bsp_apic_id;

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr"
			 : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
}

static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }
static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }

static inline uint32_t irq_save(void)
{
	uint32_t f;
	__asm__ volatile("pushfl; popl %0; cli" : "=r"(f) : : "memory");
	return f;
}

static inline void irq_restore(uint32_t f)
{
	__asm__ volatile("pushl %0; popfl" : : "r"(f) : "memory", "cc");
}

/* lock-prefixed: the APs share these counters. */
static inline void atomic_inc(volatile uint32_t *p)
{
	__asm__ volatile("lock incl %0" : "+m"(*p) : : "memory");
}


/* Microseconds since a rdtsc() value (saturates at ~71 minutes). */
uint32_t us_since(uint64_t t0);
/* Wait until *p >= v or the timeout; returns 1 when it got there. */
int wait_count(volatile uint32_t *p, uint32_t v, uint32_t us);

void time_init(void);
void idt_init(void);
void load_idt(void);

void pic_init(uint8_t master_mask, uint8_t slave_mask);
void pic_set_mask(uint8_t master_mask, uint8_t slave_mask);
uint8_t pic_read_irr(uint16_t cmd_port);
uint8_t pic_read_isr(uint16_t cmd_port);

void pit_periodic(uint32_t hz);
void pit_stop(void);
uint16_t pit_read_count(void);

uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
void lapic_eoi(void);
uint32_t lapic_id(void);
void lapic_setup(void);
int lapic_icr_wait(uint32_t us);
/* Send an IPI; returns 0 if the ICR stayed busy. */
int lapic_ipi(uint32_t dest, uint32_t icr_lo);
int lapic_irr_bit(unsigned vec);

uint32_t ioapic_read(uint32_t reg);
void ioapic_write(uint32_t reg, uint32_t v);
uint32_t ioapic_redir_lo(unsigned pin);
void ioapic_route(unsigned pin, uint32_t lo, uint32_t dest_apic);
void ioapic_mask(unsigned pin);
unsigned ioapic_pins(void);

uint8_t cmos_read(uint8_t reg);
void cmos_write(uint8_t reg, uint8_t v);

/* Everything quiet: IF=0, PIC masked, LAPIC timer stopped. */
void quiesce(void);

void isr_dispatch(struct frame *f);
/* t_fail if isr_unset[vec] moved past before. */
void isr_check(unsigned vec, uint32_t before);

/* --- main.c ---------------------------------------------------------------- */
extern uint32_t opt_cpus, opt_ram_mib;
extern int opt_ram_given, opt_isr_check;
extern char opt_sipi[16];

void t_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void t_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int t_failed(void);
void __attribute__((noreturn)) finish(void);
void __attribute__((noreturn)) fatal(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));

/* --- mp.c ------------------------------------------------------------------ */
#define MP_MAX_CPUS 256
struct mp_info {
	int parsed, found;
	uint32_t fp_addr, table_addr;
	char problem[96]; /* first structural problem, "" if none */
	uint32_t lapic_addr;
	unsigned entries;
	unsigned ncpus;          /* enabled processor entries */
	uint8_t cpu_id[MP_MAX_CPUS];
	int bp_id;               /* -1 if no BP flag */
	unsigned nbp;
	unsigned nioapic;
	uint32_t ioapic_addr[8];
	uint8_t ioapic_flags[8];
	int isa_bus;             /* bus id, -1 if none */
	int irq0_pin;            /* INTIN for ISA IRQ0, -1 if no entry */
};
const struct mp_info *mp_get(void);

/* --- tests ------------------------------------------------------------------ */
void __attribute__((noreturn)) run_bench(const char *mode, uint32_t n, uint32_t hz, uint32_t ms);
void t_mptable(void);
void t_smp(void);
void t_ipi(void);
void t_self_ipi(void);
/* spin=SECONDS: busy every core (starting the APs if needed); smp.c. */
void run_spin(uint32_t secs);

void t_pit_pic(void);
void t_pit_ioapic(void);
void t_lapic_oneshot(void);
void t_lapic_periodic(void);
void t_tsc_deadline(void);
void t_rtc(void);
void t_rtc_periodic(void);

void t_cmos_mem(void);
void t_fw_cfg(void);
void t_testdev(void);
void t_level_irr(void);
void t_spurious(void);
void t_i8042_reset(void);

/* smp.c: entered by each AP from cpu.S. */
void ap_main(uint32_t idx);

#endif
