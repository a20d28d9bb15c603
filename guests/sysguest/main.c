/*
 * sysguest: a freestanding x86-64 kernel whose user-mode (CPL 3) program
 * makes system calls through both SYSCALL and INT 0x80, so that the VMM's
 * system-call interception can be tested and benchmarked without Linux.
 *
 * Boot: multiboot v1 (entry.S enters long mode with the first 1 GiB
 * identity-mapped by 2 MiB User + Writable pages). The kernel loads a TSS
 * (RSP0 = kstack_top) and an IDT (every vector reports and ends the guest,
 * except 0x80: a DPL 3 interrupt gate), sets STAR (SYSCALL CS 0x08 / SS
 * 0x10, SYSRETQ CS 0x23 / SS 0x1b), LSTAR and SFMASK (IF TF DF AC), and
 * enters user.c's user_main with SYSRETQ on its own stack. Interrupts
 * stay off throughout.
 *
 * System calls (Linux numbers; unknown ones return -38, ENOSYS):
 *   SYSCALL   (nr RAX; args RDI RSI RDX R10 R8 R9; result RAX; SYSRETQ)
 *             1 write(fd, buf, len), 39 getpid -> 42, 110 getppid -> 1,
 *             60 exit(code)
 *   INT 0x80  (nr EAX; args EBX ECX EDX ESI EDI EBP; result EAX; IRETQ)
 *             4 write, 20 getpid -> 42, 64 getppid -> 1, 1 exit
 * write prints len bytes of buf on COM1 and returns len (fd 1 or 2;
 * other fds -9, a buffer outside the first 1 GiB -14).
 *
 * Command line: loops=N (default 1000), passed to the user program;
 * exit=int80 makes the user program exit through INT 0x80 instead of
 * SYSCALL.
 *
 * Output: the kernel prints "sysguest: kernel ready loops=N" before
 * entering user mode; every other line up to the exit comes from the user
 * program (user.c), one write system call per line. exit(0) prints
 *   sysguest: kernel saw syscall=S int80=I   (calls the kernel executed)
 *   sysguest: ok
 * and runs outl(0, 0xf4): VMM exit status 1. exit(code != 0) prints
 * "FAIL exit (code N)" and runs outl(1): status 3. A CPU exception prints
 * "FAIL exception (vector V error 0x.. rip 0x.. cs 0x.. rsp 0x.. cr2 0x..)"
 * and runs outl(2): status 5.
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"
#include "sysguest.h"

#define MSR_STAR   0xc0000081
#define MSR_LSTAR  0xc0000082
#define MSR_FMASK  0xc0000084

#define RFLAGS_TF 0x100
#define RFLAGS_IF 0x200
#define RFLAGS_DF 0x400
#define RFLAGS_AC 0x40000

/* Everything the kernel maps (and so all a buffer may cover). */
#define MAPPED_END (1ull << 30)

struct tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iopb;
} __attribute__((packed));

struct idt_gate {
	uint16_t off_lo;
	uint16_t sel;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t off_mid;
	uint32_t off_hi;
	uint32_t reserved;
};

static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
static uint8_t user_stack[16384] __attribute__((aligned(16)));
static char cmdline[1024];
static uint64_t n_syscall, n_int80;

static void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr"
			 :
			 : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
}

static uint64_t read_cr2(void)
{
	uint64_t v;
	__asm__ volatile("mov %%cr2, %0" : "=r"(v));
	return v;
}

static void set_gate(unsigned vec, void *handler, unsigned dpl)
{
	uint64_t a = (uint64_t)(uintptr_t)handler;
	struct idt_gate *g = &idt[vec];

	g->off_lo = (uint16_t)a;
	g->sel = SEL_KCODE;
	g->ist = 0;
	g->type_attr = (uint8_t)(0x80 | (dpl << 5) | 0xe); /* present, interrupt gate */
	g->off_mid = (uint16_t)(a >> 16);
	g->off_hi = (uint32_t)(a >> 32);
	g->reserved = 0;
}

static void load_tss(void)
{
	uint64_t base = (uint64_t)(uintptr_t)&tss;
	uint64_t limit = sizeof(tss) - 1;

	tss.rsp[0] = (uint64_t)(uintptr_t)kstack_top;
	tss.iopb = sizeof(tss); /* no I/O bitmap: user port I/O faults */
	/* Available 64-bit TSS (type 9), present, DPL 0. */
	gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
			   (0x89ull << 40) | (((limit >> 16) & 0xf) << 48) |
			   (((base >> 24) & 0xff) << 56);
	gdt[SEL_TSS / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS) : "memory");
}

