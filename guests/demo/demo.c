/*
 * demo.elf: the guest "v3 run" boots by default. A multiboot kernel that
 * shows what the VMM handed it (memory, command line, modules, CPU), counts
 * down and halts (VMM exit status 0).
 */
#include "io.h"
#include "kstd.h"
#include "multiboot.h"

static const char logo[] =
	"  ____       _            _\n"
	" |  _ \\ __ _| | __ _  ___(_) ___  ___      _ __ ___\n"
	" | |_) / _` | |/ _` |/ __| |/ _ \\/ __|____| '__/ __|\n"
	" |  __/ (_| | | (_| | (__| | (_) \\__ \\____| |  \\__ \\\n"
	" |_|   \\__,_|_|\\__,_|\\___|_|\\___/|___/    |_|  |___/\n";

static void show_memory(const struct mb_info *mbi)
{
	if (mbi->flags & MB_INFO_MEM)
		kprintf("memory:   lower %u KiB, upper %u KiB\n", mbi->mem_lower,
			mbi->mem_upper);
	else
		kprintf("memory:   (no mem_lower/mem_upper)\n");

	if (!(mbi->flags & MB_INFO_MMAP)) {
		kprintf("memory map: (none)\n");
		return;
	}
	uint64_t usable = 0;
	kprintf("memory map:\n");
	mb_mmap_foreach(mbi, e) {
		kprintf("  %016llx  %016llx  type %u%s\n",
			(unsigned long long)e->addr, (unsigned long long)e->len,
			e->type, e->type == MB_MMAP_RAM ? " (usable)" : "");
		if (e->type == MB_MMAP_RAM)
			usable += e->len;
	}
	kprintf("usable RAM: %u MiB\n", (unsigned)(usable >> 20));
}

static void show_modules(const struct mb_info *mbi)
{
	if (!(mbi->flags & MB_INFO_MODS) || mbi->mods_count == 0) {
		kprintf("modules:  none\n");
		return;
	}
	const struct mb_module *mod = mb_ptr(mbi->mods_addr);
	kprintf("modules:  %u\n", mbi->mods_count);
	for (uint32_t i = 0; i < mbi->mods_count; i++, mod++)
		kprintf("  [%u] '%s' %u bytes at 0x%x\n", i,
			mod->string ? (const char *)mb_ptr(mod->string) : "",
			mod->mod_end - mod->mod_start, mod->mod_start);
}

static void show_cpu(void)
{
	uint32_t max, v[3];
	char vendor[13];

	cpuid(0, &max, &v[0], &v[2], &v[1]); /* vendor is EBX, EDX, ECX */
	memcpy(vendor, v, 12);
	vendor[12] = '\0';
	kprintf("cpu:      '%s', max cpuid leaf 0x%x\n", vendor, max);
}

void kmain(uint32_t magic, uint32_t info, uint32_t eflags)
{
	const struct mb_info *mbi = mb_ptr(info);

	(void)eflags;
	uart_init(COM1);
	kprintf("\n%s", logo);
	kprintf("  a Palacios-style VMM in Rust: hello from the demo guest\n\n");

	if (magic != MB_BOOTLOADER_MAGIC || !info) {
		kprintf("not booted by a multiboot loader (eax=0x%08x ebx=0x%08x)\n",
			magic, info);
	} else {
		kprintf("multiboot: ok (eax=0x%08x, info at 0x%x, flags 0x%x)\n",
			magic, info, mbi->flags);
		show_memory(mbi);
		kprintf("cmdline:  '%s'\n", mb_cmdline(mbi));
		show_modules(mbi);
	}
	show_cpu();

	kprintf("\nshutting down in ");
	for (int n = 3; n > 0; n--) {
		kprintf("%d... ", n);
		busy_loop(300000);
	}
	kprintf("\nGoodbye.\n");
	halt_forever();
}
