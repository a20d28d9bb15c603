/* Freestanding support: strings, serial ports and a tiny printf. */
#ifndef GUEST_KSTD_H
#define GUEST_KSTD_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* string.c */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
/* Parse a decimal number; returns 0 and leaves *out alone on junk. */
int parse_u32(const char *s, size_t len, uint32_t *out);
/*
 * Look for "key=value" among the space-separated words of cmdline and
 * copy value (NUL-terminated, truncated to buflen - 1) into buf.
 * Returns 1 when the word was found.
 */
int cmdline_get(const char *cmdline, const char *key, char *buf, size_t buflen);
/* The decimal value of "key=N" in cmdline (which may be NULL), or dflt. */
uint32_t cmdline_u32(const char *cmdline, const char *key, uint32_t dflt);

/* serial.c: 16550 UARTs, polled. */
#define COM1 0x3f8
#define COM2 0x2f8

void uart_init(uint16_t base);
void uart_putc(uint16_t base, char c);
void uart_puts(uint16_t base, const char *s);
/* Blocks until a byte has arrived. */
uint8_t uart_getc(uint16_t base);
/* Write a string byte by byte to a plain output port (0xe9, 0x402...). */
void port_puts(uint16_t port, const char *s);

/* printf.c: %s %c %d %i %u %x %X %p %%, flags '-' '0', width, l/ll. */
typedef void (*putc_fn)(char c, void *ctx);
void vformat(putc_fn out, void *ctx, const char *fmt, va_list ap);
/* Formatted output to the console (COM1). Lines end with a bare '\n'. */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(const char *fmt, va_list ap);

/* Entry point of the 32-bit multiboot guests (called by mb32/entry.S). */
void kmain(uint32_t magic, uint32_t info, uint32_t eflags);

#endif
