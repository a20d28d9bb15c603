//! Conversions between KVM's register structures and the backend-neutral ones.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use palacios_vmm::backend::FpuState;
use palacios_x86::{DescriptorTable, Regs, SRegs, Segment};

pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags | palacios_x86::rflags::FIXED,
    }
}

fn seg_from(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn dt_from(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dt_to(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub fn sregs_from_kvm(s: &kvm_sregs) -> SRegs {
    SRegs {
        cs: seg_from(&s.cs),
        ds: seg_from(&s.ds),
        es: seg_from(&s.es),
        fs: seg_from(&s.fs),
        gs: seg_from(&s.gs),
        ss: seg_from(&s.ss),
        tr: seg_from(&s.tr),
        ldt: seg_from(&s.ldt),
        gdt: dt_from(&s.gdt),
        idt: dt_from(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Overwrite the architectural fields of `k`, keeping KVM's interrupt bitmap.
pub fn sregs_to_kvm(s: &SRegs, k: &mut kvm_sregs) {
    k.cs = seg_to(&s.cs);
    k.ds = seg_to(&s.ds);
    k.es = seg_to(&s.es);
    k.fs = seg_to(&s.fs);
    k.gs = seg_to(&s.gs);
    k.ss = seg_to(&s.ss);
    k.tr = seg_to(&s.tr);
    k.ldt = seg_to(&s.ldt);
    k.gdt = dt_to(&s.gdt);
    k.idt = dt_to(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

pub fn fpu_from_kvm(f: &kvm_fpu) -> FpuState {
    let mut xmm = [[0u8; 16]; 16];
    xmm.copy_from_slice(&f.xmm);
    FpuState {
        fpr: f.fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm,
        mxcsr: f.mxcsr,
    }
}

pub fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    kvm_fpu {
        fpr: f.fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = Regs {
            rax: 1,
            r15: 2,
            rip: 3,
            rflags: 0x202,
            ..Default::default()
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
        let mut s = SRegs::default();
        s.cs = palacios_x86::segment::flat(8, 0xb, true);
        s.gdt = DescriptorTable {
            base: 0x1000,
            limit: 31,
        };
        s.efer = 0x500;
        let mut k = kvm_sregs::default();
        k.interrupt_bitmap[0] = 7;
        sregs_to_kvm(&s, &mut k);
        assert_eq!(k.interrupt_bitmap[0], 7);
        assert_eq!(sregs_from_kvm(&k), s);
        let f = FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            xmm: [[9; 16]; 16],
            ..Default::default()
        };
        assert_eq!(fpu_from_kvm(&fpu_to_kvm(&f)), f);
    }
}
