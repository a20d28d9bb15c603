/*
 * sysguest entry: a multiboot v1 kernel (linked as ELF64 and converted to
 * ELF32 with objcopy, like emubench). The loader enters _start in flat
 * 32-bit protected mode; we zero .bss, identity-map the first 1 GiB with
 * 2 MiB pages that user mode may use (User + Writable), set EFER.LME and
 * EFER.SCE, turn on paging and call kmain64(magic, info) in 64-bit mode.
 *
 * Also here: the GDT (its TSS descriptor is filled in by main.c), the 256
 * exception/interrupt stubs, the SYSCALL entry, the INT 0x80 entry and
 * enter_user().
 */
#include "sysguest.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x3 /* page-align modules, memory info */

#define PTE_P   0x01
#define PTE_W   0x02
#define PTE_U   0x04
#define PTE_PS  0x80

	.section .multiboot, "a"
	.align 4
	.globl mb_header
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.code32
	.globl _start
	.type _start, @function
_start:
	movl $boot_stack_top, %esp
	movl %eax, %esi         /* multiboot magic */
	movl %ebx, %ebp         /* info block */

	cld
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	xorl %eax, %eax
	rep stosb               /* page tables and stacks live in .bss */

	movl $pdpt, %eax
	orl $(PTE_P | PTE_W | PTE_U), %eax
	movl %eax, pml4
	movl $pd, %eax
	orl $(PTE_P | PTE_W | PTE_U), %eax
	movl %eax, pdpt
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $(PTE_P | PTE_W | PTE_U | PTE_PS), %eax
	movl %eax, pd(,%ecx,8)
	incl %ecx
	cmpl $512, %ecx
	jb 1b

	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax         /* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx  /* EFER: LME | SCE */
	rdmsr
	orl $0x101, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax   /* PG, PE */
	movl %eax, %cr0
	lgdt gdt_desc
	ljmp $SEL_KCODE, $start64

	.code64
start64:
	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq $boot_stack_top, %rsp
	movl %esi, %edi         /* zero-extends */
	movl %ebp, %esi
	call kmain64
1:	cli
	hlt
	jmp 1b
	.size _start, . - _start

/*
 * The GDT, in the order SYSCALL/SYSRET need: STAR[47:32] = 0x08 gives
 * CS 0x08 / SS 0x10 on SYSCALL; STAR[63:48] = 0x10 gives SS 0x18|3 and
 * (SYSRETQ) CS 0x20|3. Writable: LTR sets the busy bit in the TSS entry.
 */
	.data
	.align 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08: kernel code, 64-bit */
	.quad 0x00cf92000000ffff /* 0x10: kernel data */
	.quad 0x00cff2000000ffff /* 0x18: user data, DPL 3 */
	.quad 0x00affa000000ffff /* 0x20: user code, 64-bit, DPL 3 */
	.quad 0, 0               /* 0x28: 64-bit TSS (main.c) */
gdt_end:

	.align 4
	.word 0
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	/* Gives the RW segment some file contents of its own. */
	.globl image_tag
image_tag:
	.ascii "palacios-rs sysguest"
	.byte 0

	/* The user RSP while a SYSCALL switches to the kernel stack. */
	.align 8
user_rsp_save:
	.quad 0

/*
 * Exception and interrupt stubs, 16 bytes each (exc_stubs + 16 * vector):
 * push a dummy error code where the CPU pushes none, then the vector, and
 * save the registers as a struct frame (sysguest.h). exc_dispatch() reports
 * and ends the guest; it does not return.
 */
	.text
	.align 16
	.globl exc_stubs
exc_stubs:
	.set vec, 0
	.rept 256
	.align 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp exc_common
	.set vec, vec + 1
	.endr
	.align 16
	.globl exc_stubs_end
exc_stubs_end:  /* main.c checks that this is exc_stubs + 4096 */

	.macro PUSH_GPRS
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	.endm

	.macro POP_GPRS
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	.endm

exc_common:
	PUSH_GPRS
	cld
	movq %rsp, %rdi         /* struct frame * */
	andq $-16, %rsp
	call exc_dispatch
1:	cli
	hlt
	jmp 1b

/*
 * INT 0x80 (a DPL 3 interrupt gate, so IF is clear here). From user mode
 * the CPU has switched to TSS.RSP0. Number in EAX, arguments in EBX, ECX,
 * EDX, ESI, EDI, EBP; int80_dispatch() puts the result in the frame's RAX.
 */
	.globl int80_entry
	.type int80_entry, @function
int80_entry:
	pushq $0                /* error code */
	pushq $0x80             /* vector */
	PUSH_GPRS
	cld
	movq %rsp, %rdi         /* struct frame *: 16-byte aligned (40 + 16 + 120 bytes) */
	call int80_dispatch
	POP_GPRS
	addq $16, %rsp          /* vector, error code */
	iretq
	.size int80_entry, . - int80_entry

/*
 * SYSCALL entry (LSTAR). RCX = user RIP, R11 = user RFLAGS, SFMASK has
 * cleared IF, TF, DF and AC. The stack is still the user's: save RSP and
 * take the kernel stack (one CPU, nothing nests). Number in RAX, arguments
 * in RDI, RSI, RDX, R10, R8, R9; the result goes back in RAX. Like Linux,
 * only RAX, RCX and R11 change.
 */
	.globl syscall_entry
	.type syscall_entry, @function
syscall_entry:
	movq %rsp, user_rsp_save(%rip)
	movq $kstack_top, %rsp
	pushq user_rsp_save(%rip)
	pushq %rcx
	pushq %r11
	pushq %rdi
	pushq %rsi
	pushq %rdx
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %rax              /* 7th argument: nr (RSP is 16-byte aligned now) */
	movq %r10, %rcx         /* a3 */
	call syscall_dispatch
	addq $8, %rsp
	popq %r10
	popq %r9
	popq %r8
	popq %rdx
	popq %rsi
	popq %rdi
	popq %r11
	popq %rcx
	popq %rsp               /* the user stack */
	sysretq
	.size syscall_entry, . - syscall_entry

/*
 * enter_user(rip, rsp, arg0, arg1): leave for CPL 3 with SYSRETQ, RFLAGS
 * 0x2 (IF clear), RDI = arg0, RSI = arg1 and the other registers zero.
 */
	.globl enter_user
	.type enter_user, @function
enter_user:
	movq %rdi, %r8
	movq %rsi, %r9
	movq %rdx, %rdi
	movq %rcx, %rsi
	movq %r8, %rcx          /* user RIP */
	movq $0x2, %r11         /* user RFLAGS */
	movq %r9, %rsp
	xorl %eax, %eax
	xorl %ebx, %ebx
	xorl %edx, %edx
	xorl %ebp, %ebp
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r12d, %r12d
	xorl %r13d, %r13d
	xorl %r14d, %r14d
	xorl %r15d, %r15d
	sysretq
	.size enter_user, . - enter_user

	.bss
	.align 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096
	.align 16
	.skip 16384
boot_stack_top:
	/* TSS.RSP0 and the SYSCALL stack. */
	.align 16
	.skip 16384
	.globl kstack_top
kstack_top:

	.section .note.GNU-stack, "", @progbits
