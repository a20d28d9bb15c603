/*
 * symtest: the IDT and exception handler, and test=symcall.
 *
 * SymCall numbers (EAX at symcall_entry; a0..a4 = EBX, ECX, EDX, ESI, EDI;
 * results: status in EBX, out[0..3] in ECX, EDX, ESI, EDI of SYMCALL_RET):
 *   0  the null upcall (in cpu.S): status 0 at once, ECX..EDI returned as
 *      they came (a1..a4); not counted
 *   1  out[0] = a0 * 1000 + a1 * 10 + a2 (32-bit wrap), out[1] = a3 ^ a4,
 *      out[2] = the upcall counter (this call included); status 0
 *   2  busy-wait a0 ms (TSC, CPUID kHz); out[0] = a0; status 0
 *   3  ud2: the #UD handler makes SYMCALL_ERR with code 6
 *   4  spins forever (the VMM's timeout ends it)
 *   5  SymMod: SYMMOD_QUERY module 0 for its size (-1: status 1; 0 or more
 *      than 4096: status 2), copy it into a page-aligned 4 KiB buffer and
 *      call it as unsigned fn(unsigned a0) (cdecl); out[0] = the result
 *   other: status 0xEE
 * The upcall counter (its address is printed on the READY line) counts
 * every entry to symcall_dispatch, whatever the number.
 */
#include "symtest.h"

/* ------------------------------------------------------------ IDT */

struct idt_gate {
	uint16_t off_lo, sel;
	uint8_t zero, attr;
	uint16_t off_hi;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));

static struct {
	uint16_t pad;
	uint16_t limit;
	uint32_t base;
} __attribute__((packed, aligned(4))) idtr;

void idt_init(void)
{
	if (isr_stubs_end - isr_stubs != 256 * 16) {
		kprintf("FAIL idt (interrupt stubs are %d bytes, not 4096)\n",
			(int)(isr_stubs_end - isr_stubs));
		debug_exit(4);
	}
	for (int v = 0; v < 256; v++) {
		uint32_t a = (uint32_t)(uintptr_t)(isr_stubs + 16 * v);
		idt[v].off_lo = (uint16_t)a;
		idt[v].sel = SEL_CODE;
		idt[v].zero = 0;
		idt[v].attr = 0x8e; /* present, DPL 0, 32-bit interrupt gate */
		idt[v].off_hi = (uint16_t)(a >> 16);
	}
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (uint32_t)(uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr.limit));
}

/*
 * Any vector. Inside a SymCall: report it with SYMCALL_ERR (code = the
 * vector); the VMM then restores the interrupted state and never comes
 * back here. Outside one: FAIL and exit 4.
 */
void isr_dispatch(struct frame *f)
{
	uint32_t v = f->vector & 0xff;

	if (in_symcall) {
		uint32_t rc = hcall(HC_SYMCALL_ERR, v, 0, 0, 0, 0);
		kprintf("FAIL symcall error returned (vector %u at EIP 0x%x, "
			"SYMCALL_ERR eax 0x%x)\n", v, f->eip, rc);
		halt_forever();
	}
	kprintf("FAIL exception vector %u at EIP 0x%x (error code 0x%x)\n", v,
		f->eip, f->err);
	debug_exit(4);
}

/* ------------------------------------------------------------ SymCall */

static uint8_t upcall_stack[16384] __attribute__((aligned(16)));
static uint8_t symmod_buf[4096] __attribute__((aligned(4096)));
volatile uint32_t upcalls;

/* Busy-wait ms milliseconds of guest TSC time (interrupts are off). */
static void tsc_wait_ms(uint32_t ms)
{
	uint64_t end = rdtsc() + (uint64_t)ms * tsc_khz;

	while (rdtsc() < end)
		cpu_relax();
}

static uint32_t symmod_run(uint32_t arg, uint32_t *out)
{
	uint32_t size = hcall(HC_SYMMOD_QUERY, 0, 0, 0, 0, 0);

	if (size == HC_EUNKNOWN)
		return 1;
	if (size == 0 || size > sizeof(symmod_buf))
		return 2;
	uint32_t rc = hcall(HC_SYMMOD_QUERY, 0, (uint32_t)(uintptr_t)symmod_buf,
			    sizeof(symmod_buf), 0, 0);
	if (rc == HC_EUNKNOWN)
		return 1;
	/* Paging is off: the buffer is executable as it is. */
	unsigned (*fn)(unsigned) = (unsigned (*)(unsigned))(uintptr_t)symmod_buf;
	__asm__ volatile("" : : : "memory");
	out[0] = fn(arg);
	return 0;
}

/* Called by symcall_entry (cpu.S); the result is the SYMCALL_RET status. */
uint32_t symcall_dispatch(uint32_t nr, uint32_t a0, uint32_t a1, uint32_t a2,
			  uint32_t a3, uint32_t a4, uint32_t *out)
{
	uint32_t n = ++upcalls;

	out[0] = out[1] = out[2] = out[3] = 0;
	switch (nr) {
	case 1:
		out[0] = a0 * 1000u + a1 * 10u + a2;
		out[1] = a3 ^ a4;
		out[2] = n;
		return 0;
	case 2:
		tsc_wait_ms(a0);
		out[0] = a0;
		return 0;
	case 3:
		__asm__ volatile("ud2");
		return 0xEE; /* not reached */
	case 4:
		__asm__ volatile("1: jmp 1b");
		return 0xEE;
	case 5:
		return symmod_run(a0, out);
	default:
		return 0xEE;
	}
}

/* SYMCALL_RET came back: the VMM did not end the SymCall. */
void symcall_returned(uint32_t eax)
{
	kprintf("FAIL symcall ret returned (eax 0x%x)\n", eax);
	for (;;)
		cpu_relax();
}

void run_symcall(void)
{
	uint16_t cs;
	struct idle_regs r;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	wrmsr(MSR_SYMCALL_RIP, (uint32_t)(uintptr_t)symcall_entry);
	wrmsr(MSR_SYMCALL_RSP,
	      (uint32_t)(uintptr_t)(upcall_stack + sizeof(upcall_stack)));
	wrmsr(MSR_SYMCALL_CS, cs);
	wrmsr(MSR_SYMCALL_GS, 0);
	wrmsr(MSR_SYMCALL_FS, 0);
	kprintf("symtest: symcall entry 0x%x stack 0x%x cs 0x%x\n",
		(uint32_t)(uintptr_t)symcall_entry,
		(uint32_t)(uintptr_t)(upcall_stack + sizeof(upcall_stack)), cs);
	kprintf("READY symcall count=0x%x\n", (uint32_t)(uintptr_t)&upcalls);

	idle_loop(&r);

	kprintf("symtest: upcalls=%u\n", upcalls);
	/* Recompute the checksum the loop kept in ECX from its counter. */
	uint32_t sum = 0;
	for (uint32_t i = 1; i <= r.loops && i != 0; i++)
		sum = ((sum << 5) | (sum >> 27)) ^ i;
	kprintf("symtest: idle loops=%u\n", r.loops);
	if (r.esi != IDLE_ESI || r.edi != IDLE_EDI || r.ebp != IDLE_EBP ||
	    r.sum != sum) {
		kprintf("FAIL idle registers corrupted (esi 0x%x edi 0x%x ebp "
			"0x%x sum 0x%x, want 0x%x 0x%x 0x%x 0x%x)\n", r.esi,
			r.edi, r.ebp, r.sum, IDLE_ESI, IDLE_EDI, IDLE_EBP, sum);
		debug_exit(4);
	}
	kprintf("idle: ok\n");
	kprintf("DONE\n");
	debug_exit(1);
}
