#include "kstd.h"

struct spec {
	int left;     /* '-' flag */
	char pad;     /* ' ' or '0' */
	unsigned width;
};

static void emit_padding(putc_fn out, void *ctx, char c, unsigned n)
{
	while (n--)
		out(c, ctx);
}

static void emit_str(putc_fn out, void *ctx, const char *s, const struct spec *sp)
{
	unsigned len = (unsigned)strlen(s);
	unsigned fill = sp->width > len ? sp->width - len : 0;

	if (!sp->left)
		emit_padding(out, ctx, ' ', fill);
	while (*s)
		out(*s++, ctx);
	if (sp->left)
		emit_padding(out, ctx, ' ', fill);
}

/*
 * Divide by a small base with shifts and subtractions so that 64-bit
 * values print on i386 without libgcc's __udivdi3.
 */
static uint64_t divmod_small(uint64_t n, unsigned base, unsigned *rem)
{
	uint64_t q = 0;
	unsigned r = 0;

	for (int bit = 63; bit >= 0; bit--) {
		r = (r << 1) | (unsigned)((n >> bit) & 1);
		if (r >= base) {
			r -= base;
			q |= (uint64_t)1 << bit;
		}
	}
	*rem = r;
	return q;
}

static void emit_num(putc_fn out, void *ctx, uint64_t v, unsigned base, int neg,
		     int upper, const struct spec *sp)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char buf[24];
	unsigned n = 0, len, fill;

	do {
		unsigned d;
		v = divmod_small(v, base, &d);
		buf[n++] = digits[d];
	} while (v);

	len = n + (neg ? 1 : 0);
	fill = sp->width > len ? sp->width - len : 0;
	if (!sp->left && sp->pad == ' ')
		emit_padding(out, ctx, ' ', fill);
	if (neg)
		out('-', ctx);
	if (!sp->left && sp->pad == '0')
		emit_padding(out, ctx, '0', fill);
	while (n)
		out(buf[--n], ctx);
	if (sp->left)
		emit_padding(out, ctx, ' ', fill);
}

void vformat(putc_fn out, void *ctx, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		struct spec sp = { 0, ' ', 0 };
		int lng = 0;

		if (*fmt != '%') {
			out(*fmt, ctx);
			continue;
		}
		fmt++;
		for (;; fmt++) {
			if (*fmt == '-')
				sp.left = 1;
			else if (*fmt == '0')
				sp.pad = '0';
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			sp.width = sp.width * 10 + (unsigned)(*fmt++ - '0');
		while (*fmt == 'l') {
			lng++;
			fmt++;
		}

		switch (*fmt) {
		case 'c':
			out((char)va_arg(ap, int), ctx);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			emit_str(out, ctx, s ? s : "(null)", &sp);
			break;
		}
		case 'd':
		case 'i': {
			int64_t v;
			if (lng >= 2)
				v = va_arg(ap, long long);
			else if (lng == 1)
				v = va_arg(ap, long);
			else
				v = va_arg(ap, int);
			emit_num(out, ctx, v < 0 ? -(uint64_t)v : (uint64_t)v, 10,
				 v < 0, 0, &sp);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v;
			if (lng >= 2)
				v = va_arg(ap, unsigned long long);
			else if (lng == 1)
				v = va_arg(ap, unsigned long);
			else
				v = va_arg(ap, unsigned int);
			emit_num(out, ctx, v, *fmt == 'u' ? 10 : 16, 0,
				 *fmt == 'X', &sp);
			break;
		}
		case 'p':
			out('0', ctx);
			out('x', ctx);
			emit_num(out, ctx, (uintptr_t)va_arg(ap, void *), 16, 0, 0, &sp);
			break;
		case '\0':
			return;
		default: /* "%%" and anything unknown print literally */
			out(*fmt, ctx);
			break;
		}
	}
}

static void console_putc(char c, void *ctx)
{
	(void)ctx;
	uart_putc(COM1, c);
}

void kvprintf(const char *fmt, va_list ap)
{
	vformat(console_putc, NULL, fmt, ap);
}

void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
}
