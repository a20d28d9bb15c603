/*
 * Multiboot v1 header and 32-bit entry shared by demo.elf, mbtest.elf
 * and (built with -DAOUT_KLUDGE) mbaout.bin.
 *
 * The loader enters _start in flat 32-bit protected mode, paging off,
 * with EAX = 0x2BADB002 and EBX = physical address of the info block.
 * We zero .bss, switch to our own stack and call
 *     kmain(uint32_t eax, uint32_t ebx, uint32_t eflags_at_entry).
 */

#define MB_MAGIC      0x1BADB002
#define MB_PAGE_ALIGN (1 << 0)
#define MB_MEM_INFO   (1 << 1)
#define MB_AOUT_KLUDGE (1 << 16)

#ifdef AOUT_KLUDGE
#define MB_FLAGS (MB_PAGE_ALIGN | MB_MEM_INFO | MB_AOUT_KLUDGE)
#else
#define MB_FLAGS (MB_PAGE_ALIGN | MB_MEM_INFO)
#endif

	.section .multiboot, "a"
	.align 4
	.globl mb_header
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
	/* Where the raw image goes, for loaders that do not read ELF. */
	.long mb_header      /* header_addr */
	.long __load_start   /* load_addr */
	.long __load_end     /* load_end_addr */
	.long __bss_end      /* bss_end_addr */
	.long _start         /* entry_addr */
#endif

	.text
	.globl _start
	.type _start, @function
_start:
	movl $stack_top, %esp   /* the loader's ESP is undefined */
	pushfl                  /* EFLAGS as the loader left them */
	popl %edx
	movl %eax, %esi
	movl %ebx, %ebp

	cld
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	xorl %eax, %eax
	rep stosb               /* (the stack is in .bss, but empty now) */

	pushl %edx              /* eflags */
	pushl %ebp              /* ebx: multiboot info */
	pushl %esi              /* eax: magic */
	call kmain
1:	cli
	hlt
	jmp 1b
	.size _start, . - _start

	/* Guarantees .data has contents, so the raw image ends at __load_end. */
	.data
	.globl image_tag
image_tag:
	.ascii "palacios-rs guest"
	.byte 0

	.bss
	.align 16
stack_bottom:
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
