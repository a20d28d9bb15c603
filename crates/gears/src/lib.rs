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
