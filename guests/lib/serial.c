#include "io.h"
#include "kstd.h"

#define UART_DATA 0 /* THR/RBR, divisor low when DLAB=1 */
#define UART_IER  1 /* divisor high when DLAB=1 */
#define UART_FCR  2
#define UART_LCR  3
#define UART_MCR  4
#define UART_LSR  5

#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY  0x20

void uart_init(uint16_t base)
{
	outb(0x80, base + UART_LCR);  /* DLAB on */
	outb(0x01, base + UART_DATA); /* divisor 1: 115200 baud */
	outb(0x00, base + UART_IER);
	outb(0x03, base + UART_LCR);  /* 8N1, DLAB off */
	outb(0xc7, base + UART_FCR);  /* FIFOs on and cleared */
	outb(0x03, base + UART_MCR);  /* DTR, RTS */
}

void uart_putc(uint16_t base, char c)
{
	while (!(inb(base + UART_LSR) & LSR_THR_EMPTY))
		;
	outb((uint8_t)c, base + UART_DATA);
}

void uart_puts(uint16_t base, const char *s)
{
	while (*s)
		uart_putc(base, *s++);
}

uint8_t uart_getc(uint16_t base)
{
	while (!(inb(base + UART_LSR) & LSR_DATA_READY))
		;
	return inb(base + UART_DATA);
}

void port_puts(uint16_t port, const char *s)
{
	while (*s)
		outb((uint8_t)*s++, port);
}
