/*
 * virtio guest: the interrupt return path (the GDT, load_gdt() and the
 * interrupt stubs are in lib/desc32.S).
 */

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
	 * IRET in protected mode, so return with POPF (IF still clear),
	 * then STI, whose one-instruction interrupt shadow covers the far
	 * RET. (Ring 0 to ring 0, no stack switch, no NMIs used.)
	 */
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

	.section .note.GNU-stack, "", @progbits
