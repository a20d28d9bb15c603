/* symtest: shared declarations (see main.c for the overview). */
#ifndef SYMTEST_H
#define SYMTEST_H

#include <stdint.h>

#include "io.h"
#include "kstd.h"
#include "tsc.h"

/* Must match cpu.S. */
#define SEL_CODE 0x08
#define SEL_DATA 0x10

/* --- the Palacios-rs interface (docs/hypercalls.md) ----------------------- */
#define PRS_CPUID_BASE  0x40000100u
#define PRS_DOORBELL    0xec /* hard-coded in the doorbell instruction below */

#define HC_TEST         0x0001u
#define HC_SYMCALL_RET  0x0535u
#define HC_SYMCALL_ERR  0x0536u
#define HC_SYMMOD_QUERY 0x0600u
#define HC_GUEST_INFO   0x3000u
#define HC_OS_DEBUG     0xc0c0u
#define HC_TIME_CPUFREQ 0xd000u
#define HC_TIME_RDHTSC  0xd001u

#define HC_EUNKNOWN 0xffffffffu        /* -1 */
#define HC_EFAULT   ((uint32_t)-14)
#define HC_EBUSY    ((uint32_t)-16)
#define HC_EINVAL   ((uint32_t)-22)

#define MSR_SYMCALL_RIP 0x536
#define MSR_SYMCALL_RSP 0x537
#define MSR_SYMCALL_CS  0x538
#define MSR_SYMCALL_GS  0x539
#define MSR_SYMCALL_FS  0x540

/* EAX = id (in) / result (out); EBX, ECX, EDX, ESI, EDI = arguments / results. */
struct hregs {
	uint32_t eax, ebx, ecx, edx, esi, edi;
};

/* VIA_PORT: the same register traffic to an unclaimed port (a benchmark floor). */
enum hc_via { VIA_DOORBELL, VIA_VMCALL, VIA_VMMCALL, VIA_PORT };

/*
 * The VMM may rewrite any of EAX..EDI (results) and guest memory (buffers
 * passed by address), so all six registers are in/out operands and memory
 * is clobbered; flags are clobbered too. EBP and ESP are not touched.
 */
#define HC_ASM(insn, r)                                                      \
	__asm__ volatile(insn                                                \
			 : "+a"((r)->eax), "+b"((r)->ebx), "+c"((r)->ecx),   \
			   "+d"((r)->edx), "+S"((r)->esi), "+D"((r)->edi)    \
			 :                                                   \
			 : "memory", "cc")

/* One hypercall with all six registers in and out of *r. */
static inline void hcall_full(enum hc_via via, struct hregs *r)
{
	switch (via) {
	case VIA_DOORBELL:
		HC_ASM("outb %%al, $0xec", r); /* e6 ec: one port exit */
		break;
	case VIA_VMCALL:
		HC_ASM(".byte 0x0f, 0x01, 0xc1", r);
		break;
	case VIA_VMMCALL:
		HC_ASM(".byte 0x0f, 0x01, 0xd9", r);
		break;
	case VIA_PORT:
		HC_ASM("outb %%al, $0xed", r); /* unclaimed */
		break;
	}
}

static inline uint32_t hcall_via(enum hc_via via, uint32_t id, uint32_t b,
				 uint32_t c, uint32_t d, uint32_t s, uint32_t di)
{
	struct hregs r = { id, b, c, d, s, di };

	hcall_full(via, &r);
	return r.eax;
}

/* The doorbell (works on every backend): returns EAX. */
static inline uint32_t hcall(uint32_t id, uint32_t b, uint32_t c, uint32_t d,
			     uint32_t s, uint32_t di)
{
	return hcall_via(VIA_DOORBELL, id, b, c, d, s, di);
}

/* VMCALL (only where CPUID 0x40000101 ECX bit 0 says it reaches the VMM). */
static inline uint32_t hcall_vmcall(uint32_t id, uint32_t b, uint32_t c,
				    uint32_t d, uint32_t s, uint32_t di)
{
	return hcall_via(VIA_VMCALL, id, b, c, d, s, di);
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr"
			 : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
}

/* --- main.c ----------------------------------------------------------------- */
extern char cmdline[1024];
extern uint32_t tsc_khz;     /* CPUID 0x40000101 EDX */
extern int have_vmcall;      /* CPUID 0x40000101 ECX bit 0 */

/* --- hcall.c / bench.c ------------------------------------------------------ */
void __attribute__((noreturn)) run_hcall_tests(void);
void __attribute__((noreturn)) run_bench(uint32_t n);
void __attribute__((noreturn)) run_time(uint16_t pmtmr);
/* TSC ticks to nanoseconds / microseconds with tsc_khz (0 if unknown). */
uint64_t tsc_to_ns(uint64_t ticks);
uint64_t tsc_to_us(uint64_t ticks);

/* --- sym.c ------------------------------------------------------------------ */
struct frame {
	uint32_t edi, esi, ebp, esp0, ebx, edx, ecx, eax;
	uint32_t vector, err;
	uint32_t eip, cs, eflags;
};

void idt_init(void);
void __attribute__((noreturn)) isr_dispatch(struct frame *f);
void __attribute__((noreturn)) run_symcall(void);
uint32_t symcall_dispatch(uint32_t nr, uint32_t a0, uint32_t a1, uint32_t a2,
			  uint32_t a3, uint32_t a4, uint32_t *out);
void __attribute__((noreturn)) symcall_returned(uint32_t eax);

/* --- cpu.S ------------------------------------------------------------------ */
extern const char isr_stubs[], isr_stubs_end[];
extern volatile uint32_t in_symcall;
void load_gdt(void);
void symcall_entry(void);

/* Filled by idle_loop() with the registers it kept while waiting for 'q'. */
struct idle_regs {
	uint32_t loops; /* EBX: iterations */
	uint32_t sum;   /* ECX: rol(sum, 5) ^ loops after each iteration */
	uint32_t esi, edi, ebp;
};
#define IDLE_ESI 0x5e5e1001u
#define IDLE_EDI 0xd1d1c0deu
#define IDLE_EBP 0xb0b0cafeu
/* Polls COM1 (with pause) until a 'q' arrives; clears in_symcall each round. */
void idle_loop(struct idle_regs *r);

#endif
