/*
 * Shared by the 32-bit guests (pctest, virtio, symtest): a flat GDT with
 * load_gdt(), and the 256 interrupt stubs. Each stub pushes a dummy error
 * code where the CPU pushes none, then the vector, and jumps to the guest's
 * own isr_common (which decides how an interrupt returns).
 */

#define SEL_CODE 0x08
#define SEL_DATA 0x10

/* --- GDT: null, flat 32-bit code (0x08), flat data (0x10) -------------- */

	.data
	.align 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff
	.quad 0x00cf92000000ffff
gdt_end:

	.align 4
	.word 0
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.text
	.globl load_gdt
	.type load_gdt, @function
load_gdt:
	lgdt gdt_desc
	ljmp $SEL_CODE, $1f
1:	movw $SEL_DATA, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %fs
	movw %ax, %gs
	movw %ax, %ss
	ret
	.size load_gdt, . - load_gdt

/* --- interrupt stubs: 16 bytes each, isr_stubs + 16 * vector ----------- */

	.text
	.align 16
	.globl isr_stubs, isr_stubs_end
isr_stubs:
	.set vec, 0
	.rept 256
	.align 16
	/* The CPU pushes an error code for these; push a dummy for the rest. */
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushl $0
	.endif
	pushl $vec
	jmp isr_common
	.set vec, vec + 1
	.endr
	.align 16
isr_stubs_end:   /* idt_init() checks that this is isr_stubs + 4096 */
