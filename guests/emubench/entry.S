/*
 * emubench entry: a multiboot v1 kernel (the image is linked as ELF64 and
 * converted to ELF32 with objcopy, so QEMU's -kernel and v3's multiboot
 * loader both take it). The loader enters _start in flat 32-bit protected
 * mode; we zero .bss, identity-map the first 1 GiB with 2 MiB pages, turn on
 * long mode and call bench_main(magic, info) in 64-bit mode.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x3 /* page-align modules, memory info */

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
	movl $stack_top, %esp
	movl %eax, %esi         /* multiboot magic */
	movl %ebx, %ebp         /* info block */

	cld
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	xorl %eax, %eax
	rep stosb               /* page tables and stack live in .bss */

	movl $pdpt, %eax
	orl $3, %eax
	movl %eax, pml4
	movl $pd, %eax
	orl $3, %eax
	movl %eax, pdpt
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax         /* present, writable, 2 MiB */
	movl %eax, pd(,%ecx,8)
	incl %ecx
	cmpl $512, %ecx
	jb 1b

	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax         /* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx  /* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax   /* PG, PE */
	movl %eax, %cr0
	lgdt gdt_desc
	ljmp $0x08, $start64

	.code64
start64:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq $stack_top, %rsp
	movl %esi, %edi         /* zero-extends */
	movl %ebp, %esi
	call bench_main
1:	cli
	hlt
	jmp 1b
	.size _start, . - _start

	.section .rodata
	.align 8
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff /* 0x10: data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	/* Gives the RW segment some file contents of its own. */
	.data
	.globl image_tag
image_tag:
	.ascii "palacios-rs emubench guest"
	.byte 0

	.bss
	.align 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096
	.align 16
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