static void load_idt(void)
{
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };

	for (unsigned v = 0; v < 256; v++)
		set_gate(v, exc_stubs + 16 * v, 0);
	set_gate(0x80, (void *)int80_entry, 3);
	__asm__ volatile("lidt %0" : : "m"(desc) : "memory");
}

static void setup_syscall(void)
{
	wrmsr(MSR_STAR, ((uint64_t)SEL_KDATA << 48) | ((uint64_t)SEL_KCODE << 32));
	wrmsr(MSR_LSTAR, (uint64_t)(uintptr_t)syscall_entry);
	wrmsr(MSR_FMASK, RFLAGS_IF | RFLAGS_TF | RFLAGS_DF | RFLAGS_AC);
}

static __attribute__((noreturn)) void do_exit(int64_t code)
{
	if (code != 0) {
		kprintf("FAIL exit (code %ld)\n", (long)code);
		debug_exit(EXIT_CODE);
	}
	kprintf("sysguest: kernel saw syscall=%lu int80=%lu\n",
		(unsigned long)n_syscall, (unsigned long)n_int80);
	kprintf("sysguest: ok\n");
	debug_exit(EXIT_OK);
}

static long do_write(uint64_t fd, uint64_t buf, uint64_t len)
{
	const char *p = (const char *)(uintptr_t)buf;

	if (fd != 1 && fd != 2)
		return -EBADF;
	if (buf >= MAPPED_END || len > MAPPED_END - buf)
		return -EFAULT;
	for (uint64_t i = 0; i < len; i++)
		uart_putc(COM1, p[i]);
	return (long)len;
}

long syscall_dispatch(uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3,
		      uint64_t a4, uint64_t a5, uint64_t nr)
{
	(void)a3;
	(void)a4;
	(void)a5;
	n_syscall++;
	switch (nr) {
	case NR_WRITE:
		return do_write(a0, a1, a2);
	case NR_GETPID:
		return 42;
	case NR_GETPPID:
		return 1;
	case NR_EXIT:
		do_exit((int)a0);
	default:
		return -ENOSYS;
	}
}

void int80_dispatch(struct frame *f)
{
	uint32_t nr = (uint32_t)f->rax;
	uint32_t ebx = (uint32_t)f->rbx, ecx = (uint32_t)f->rcx,
		 edx = (uint32_t)f->rdx;
	long r;

	n_int80++;
	switch (nr) {
	case NR32_WRITE:
		r = do_write(ebx, ecx, edx);
		break;
	case NR32_GETPID:
		r = 42;
		break;
	case NR32_GETPPID:
		r = 1;
		break;
	case NR32_EXIT:
		do_exit((int32_t)ebx);
	default:
		r = -ENOSYS;
		break;
	}
	/* The 32-bit ABI returns EAX; keep RAX its sign extension. */
	f->rax = (uint64_t)(int64_t)(int32_t)r;
}

void exc_dispatch(struct frame *f)
{
	kprintf("FAIL exception (vector %lu error 0x%lx rip 0x%lx cs 0x%lx rsp 0x%lx cr2 0x%lx)\n",
		(unsigned long)f->vector, (unsigned long)f->error,
		(unsigned long)f->rip, (unsigned long)f->cs,
		(unsigned long)f->rsp, (unsigned long)read_cr2());
	debug_exit(EXIT_EXCEPTION);
}

void kmain64(uint32_t magic, uint32_t info)
{
	const struct mb_info *mbi = info ? mb_ptr(info) : 0;
	uint64_t loops, flags = 0;
	char word[16];

	uart_init(COM1);
	if (magic == MB_BOOTLOADER_MAGIC && mbi) {
		const char *c = mb_cmdline(mbi);
		size_t n = strlen(c);
		if (n >= sizeof(cmdline))
			n = sizeof(cmdline) - 1;
		memcpy(cmdline, c, n);
		cmdline[n] = 0;
	}
	if (exc_stubs_end - exc_stubs != 4096) {
		kprintf("FAIL stubs (%ld bytes, not 4096)\n",
			(long)(exc_stubs_end - exc_stubs));
		debug_exit(EXIT_EXCEPTION);
	}
	loops = cmdline_u32(cmdline, "loops", 1000);
	if (cmdline_get(cmdline, "exit", word, sizeof(word)) && strcmp(word, "int80") == 0)
		flags |= UFLAG_EXIT_INT80;

	load_tss();
	load_idt();
	setup_syscall();

	kprintf("sysguest: kernel ready loops=%lu\n", (unsigned long)loops);
	/* As if called: RSP + 8 is 16-byte aligned at the first instruction. */
	enter_user(user_main, user_stack + sizeof(user_stack) - 8, loops, flags);
}
