# flat16.bin: a 16-bit real-mode flat binary, loaded at linear 0x7c00.
#
# Entered at 0000:7C00 with arbitrary data/stack segments. Prints a greeting
# on COM1, writes "bochs-e9\n" to port 0xe9, checks where it runs with a
# call/pop, then leaves through the debug-exit port with 0x2a (VMM exit
# status (0x2a << 1) | 1 = 85). It is padded to 512 bytes with the 0x55AA
# boot signature, so it also boots as a disk image.

	.code16
	.text
	.globl _start
_start:
	cli
	cld
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw $0x7000, %sp

	call uart_init
	movw $msg_hello, %si
	call uart_puts

	movw $msg_e9, %si
	movw $0xe9, %dx
1:	lodsb
	testb %al, %al
	jz 2f
	outb %al, %dx
	jmp 1b
2:
	# Where are we? The return address of a near call is our own IP.
	call 3f
3:	popw %bx                          # IP of label 3
	movw %cs, %ax
	movzwl %ax, %eax
	shll $4, %eax
	movzwl %bx, %ebx
	addl %ebx, %eax                   # CS*16 + IP
	movw $msg_ip_ok, %si
	cmpl $0x7c00, %eax
	jb 4f
	cmpl $0x7dff, %eax
	jbe 5f
4:	movw $msg_ip_bad, %si
5:	call uart_puts

	movw $0xf4, %dx
	movl $0x2a, %eax
	outl %eax, %dx

6:	cli
	hlt
	jmp 6b

# COM1 16550: 115200 8N1, FIFOs on.
uart_init:
	movw $0x3fb, %dx
	movb $0x80, %al
	outb %al, %dx
	movw $0x3f8, %dx
	movb $0x01, %al
	outb %al, %dx
	movw $0x3f9, %dx
	xorb %al, %al
	outb %al, %dx
	movw $0x3fb, %dx
	movb $0x03, %al
	outb %al, %dx
	movw $0x3fa, %dx
	movb $0xc7, %al
	outb %al, %dx
	movw $0x3fc, %dx
	movb $0x03, %al
	outb %al, %dx
	ret

# Print the NUL-terminated string at DS:SI on COM1.
uart_puts:
	lodsb
	testb %al, %al
	jz 2f
	movb %al, %ah
	movw $0x3fd, %dx
1:	inb %dx, %al                      # wait for THR empty (LSR bit 5)
	testb $0x20, %al
	jz 1b
	movb %ah, %al
	movw $0x3f8, %dx
	outb %al, %dx
	jmp uart_puts
2:	ret

msg_hello:  .asciz "flat16: hello from real mode\r\n"
msg_e9:     .asciz "bochs-e9\n"
msg_ip_ok:  .asciz "flat16: ip ok\r\n"
msg_ip_bad: .asciz "flat16: ip BAD\r\n"

	.org 510
	.byte 0x55, 0xaa

	.section .note.GNU-stack, "", @progbits
