/* virtio: shared declarations (see main.c for the overview). */
#ifndef VIRTIO_GUEST_H
#define VIRTIO_GUEST_H

#include <stdint.h>

#include "io.h"
#include "kstd.h"
#include "tsc.h"

/* Must match cpu.S. */
#define SEL_CODE 0x08
#define SEL_DATA 0x10

/* --- interrupt vectors --------------------------------------------------- */
#define VEC_PIC_MASTER  0x20
#define VEC_PIC_SLAVE   0x28
#define VEC_TIMER       0x30 /* LAPIC periodic timer: wakes hlt waits */
#define VEC_BLK_CONFIG  0x40
#define VEC_BLK_Q0      0x41
#define VEC_BLK_MSI     0x45 /* plain MSI (cmdline msi): every blk interrupt */
#define VEC_NET_CONFIG  0x48
#define VEC_NET_RX      0x49
#define VEC_NET_TX      0x4a
#define VEC_APIC_ERROR  0xfe
#define VEC_SPURIOUS    0xff

/* --- local APIC ----------------------------------------------------------- */
#define LAPIC_ID        0x020
#define LAPIC_VER       0x030
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ESR       0x280
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_PERF  0x340
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TMR_INIT  0x380
#define LAPIC_TMR_CUR   0x390
#define LAPIC_TMR_DIV   0x3e0
#define LVT_MASKED      (1u << 16)
#define LVT_PERIODIC    (1u << 17)

#define IOAPIC_BASE     0xfec00000u
#define PIT_HZ          1193182u

/* --- cpu.S ---------------------------------------------------------------- */
struct frame {
	uint32_t edi, esi, ebp, esp0, ebx, edx, ecx, eax;
	uint32_t vector, err;
	uint32_t eip, cs, eflags;
};

extern const char isr_stubs[], isr_stubs_end[];
void load_gdt(void);

static inline void sti(void) { __asm__ volatile("sti" : : : "memory"); }
static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
/* STI's interrupt shadow covers HLT: no wake-up is lost in between. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" : : : "memory"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
/* A full barrier (stores before loads too). */
static inline void mb(void)
{
	__asm__ volatile("lock; addl $0, (%%esp)" : : : "memory", "cc");
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr"
			 : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
			 : "memory");
}

/* --- MMIO (paging is off: physical addresses are used directly) ------------ */
static inline uint8_t mr8(uint32_t a) { return *(volatile uint8_t *)phys_ptr(a); }
static inline uint16_t mr16(uint32_t a) { return *(volatile uint16_t *)phys_ptr(a); }
static inline uint32_t mr32(uint32_t a) { return *(volatile uint32_t *)phys_ptr(a); }
static inline void mw8(uint32_t a, uint8_t v) { *(volatile uint8_t *)phys_ptr(a) = v; }
static inline void mw16(uint32_t a, uint16_t v) { *(volatile uint16_t *)phys_ptr(a) = v; }
static inline void mw32(uint32_t a, uint32_t v) { *(volatile uint32_t *)phys_ptr(a) = v; }

/* --- hw.c ------------------------------------------------------------------ */
extern volatile uint32_t irq_count[256];
/* Called (IF=0) from the handler of vectors 0x30..0xfe, before the EOI. */
extern void (*irq_hooks[256])(void);
extern uint32_t lapic_base, apic_id;
extern int have_apic, timer_ok;

uint64_t tsc_to_us(uint64_t ticks);

void time_init(void);
void idt_init(void);
void platform_init(void);
/* Start (1) or stop (0) the periodic LAPIC wake-up timer. */
void wake_timer(int on);
uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
void isr_dispatch(struct frame *f);

/* --- pci.c ------------------------------------------------------------------ */
struct pci_bar {
	uint32_t addr, size;
	uint8_t mem, is64;
};

