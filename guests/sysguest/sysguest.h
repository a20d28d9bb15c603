/* sysguest: shared declarations (see main.c for the overview). */
#ifndef SYSGUEST_H
#define SYSGUEST_H

/* GDT selectors (entry.S); the layout is the one SYSCALL/SYSRETQ expect. */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA 0x1b /* 0x18 | 3 */
#define SEL_UCODE 0x23 /* 0x20 | 3 */
#define SEL_TSS   0x28

/* System-call numbers: SYSCALL (x86-64 Linux) and INT 0x80 (i386 Linux). */
#define NR_WRITE    1
#define NR_GETPID   39
#define NR_EXIT     60
#define NR_GETPPID  110

#define NR32_EXIT    1
#define NR32_WRITE   4
#define NR32_GETPID  20
#define NR32_GETPPID 64

#define ENOSYS 38
#define EBADF  9
#define EFAULT 14

/* Debug-exit values (VMM status (value << 1) | 1). */
#define EXIT_OK        0 /* exit(0): status 1 */
#define EXIT_CODE      1 /* exit(code != 0): status 3 */
#define EXIT_EXCEPTION 2 /* a CPU exception: status 5 */

/* enter_user()'s second argument: how the user program exits. */
#define UFLAG_EXIT_INT80 1

#ifndef __ASSEMBLER__
#include <stdint.h>

/* What the stubs in entry.S push, lowest address first. */
struct frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU */
};

/* entry.S */
extern uint64_t gdt[];
extern char exc_stubs[], exc_stubs_end[], kstack_top[];
void syscall_entry(void);
void int80_entry(void);
__attribute__((noreturn)) void enter_user(void (*rip)(uint64_t, uint64_t),
					  void *rsp, uint64_t arg0, uint64_t arg1);

/* main.c */
void kmain64(uint32_t magic, uint32_t info);
long syscall_dispatch(uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3,
		      uint64_t a4, uint64_t a5, uint64_t nr);
void int80_dispatch(struct frame *f);
__attribute__((noreturn)) void exc_dispatch(struct frame *f);

/* user.c: runs at CPL 3 and never returns (it ends with exit). */
__attribute__((noreturn)) void user_main(uint64_t loops, uint64_t flags);
#endif

#endif
