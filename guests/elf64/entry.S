/*
 * elf64test entry: the VMM starts us directly in 64-bit long mode with
 * RAX = 0x2BADB002 and RBX = physical address of a multiboot v1 info block.
 * Zero .bss, set up a stack and call main64(rax, rbx).
 */
	.code64
	.text
	.globl _start
	.type _start, @function
_start:
	movq %rax, %r8
	movq %rbx, %r9
	cld
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	xorl %eax, %eax
	rep stosb
	leaq stack_top(%rip), %rsp
	xorl %ebp, %ebp
	movq %r8, %rdi
	movq %r9, %rsi
	call main64
1:	cli
	hlt
	jmp 1b
	.size _start, . - _start

	/* Gives the RW segment some file contents of its own. */
	.data
	.globl image_tag
image_tag:
	.ascii "palacios-rs elf64 guest"
	.byte 0

	.bss
	.align 16
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