struct pci_fn {
	uint8_t bus, dev, fn;
	uint16_t vendor, device, subsys;
	uint8_t rev;
	int type;                 /* virtio device type: 1 net, 2 blk */
	struct pci_bar bar[6];
};

uint8_t pci_r8(const struct pci_fn *p, uint8_t reg);
uint16_t pci_r16(const struct pci_fn *p, uint8_t reg);
uint32_t pci_r32(const struct pci_fn *p, uint8_t reg);
void pci_w8(const struct pci_fn *p, uint8_t reg, uint8_t v);
void pci_w16(const struct pci_fn *p, uint8_t reg, uint16_t v);
void pci_w32(const struct pci_fn *p, uint8_t reg, uint32_t v);
/* Fills devs[] with the virtio functions on bus 0; returns how many. */
unsigned pci_scan_virtio(struct pci_fn *devs, unsigned max);
/*
 * Size the memory BARs, give addresses to unassigned ones (or to all of
 * them with reassign), and enable memory decode and bus mastering.
 * Returns 0 (and says why) if a BAR cannot be used.
 */
int pci_setup_bars(struct pci_fn *p, int reassign);
/* The offset of the first capability with this id after 'after' (0: from the start), or 0. */
uint8_t pci_find_cap(const struct pci_fn *p, uint8_t id, uint8_t after);

/* --- vq.c ------------------------------------------------------------------- */
/* virtio_pci_common_cfg offsets */
#define CC_DFSELECT   0x00
#define CC_DF         0x04
#define CC_GFSELECT   0x08
#define CC_GF         0x0c
#define CC_MSIX       0x10
#define CC_NUMQ       0x12
#define CC_STATUS     0x14
#define CC_CFGGEN     0x15
#define CC_Q_SELECT   0x16
#define CC_Q_SIZE     0x18
#define CC_Q_MSIX     0x1a
#define CC_Q_ENABLE   0x1c
#define CC_Q_NOFF     0x1e
#define CC_Q_DESCLO   0x20
#define CC_Q_DESCHI   0x24
#define CC_Q_AVAILLO  0x28
#define CC_Q_AVAILHI  0x2c
#define CC_Q_USEDLO   0x30
#define CC_Q_USEDHI   0x34

#define VIRTIO_STATUS_ACK         1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED      128
#define VIRTIO_F_VERSION_1        32
#define VIRTIO_NO_VECTOR          0xffff

#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VQ_MAX 256

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct virtq_avail {
	uint16_t flags, idx;
	uint16_t ring[VQ_MAX];
	uint16_t used_event;
};

struct virtq_used_elem {
	uint32_t id, len;
};

struct virtq_used {
	uint16_t flags, idx;
	struct virtq_used_elem ring[VQ_MAX];
	uint16_t avail_event;
};

struct vdev;

struct vq {
	struct vdev *dev;
	uint16_t index, size;
	uint16_t last_used, free_head, num_free;
	struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint32_t notify;          /* physical address of the notify register */
	uint8_t vec;              /* 0: no interrupt */
	uint32_t irq_seen;        /* irq_count[vec] when last looked at */
	uint16_t covered;         /* used entries below this were signalled */
	uint16_t chain_len[VQ_MAX];
};

struct vdev {
	const char *name;         /* "blk" or "net" */
	struct pci_fn *pci;
	uint32_t common, notify_base, notify_mult, isr, devcfg, devcfg_len;
	uint8_t common_cap;       /* config offset of the COMMON cfg capability */
	uint8_t pcicfg_cap;       /* VIRTIO_PCI_CAP_PCI_CFG (cfg_type 5), or 0 */
	uint8_t msix_cap;
	uint8_t msi_cap;          /* plain MSI capability (id 0x05), or 0 */
	uint16_t msix_entries;
	uint32_t msix_table;
	int use_irq;              /* MSI-X or MSI in use (not poll, not fallen back) */
	int msi_on;               /* plain MSI (not MSI-X): no virtio vectors, ISR read */
	uint64_t features;        /* offered */
	uint64_t accepted;
	uint16_t num_queues;
	struct vq *vqs;
	unsigned nvqs;
};

