#include "kstd.h"

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (unsigned char)*a - (unsigned char)*b;
		if (!*a)
			break;
	}
	return 0;
}

int strcmp(const char *a, const char *b)
{
	return strncmp(a, b, (size_t)-1);
}

int parse_u32(const char *s, size_t len, uint32_t *out)
{
	uint32_t v = 0;

	if (len == 0)
		return 0;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		v = v * 10 + (uint32_t)(s[i] - '0');
	}
	*out = v;
	return 1;
}

int cmdline_get(const char *cmdline, const char *key, char *buf, size_t buflen)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while (p && *p) {
		while (*p == ' ')
			p++;
		const char *word = p;
		while (*p && *p != ' ')
			p++;
		size_t wlen = (size_t)(p - word);
		if (wlen > klen && word[klen] == '=' &&
		    strncmp(word, key, klen) == 0) {
			size_t vlen = wlen - klen - 1;
			if (vlen > buflen - 1)
				vlen = buflen - 1;
			memcpy(buf, word + klen + 1, vlen);
			buf[vlen] = '\0';
			return 1;
		}
	}
	return 0;
}

uint32_t cmdline_u32(const char *cmdline, const char *key, uint32_t dflt)
{
	char buf[16];
	uint32_t v;
	if (cmdline && cmdline_get(cmdline, key, buf, sizeof buf) &&
	    parse_u32(buf, strlen(buf), &v))
		return v;
	return dflt;
}
