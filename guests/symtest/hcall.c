/* symtest test=hcall: one PASS/FAIL line per hypercall check. */
#include "symtest.h"

static unsigned n_passed, n_failed, n_skipped;

static void check(int ok, const char *name, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* PASS name, or FAIL name (detail). */
static void check(int ok, const char *name, const char *fmt, ...)
{
	va_list ap;

	if (ok) {
		n_passed++;
		kprintf("PASS %s\n", name);
		return;
	}
	n_failed++;
	kprintf("FAIL %s (", name);
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	kprintf(")\n");
}

/* buf = a b c (truncated to size - 1 characters). */
static void cat3(char *buf, size_t size, const char *a, const char *b,
		 const char *c)
{
	const char *parts[3] = { a, b, c };
	size_t n = 0;

	for (int i = 0; i < 3; i++)
		for (const char *p = parts[i]; *p && n < size - 1; p++)
			buf[n++] = *p;
	buf[n] = 0;
}

static const char *const via_name[] = { "doorbell", "vmcall", "vmmcall" };

/* TEST through one instruction: the sum, its 32-bit wrap, preserved registers. */
static void test_sum(enum hc_via via)
{
	char name[48];
	struct hregs r = { HC_TEST, 1, 2, 3, 4, 5 };

	hcall_full(via, &r);
	cat3(name, sizeof(name), "test sum ", via_name[via], "");
	check(r.eax == 0 && r.ebx == 15, name, "eax 0x%x ebx %u, want 0 and 15",
	      r.eax, r.ebx);
	cat3(name, sizeof(name), "test preserves ecx..edi ", via_name[via], "");
	check(r.ecx == 2 && r.edx == 3 && r.esi == 4 && r.edi == 5, name,
	      "ecx %u edx %u esi %u edi %u, want 2 3 4 5", r.ecx, r.edx, r.esi,
	      r.edi);

	struct hregs w = { HC_TEST, 0xffffffffu, 1, 0, 0, 0 };
	hcall_full(via, &w);
	cat3(name, sizeof(name), "test wrap ", via_name[via], "");
	check(w.eax == 0 && w.ebx == 0, name, "eax 0x%x ebx 0x%x, want 0 and 0",
	      w.eax, w.ebx);
}

/* Does buf (len bytes) contain the NUL-terminated needle? */
static int contains(const char *buf, size_t len, const char *needle)
{
	size_t n = strlen(needle);

	for (size_t i = 0; i + n <= len; i++)
		if (!memcmp(buf + i, needle, n))
			return 1;
	return 0;
}

static void print_info_lines(const char *buf, size_t len)
{
	size_t i = 0;

	while (i < len && buf[i]) {
		size_t j = i;
		while (j < len && buf[j] && buf[j] != '\n')
			j++;
		if (j > i) {
			kprintf("info: ");
			for (size_t k = i; k < j; k++)
				kprintf("%c", buf[k]);
			kprintf("\n");
		}
		i = j < len && buf[j] == '\n' ? j + 1 : j;
	}
}

static void test_guest_info(void)
{
	static char buf[257];
	uint32_t rc;

	memset(buf, 0, sizeof(buf));
	rc = hcall(HC_GUEST_INFO, (uint32_t)(uintptr_t)buf, 256, 0, 0, 0);
	int ok = (int32_t)rc > 0 && rc <= 256;
	size_t len = ok ? rc : 0;
	if (ok)
		print_info_lines(buf, len);
	check(ok && contains(buf, len, "vmm=palacios-rs"), "guest info",
	      "eax 0x%x, want 1..256 bytes with vmm=palacios-rs", rc);

	rc = hcall(HC_GUEST_INFO, 0xfffff000u, 64, 0, 0, 0);
	check(rc == HC_EFAULT, "guest info bad pointer",
	      "eax 0x%x, want -14 (0x%x)", rc, HC_EFAULT);
	rc = hcall(HC_GUEST_INFO, (uint32_t)(uintptr_t)buf, 0x7fffffffu, 0, 0, 0);
	check(rc == HC_EINVAL, "guest info huge length",
	      "eax 0x%x, want -22 (0x%x)", rc, HC_EINVAL);
}

static void test_os_debug(void)
{
	static const char msg[] = "hello from symtest";
	uint32_t rc;

	rc = hcall(HC_OS_DEBUG, (uint32_t)(uintptr_t)msg, sizeof(msg) - 1, 0, 0, 0);
	check(rc == 0, "os debug", "eax 0x%x, want 0", rc);
	rc = hcall(HC_OS_DEBUG, (uint32_t)(uintptr_t)msg, 100000, 0, 0, 0);
	check(rc == HC_EINVAL, "os debug long", "eax 0x%x, want -22 (0x%x)", rc,
	      HC_EINVAL);
	rc = hcall(HC_OS_DEBUG, 0xfffffff0u, 32, 0, 0, 0);
	check(rc == HC_EFAULT, "os debug bad pointer",
	      "eax 0x%x, want -14 (0x%x)", rc, HC_EFAULT);
}

static void test_time(void)
{
	struct hregs r = { HC_TIME_CPUFREQ, 0, 0, 0, 0, 0 };

	hcall_full(VIA_DOORBELL, &r);
	check(r.eax == r.ecx && r.eax == tsc_khz && r.eax != 0, "time cpufreq",
	      "eax %u ecx %u, want both = cpuid tsc_khz %u (nonzero)", r.eax,
	      r.ecx, tsc_khz);

	struct hregs t1 = { HC_TIME_RDHTSC, 0, 0, 0, 0, 0 };
	struct hregs t2 = t1;
	hcall_full(VIA_DOORBELL, &t1);
	hcall_full(VIA_DOORBELL, &t2);
	uint64_t v1 = ((uint64_t)t1.edx << 32) | t1.eax;
	uint64_t v2 = ((uint64_t)t2.edx << 32) | t2.eax;
	check(v2 > v1, "time rdhtsc", "first 0x%llx second 0x%llx",
	      (unsigned long long)v1, (unsigned long long)v2);
}

void run_hcall_tests(void)
{
	test_sum(VIA_DOORBELL);
	if (have_vmcall) {
		test_sum(VIA_VMCALL);
		test_sum(VIA_VMMCALL);
	} else {
		n_skipped++;
		kprintf("SKIP vmcall (backend keeps VMCALL)\n");
	}

	uint32_t rc = hcall(0x7777, 0, 0, 0, 0, 0);
	check(rc == HC_EUNKNOWN, "unknown id", "eax 0x%x, want 0xffffffff", rc);

	test_guest_info();
	test_os_debug();
	test_time();

	rc = hcall(HC_SYMCALL_RET, 0, 0, 0, 0, 0);
	check(rc == HC_EBUSY, "symcall ret outside a symcall",
	      "eax 0x%x, want -16 (0x%x)", rc, HC_EBUSY);

	kprintf("symtest: %u passed, %u failed\n", n_passed, n_failed);
	debug_exit(n_failed ? 2 : 1);
}