struct sg {
	uint32_t addr, len;
};

extern int opt_poll, opt_reassign, opt_msi;
extern uint32_t opt_qsize;
/* The end of guest RAM below 4 GiB (multiboot memory info; 0 if unknown). */
extern uint32_t ram_end;

/* Find the caps and map BARs; prints FAIL lines itself. */
int vdev_probe(struct vdev *d, struct pci_fn *p, const char *name);
/*
 * Spec 3.1.1 up to FEATURES_OK: accept 'want' & offered (VERSION_1 must
 * be offered). Returns 0 with a FAIL line on error.
 */
int vdev_negotiate(struct vdev *d, uint64_t want);
/* MSI-X table: entry i -> vectors[i]; returns 0 if not possible. */
int vdev_msix_setup(struct vdev *d, const uint8_t *vectors, unsigned n);
/*
 * Plain MSI (MSI-X disabled): one message, address 0xfee00000 | apic_id
 * << 12, data 'vector'. Returns 0 (with a FAIL line, MSI left disabled)
 * if not possible.
 */
int vdev_msi_setup(struct vdev *d, uint8_t vector);
void vdev_msi_disable(struct vdev *d);
/*
 * Queue i with MSI-X entry msix_entry (or VIRTIO_NO_VECTOR), irq vector
 * vec (with plain MSI, d->msi_on, the entry is NO_VECTOR and vec is the
 * MSI vector).
 */
int vq_setup(struct vdev *d, struct vq *q, uint16_t index, uint16_t msix_entry, uint8_t vec);
int vdev_config_vector(struct vdev *d, uint16_t msix_entry);
void vdev_driver_ok(struct vdev *d);
void vdev_reset(struct vdev *d);
uint8_t vdev_status(struct vdev *d);
/* Device configuration reads (generation-checked for 64-bit). */
uint8_t cfg_r8(struct vdev *d, uint32_t off);
uint16_t cfg_r16(struct vdev *d, uint32_t off);
uint32_t cfg_r32(struct vdev *d, uint32_t off);
uint64_t cfg_r64(struct vdev *d, uint32_t off);

/* Post a chain: n_out device-readable then n_in device-writable. Returns the head or -1. */
int vq_add(struct vq *q, const struct sg *sg, unsigned n_out, unsigned n_in);
void vq_kick(struct vq *q);
/* A completed chain (head, frees its descriptors) or -1. */
int vq_get_used(struct vq *q, uint32_t *len);
/*
 * Wait for a completion on q: with MSI-X or MSI, for the used ring AND
 * the interrupt (sti; hlt), falling back to polling after a missing
 * interrupt (FAIL "no MSI-X interrupt" / "no MSI interrupt" once). Returns 1 when a used
 * entry is there, 0 on timeout.
 */
int vq_wait(struct vq *q, uint32_t timeout_us);
/* Submit and wait for one chain; returns the used length or -1 on timeout. */
int vq_run(struct vq *q, const struct sg *sg, unsigned n_out, unsigned n_in,
	   uint32_t timeout_us);

/* --- main.c ------------------------------------------------------------------ */
void t_pass(const char *name);
void t_fail(const char *name, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void t_skip(const char *name, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void __attribute__((noreturn)) finish(void);
void __attribute__((noreturn)) fatal(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));
int word_present(const char *word);

/* --- blk.c / net.c ----------------------------------------------------------- */
int blk_init(struct vdev *d);
void blk_tests(struct vdev *d);
void blk_bench(struct vdev *d, uint32_t n);
/* test=bad: a misbehaving driver (runs last; leaves the device reset). */
void blk_bad_tests(struct vdev *d);
int net_init(struct vdev *d);
void net_test(struct vdev *d, int echo);

#endif
