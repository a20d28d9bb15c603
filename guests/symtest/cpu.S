/*
 * symtest guest: the SymCall entry point and the register-heavy idle loop
 * (the GDT, load_gdt() and the interrupt stubs are in lib/desc32.S).
 */

#define HC_SYMCALL_RET 0x535

#define IDLE_ESI 0x5e5e1001
#define IDLE_EDI 0xd1d1c0de
#define IDLE_EBP 0xb0b0cafe

	.data
	/* 1 while symcall_entry runs (cleared again by the idle loop). */
	.align 4
	.globl in_symcall
in_symcall:
	.long 0


/* Every vector is fatal (or ends the SymCall): isr_dispatch never returns. */
	.text
	.globl isr_common
isr_common:
	pushal
	cld
	pushl %esp              /* struct frame * */
	call isr_dispatch
1:	cli
	hlt
	jmp 1b

/*
 * SymCall entry. The VMM enters here with interrupts off, ESP = the
 * registered upcall stack (16-byte aligned top), the flat segments, EAX =
 * call number and EBX, ECX, EDX, ESI, EDI = arguments. Every register
 * may be used: the VMM restores the interrupted state afterwards.
 */
	.globl symcall_entry
	.type symcall_entry, @function
symcall_entry:
	/* Call 0: the null upcall (a round trip with nothing to do; benchmarks). */
	testl %eax, %eax
	jnz 1f
	xorl %ebx, %ebx         /* status 0 */
	movl $HC_SYMCALL_RET, %eax
	outb %al, $0xec         /* the doorbell: does not come back */
1:	cld
	movl $1, in_symcall
	subl $16, %esp          /* uint32_t out[4] */
	movl %esp, %ebp
	subl $4, %esp           /* keep ESP 16-byte aligned at the call */
	pushl %ebp              /* out */
	pushl %edi              /* a4 */
	pushl %esi              /* a3 */
	pushl %edx              /* a2 */
	pushl %ecx              /* a1 */
	pushl %ebx              /* a0 */
	pushl %eax              /* nr */
	call symcall_dispatch
	movl $0, in_symcall
	movl %eax, %ebx         /* status */
	movl 0(%ebp), %ecx      /* out[0..3] */
	movl 4(%ebp), %edx
	movl 8(%ebp), %esi
	movl 12(%ebp), %edi
	movl $HC_SYMCALL_RET, %eax
	outb %al, $0xec         /* the doorbell: does not come back */
	pushl %eax
	call symcall_returned   /* prints FAIL and spins */
1:	jmp 1b
	.size symcall_entry, . - symcall_entry

/*
 * void idle_loop(struct idle_regs *r): poll COM1 until a 'q' arrives,
 * keeping a loop counter (EBX), a running checksum (ECX) and canaries in
 * ESI, EDI and EBP, then store those five registers in *r. SymCalls
 * interrupt this loop; they must leave every register as it was.
 */
	.globl idle_loop
	.type idle_loop, @function
idle_loop:
	pushl %ebp
	pushl %ebx
	pushl %esi
	pushl %edi
	xorl %ebx, %ebx
	xorl %ecx, %ecx
	movl $IDLE_ESI, %esi
	movl $IDLE_EDI, %edi
	movl $IDLE_EBP, %ebp
1:	movl $0, in_symcall     /* no SymCall is running while we are here */
	incl %ebx
	roll $5, %ecx
	xorl %ebx, %ecx
	pause
	movw $0x3fd, %dx        /* COM1 LSR */
	inb %dx, %al
	testb $1, %al
	jz 1b
	movw $0x3f8, %dx        /* COM1 RBR */
	inb %dx, %al
	cmpb $'q', %al
	jne 1b
	movl 20(%esp), %eax     /* r */
	movl %ebx, 0(%eax)
	movl %ecx, 4(%eax)
	movl %esi, 8(%eax)
	movl %edi, 12(%eax)
	movl %ebp, 16(%eax)
	popl %edi
	popl %esi
	popl %ebx
	popl %ebp
	ret
	.size idle_loop, . - idle_loop

	.section .note.GNU-stack, "", @progbits
