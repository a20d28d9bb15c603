//! GEARS (guest examination and revision services) and guarded modules: VMM services that run
//! in a Linux guest's own context, each an extension under Palacios' name.
//!
//! - `syscall_intercept`: stop chosen system calls of chosen processes (SYSCALL and INT 0x80),
//!   count and log them with their arguments, optionally answer them in the VMM.
//! - `env_inject`: add or replace environment variables of a named program at its execve.
//! - `code_inject`: run a position-independent blob inside a process at its next return to
//!   user mode, collect its return value, and put the process back as it was.
//! - `guard_mods`: give one guest kernel module a privilege (an I/O port range) only between
//!   valid, VMM-checked border crossings (docs/gears.md).
//!
//! The first three need a backend that stops at system calls and user-mode entries (the
//! emulator; [`palacios_vmm::Vcpu::set_intercepts`]) and the guest helper module
//! (guests/gears/gears.c) that reports the kernel's layout. `guard_mods` uses only hypercalls
//! and port exits, so it runs on every backend.

pub mod code;
pub mod env;
pub mod guard;
pub mod hub;
pub mod linux;
pub mod names;
pub mod ret;
pub mod service;
pub mod syscall;
pub mod walk;

pub use hub::Gears;
pub use service::{ApiError, Service, ServiceHandle};

/// Hypercall ids of GEARS and guarded modules (docs/hypercalls.md).
pub mod id {
    /// RBX: guest address of struct gears_linux_info, RCX: its size.
    pub const LINUX_INFO: u32 = 0x3100;
    /// RBX: entry id, RCX: address of the return-address slot, RDX: module tag.
    pub const GUARD_ENTER: u32 = 0x3200;
    /// The same registers as GUARD_ENTER, on the way out.
    pub const GUARD_EXIT: u32 = 0x3201;
}

/// Register the four extension classes.
pub fn register(r: &mut palacios_vmm::Registry) {
    r.register_extension(Box::new(syscall::SyscallInterceptClass));
    r.register_extension(Box::new(env::EnvInjectClass));
    r.register_extension(Box::new(code::CodeInjectClass));
    r.register_extension(Box::new(guard::GuardModsClass));
}

/// Lock a mutex, recovering from a poisoned one (a panicked holder leaves plain data).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod robustness {
    //! What the fuzz target `gears_guest_memory` checks, on a fixed sample run by every test
    //! run: arbitrary guest memory walked as page tables and task lists, arbitrary layout and
    //! manifest bytes, never panic and always end.
    use crate::linux::{Kernel, LinuxInfo};
    use crate::walk;
    use vm_memory::{Bytes, GuestAddress};

    fn next(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn arbitrary_guest_memory_never_panics_or_hangs() {
        let mem = palacios_vmm::test_support::guest_mem(1 << 20);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            // Fill with random words, a quarter of them shaped like present page-table entries
            // pointing into the memory, and some like kernel pointers.
            let mut page = vec![0u8; 64 * 1024];
            for w in page.chunks_mut(8) {
                let r = next(&mut seed);
                let v = match r % 4 {
                    0 => (r & 0xf_f000) | 0x67,
                    1 => 0xffff_8880_0000_0000 | (r & 0xf_fff8),
                    _ => r,
                };
                w.copy_from_slice(&v.to_le_bytes());
            }
            let at = (round % 16) * 64 * 1024;
            mem.write_slice(&page, GuestAddress(at)).unwrap();
            let root = next(&mut seed) & 0xf_f000;
            let va = next(&mut seed);
            let _ = walk::walk(&mem, root, va);
            let mut buf = [0u8; 256];
            let _ = walk::read(&mem, root, va, &mut buf, round % 2 == 0);
            let _ = walk::read_cstr(&mem, root, va, 4096, false);
            let _ = walk::check(&mem, root, va, 1 << 20, true, true);
            let info = LinuxInfo {
                current_task: next(&mut seed) & 0xffff,
                init_task: 0xffff_8880_0000_0000 | (next(&mut seed) & 0xf_fff8),
                page_offset: 0xffff_8880_0000_0000,
                kernel_pgd: root,
                off_pid: 0x10,
                off_tgid: 0x14,
                off_comm: 0x20,
                off_mm: 0x30,
                off_tasks: 0x40,
                off_stack: 0x50,
                off_mm_pgd: 0x8,
                thread_size: 16384,
                off_real_parent: 0x58,
            };
            let k = Kernel {
                mem: &mem,
                info: &info,
            };
            let _ = k.processes();
            let _ = k.current(va);
            let _ = LinuxInfo::parse(&page[..96]);
            let _ = crate::guard::check_manifest(&page[..512]);
        }
    }
}
