//! Answering a system call whose instruction already ran (KVM stops at the kernel's entry):
//! put the result in RAX and return to user mode the way the kernel would, SYSRET for SYSCALL
//! (RIP from RCX, RFLAGS from R11, the user selectors from STAR) or IRET for INT 0x80 (the
//! frame the CPU pushed on the kernel stack).

use palacios_vmm::intercept::SyscallAbi;
use palacios_vmm::{GuestMem, Vcpu};
use palacios_x86::Segment;

use crate::walk;

const MSR_STAR: u32 = 0xc000_0081;
/// RFLAGS bits SYSRET takes from R11 (RF and VM cleared, bit 1 set).
const SYSRET_FLAGS: u64 = 0x3c_7fd7;

fn flat(selector: u16, code: bool, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 3,
        db: !long || !code,
        s: true,
        l: long && code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Return `result` from a system call stopped at the kernel's entry.
pub fn answer_entered(
    vcpu: &mut dyn Vcpu,
    mem: &GuestMem,
    abi: SyscallAbi,
    result: i64,
) -> Result<(), String> {
    let mut regs = vcpu.regs().map_err(|e| e.to_string())?;
    let mut s = vcpu.sregs().map_err(|e| e.to_string())?;
    let star = vcpu
        .msrs(&[MSR_STAR])
        .map_err(|e| e.to_string())?
        .first()
        .map_or(0, |m| m.1);
    let base = ((star >> 48) & 0xfffc) as u16;
    match abi {
        SyscallAbi::Syscall64 => {
            regs.rax = result as u64;
            regs.rip = regs.rcx;
            regs.rflags = (regs.r11 & SYSRET_FLAGS) | 2;
            s.cs = flat((base + 16) | 3, true, true);
            s.ss = flat((base + 8) | 3, false, false);
        }
        SyscallAbi::Int80 => {
            let mut f = [0u8; 40];
            walk::read(mem, s.cr3, regs.rsp, &mut f, false)
                .map_err(|e| format!("the interrupt frame: {e}"))?;
            let q = |i: usize| u64::from_le_bytes(f[i * 8..i * 8 + 8].try_into().unwrap());
            let (rip, cs, rflags, rsp, ss) = (q(0), q(1) as u16, q(2), q(3), q(4) as u16);
            if cs & 3 != 3 {
                return Err("INT 0x80 from kernel mode is not answered".into());
            }
            regs.rax = (regs.rax & !0xffff_ffff) | (result as u64 & 0xffff_ffff);
            regs.rip = rip;
            regs.rflags = rflags | 2;
            regs.rsp = rsp;
            s.cs = flat(cs, true, cs == (base + 16) | 3);
            s.ss = flat(ss, false, false);
        }
    }
    vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    vcpu.set_regs(&regs).map_err(|e| e.to_string())
}
