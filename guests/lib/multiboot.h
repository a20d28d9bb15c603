/* Multiboot v1 definitions (only what the guests use). */
#ifndef GUEST_MULTIBOOT_H
#define GUEST_MULTIBOOT_H

#include <stdint.h>

#define MB_HEADER_MAGIC     0x1BADB002
#define MB_BOOTLOADER_MAGIC 0x2BADB002

/* mb_info.flags */
#define MB_INFO_MEM     (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MODS    (1u << 3)
#define MB_INFO_MMAP    (1u << 6)

#define MB_MMAP_RAM 1

struct mb_info {
	uint32_t flags;
	uint32_t mem_lower; /* KiB below 1 MiB */
	uint32_t mem_upper; /* KiB above 1 MiB */
	uint32_t boot_device;
	uint32_t cmdline;
	uint32_t mods_count;
	uint32_t mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length;
	uint32_t mmap_addr;
};

struct mb_module {
	uint32_t mod_start;
	uint32_t mod_end;
	uint32_t string;
	uint32_t reserved;
};

/* 'size' does not count itself; the next entry is size + 4 bytes on. */
struct mb_mmap_entry {
	uint32_t size;
	uint64_t addr;
	uint64_t len;
	uint32_t type;
} __attribute__((packed));

/* Multiboot structures hold 32-bit physical addresses. */
static inline void *mb_ptr(uint32_t addr)
{
	return (void *)(uintptr_t)addr;
}

static inline const char *mb_cmdline(const struct mb_info *mbi)
{
	if (!mbi || !(mbi->flags & MB_INFO_CMDLINE) || !mbi->cmdline)
		return "";
	return mb_ptr(mbi->cmdline);
}

#define mb_mmap_foreach(mbi, e)                                              \
	for (struct mb_mmap_entry *e = mb_ptr((mbi)->mmap_addr);             \
	     (uintptr_t)e + sizeof(*e) <=                                     \
		     (uintptr_t)(mbi)->mmap_addr + (mbi)->mmap_length;        \
	     e = (struct mb_mmap_entry *)((uintptr_t)e + e->size + 4))

#endif
