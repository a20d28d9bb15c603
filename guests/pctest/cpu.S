/*
 * pctest: the interrupt return path and the AP start-up
 * code (16-bit trampoline copied below 1 MiB, 32-bit entry in the image).
 */

#define MAX_CPUS 64   /* PCT_MAX_CPUS in pctest.h */
#define SEL_CODE 0x08
#define SEL_DATA 0x10

/* The GDT, load_gdt() and the interrupt stubs are in lib/desc32.S. */

	.data
	/* Next AP index (the BSP is 0); lock xadd'ed by each AP. */
	.align 4
	.globl ap_next
ap_next:
	.long 1

	.text
	.globl isr_common
isr_common:
	pushal
	cld
	pushl %esp              /* struct frame * */
	call isr_dispatch
	addl $4, %esp
	popal
	addl $8, %esp           /* vector, error code */
	/*
	 * Stack: EIP, CS, EFLAGS. KVM's instruction emulator cannot run
	 * IRET in protected mode, so unless "iret=1" was given we return
	 * with POPF (IF still clear), then STI whose one-instruction
	 * interrupt shadow covers the far RET. (Ring 0 to ring 0, no stack
	 * switch; NMIs are not used, so nothing needs IRET's NMI unblock.)
	 */
	cmpb $0, use_iret
	jne 3f
	btl $9, 8(%esp)         /* IF of the interrupted code */
	jc 2f
	pushl 8(%esp)
	popfl
	lret $4
2:	pushl 8(%esp)
	andl $~0x200, (%esp)
	popfl
	sti
	lret $4
3:	iret

	.data
	.globl use_iret
use_iret:
	.byte 0
	.text

/* --- AP trampoline: runs at TRAMP_ADDR (0x7000), CS = 0x0700, IP = 0 ---- */

	.text
	.align 16
	.globl tramp_start, tramp_end
	.code16
tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tramp_gdtr - tramp_start  /* DS-relative: the copy's own gdtr */
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE, $ap_entry32    /* straight into the image at 1 MiB+ */
	.align 4
	.word 0
tramp_gdtr:
	.word 3 * 8 - 1          /* lib/desc32.S: null, code, data */
	.long gdt
tramp_end:
	.code32

/* --- AP 32-bit entry --------------------------------------------------- */

	.text
	.globl ap_entry32
	.type ap_entry32, @function
ap_entry32:
	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %fs
	movw %ax, %gs
	movw %ax, %ss
	movl $1, %eax
	lock xaddl %eax, ap_next        /* eax = this AP's index */
	cmpl $MAX_CPUS, %eax
	jae 2f
	movl %eax, %ecx
	incl %ecx
	shll $12, %ecx
	leal ap_stacks(%ecx), %esp      /* 4 KiB stack per index */
	pushl %eax
	call ap_main
2:	cli
	hlt
	jmp 2b
	.size ap_entry32, . - ap_entry32

	.bss
	.align 4096
ap_stacks:
	.skip MAX_CPUS * 4096

	.section .note.GNU-stack, "", @progbits
