/*
 * emubench inner loops, 64-bit. uint64_t loop_X(uint64_t n, void *buf):
 * n iterations of a fixed instruction sequence; the returned value goes to
 * the "result" line so both VMMs can be compared. The instruction count of
 * one iteration is in each comment (INSNS in bench/emu.py must agree with
 * it). n = 0 runs no iteration.
 */
	.code64
	.text

/* dec/jnz: 2 instructions per iteration. */
	.globl loop_dec
	.type loop_dec, @function
	.p2align 4
loop_dec:
	movq %rdi, %rax
	testq %rax, %rax
	jz 2f
	.p2align 4
1:	decq %rax
	jnz 1b
2:	ret
	.size loop_dec, . - loop_dec

/*
 * Memory: 8 instructions, 5 memory accesses (3 loads, 2 stores, one of them
 * a read-modify-write) per iteration, walking a 256 KiB buffer 32 bytes at a
 * time (64 pages, so the TLB is exercised too).
 */
#define MEM_BUF_MASK (256 * 1024 - 1)
	.globl loop_mem
	.type loop_mem, @function
	.p2align 4
loop_mem:
	xorl %edx, %edx
	xorl %eax, %eax
	testq %rdi, %rdi
	jz 2f
	.p2align 4
1:	movq (%rsi,%rdx), %rax
	addq 8(%rsi,%rdx), %rax
	movq %rax, 16(%rsi,%rdx)
	addq %rax, 24(%rsi,%rdx)
	addq $32, %rdx
	andq $MEM_BUF_MASK, %rdx
	decq %rdi
	jnz 1b
2:	ret
	.size loop_mem, . - loop_mem

/* call/ret: 4 instructions per iteration (call, ret, dec, jnz). */
	.globl loop_call
	.type loop_call, @function
	.p2align 4
loop_call:
	xorl %eax, %eax
	testq %rdi, %rdi
	jz 2f
	.p2align 4
1:	call leaf
	decq %rdi
	jnz 1b
2:	ret
	.size loop_call, . - loop_call

	.p2align 4
leaf:
	ret

/*
 * Flag-heavy ALU: 16 instructions per iteration; every flag consumer (adc,
 * sbb, setcc) reads flags produced by a different kind of instruction
 * (add, sbb, shr, sar, cmp), so lazy flags have to be materialised.
 */
	.globl loop_alu
	.type loop_alu, @function
	.p2align 4
loop_alu:
	pushq %rbx
	movabsq $0x0123456789abcdef, %rax
	movabsq $0xfedcba9876543210, %rbx
	movabsq $0x0f1e2d3c4b5a6978, %rdx
	xorl %ecx, %ecx
	xorl %esi, %esi
	testq %rdi, %rdi
	jz 2f
	.p2align 4
1:	addq %rax, %rbx
	adcq %rbx, %rdx
	sbbq %rdx, %rax
	setc %cl
	addq %rcx, %rsi
	shrq $3, %rbx
	adcq $0, %rsi
	sarq $1, %rdx
	setnz %cl
	xorq %rdx, %rax
	rolq $7, %rax
	cmpq %rbx, %rdx
	setl %cl
	subq %rcx, %rsi
	decq %rdi
	jnz 1b
2:	xorq %rbx, %rax
	xorq %rdx, %rax
	xorq %rsi, %rax
	popq %rbx
	ret
	.size loop_alu, . - loop_alu

	.section .note.GNU-stack, "", @progbits
