//! The interface every CPU backend implements, and the exits they all report.

use palacios_x86::{CpuState, Regs, SRegs};

use crate::memory::GuestMem;

/// Up to 8 bytes of port or MMIO data, inline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoData {
    len: u8,
    bytes: [u8; 8],
}

impl IoData {
    /// At most 8 bytes are kept.
    pub fn new(data: &[u8]) -> Self {
        let len = data.len().min(8);
        let mut bytes = [0; 8];
        bytes[..len].copy_from_slice(&data[..len]);
        IoData {
            len: len as u8,
            bytes,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        // `len` can come from a checkpoint or a migration stream: never trust it.
        &self.bytes[..(self.len as usize).min(8)]
    }
}

/// I/O answers an exited instruction has not consumed yet (see [`Vcpu::set_aside_pending`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingIo {
    pub io: Option<IoData>,
    pub mmio: Vec<(u64, IoData)>,
}

/// Why a vCPU stopped running guest code. Every backend reports these same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Exit {
    /// `in`: the core answers with [`Vcpu::complete_read`] before the next run.
    IoIn {
        port: u16,
        size: u8,
    },
    IoOut {
        port: u16,
        data: IoData,
    },
    /// A read of unbacked physical memory; answered with [`Vcpu::complete_read`].
    MmioRead {
        addr: u64,
        size: u8,
    },
    MmioWrite {
        addr: u64,
        data: IoData,
    },
    /// The guest executed HLT.
    Hlt,
    /// The guest can now take an interrupt (after [`Vcpu::request_interrupt_window`]).
    IrqWindowOpen,
    /// RDMSR of an MSR the VMM traps; answered with [`Vcpu::complete_msr_read`].
    MsrRead {
        index: u32,
    },
    /// WRMSR of an MSR the VMM traps; answered with [`Vcpu::complete_msr_write`].
    MsrWrite {
        index: u32,
        value: u64,
    },
    /// Triple fault or other shutdown condition.
    Shutdown,
    /// The run was interrupted from the outside (a kick); nothing to do for the guest.
    Interrupted,
    /// VMCALL or VMMCALL (the emulator): RIP is past the instruction, the registers hold the
    /// call ([`crate::hypercall`]).
    Hypercall,
    /// A guest event the VMM asked to stop at ([`Vcpu::set_intercepts`]).
    Intercept(crate::intercept::Intercepted),
}

/// The kinds of [`Exit`], for telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    IrqWindowOpen,
    MsrRead,
    MsrWrite,
    Shutdown,
    Interrupted,
    Hypercall,
    Intercept,
}

impl ExitKind {
    pub const ALL: [ExitKind; 12] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::IrqWindowOpen,
        ExitKind::MsrRead,
        ExitKind::MsrWrite,
        ExitKind::Shutdown,
        ExitKind::Interrupted,
        ExitKind::Hypercall,
        ExitKind::Intercept,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::IrqWindowOpen => "irq-window",
            ExitKind::MsrRead => "msr-read",
            ExitKind::MsrWrite => "msr-write",
            ExitKind::Shutdown => "shutdown",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Hypercall => "hypercall",
            ExitKind::Intercept => "intercept",
        }
    }
}

impl Exit {
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::IoIn { .. } => ExitKind::IoIn,
            Exit::IoOut { .. } => ExitKind::IoOut,
            Exit::MmioRead { .. } => ExitKind::MmioRead,
            Exit::MmioWrite { .. } => ExitKind::MmioWrite,
            Exit::Hlt => ExitKind::Hlt,
            Exit::IrqWindowOpen => ExitKind::IrqWindowOpen,
            Exit::MsrRead { .. } => ExitKind::MsrRead,
            Exit::MsrWrite { .. } => ExitKind::MsrWrite,
            Exit::Shutdown => ExitKind::Shutdown,
            Exit::Interrupted => ExitKind::Interrupted,
            Exit::Hypercall => ExitKind::Hypercall,
            Exit::Intercept(_) => ExitKind::Intercept,
        }
    }
}

/// Errors of a backend. Guest-caused failures name the vCPU and its RIP.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend '{name}' is not usable here: {reason} (available backends: {available})")]
    Unavailable {
        name: &'static str,
        reason: String,
        available: String,
    },
    #[error("{op} failed: {source}")]
    Host {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("vCPU {vcpu}: internal error (suberror {suberror}) at RIP {rip:#x}")]
    InternalError { vcpu: u32, rip: u64, suberror: u32 },
    #[error("vCPU {vcpu}: VM entry failed (hardware reason {reason:#x}) at RIP {rip:#x}")]
    FailEntry { vcpu: u32, rip: u64, reason: u64 },
    #[error("vCPU {vcpu}: unhandled exit '{what}' at RIP {rip:#x}")]
    Unhandled { vcpu: u32, rip: u64, what: String },
}

/// Floating-point and SSE state (the FXSAVE layout's contents).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// What a core is doing, as the exit loop sees it (saved with the core's state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CoreMode {
    /// Waiting for a start state (an application processor before INIT/SIPI).
    #[default]
    WaitStart,
    /// Running guest code.
    Running,
    /// In HLT with interrupts enabled: runs again when an interrupt is pending.
    Halted,
    /// In HLT with interrupts disabled: done for good.
    Off,
}

/// Interrupt-related state that is not in the registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuEvents {
    /// Interrupts are blocked for one instruction (after STI, MOV SS, POP SS).
    pub interrupt_shadow: bool,
    /// An NMI handler runs (NMIs blocked until IRET).
    pub nmi_blocked: bool,
    /// An NMI is waiting to be delivered.
    pub nmi_pending: bool,
    /// The VMM asked for an interrupt-window exit.
    pub irq_window: bool,
}

/// Debug registers DR0-DR3, DR6, DR7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DebugRegs {
    pub dr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// The complete architectural state of one core, in a form both backends read and write
/// (checkpoints, moves between backends). What a backend has beyond it goes in `backend`,
/// keyed by the backend's name; another backend ignores it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub regs: Regs,
    pub sregs: SRegs,
    pub fpu: FpuState,
    /// XCR0 (1: x87 only, when the backend has no XSAVE).
    pub xcr0: u64,
    pub debug: DebugRegs,
    pub events: VcpuEvents,
    /// Every MSR the backend reports, sorted by index (the TSC included).
    pub msrs: Vec<(u32, u64)>,
    /// Filled in by the exit loop.
    pub mode: CoreMode,
    /// A start state given (INIT/SIPI) that the waiting core has not taken yet.
    #[serde(default)]
    pub pending_start: Option<palacios_x86::CpuState>,
    /// Backend-specific extras: (backend name, value).
    pub backend: Option<(String, serde_json::Value)>,
}

/// MSRs that every backend saves and restores (architectural ones an OS writes).
pub const SAVED_MSRS: &[u32] = &[
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // variable MTRRs
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,       // fixed MTRRs
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x3a,        // IA32_FEATURE_CONTROL
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x2ff,       // MTRR default type
    0x6e0,       // TSC deadline
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS base
    0xc000_0101, // GS base
    0xc000_0102, // kernel GS base
    0xc000_0103, // TSC_AUX
];

/// CPUID feature names a config may hide (`<cpu hide="...">`).
pub const CPU_FEATURES: &[&str] = &[
    "fpu",
    "pse",
    "tsc",
    "msr",
    "pae",
    "cx8",
    "apic",
    "sep",
    "mtrr",
    "pge",
    "cmov",
    "pat",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "cx16",
    "x2apic",
    "movbe",
    "popcnt",
    "tsc_deadline",
    "hypervisor",
    "syscall",
    "nx",
    "rdtscp",
    "lm",
    "lahf_lm",
];

/// Interrupt controllers emulated inside the backend (KVM's in-kernel irqchip and PIT).
pub trait KernelIrqchip: Send + Sync {
    /// Set the level of GSI `gsi` (ISA IRQs 0-15 reach both the PIC and the IOAPIC).
    fn set_irq(&self, gsi: u32, level: bool);
    /// Deliver an MSI message through the in-kernel LAPICs. Returns false where the backend
    /// cannot (the message is then dropped).
    fn signal_msi(&self, _msg: crate::irq::MsiMessage) -> bool {
        false
    }
    /// The state of the PICs, IOAPIC and PIT (VM paused).
    fn save(&self) -> Result<serde_json::Value, BackendError>;
    /// Replace it (before the VM runs).
    fn restore(&self, state: &serde_json::Value) -> Result<(), BackendError>;
}

/// Guest writes the backend turns into eventfd signals without leaving the kernel (KVM's
/// ioeventfd): virtio notifications.
pub trait IoEvents: Send + Sync {
    /// Signal `fd` on any write of `len` bytes (0: any length) to `addr` (a port when `pio`).
    fn register(
        &self,
        addr: u64,
        pio: bool,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> std::io::Result<()>;
    fn unregister(
        &self,
        addr: u64,
        pio: bool,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> std::io::Result<()>;
}

/// A virtualization backend: creates the VM-wide state and its vCPUs.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Make guest RAM visible to the guest (called once, before vCPUs are created).
    fn map_memory(&self, mem: &GuestMem) -> Result<(), BackendError>;
    /// The TSC frequency guests see, if the backend knows it.
    fn tsc_hz(&self) -> Option<u64> {
        None
    }
    /// Create the backend's own interrupt controllers and PIT (before any vCPU).
    /// The backend's ioeventfd support, if it has one (the emulator delivers every access to
    /// the device, which signals the same eventfd itself).
    fn io_events(&self) -> Option<std::sync::Arc<dyn IoEvents>> {
        None
    }
    fn create_kernel_irqchip(&self) -> Result<std::sync::Arc<dyn KernelIrqchip>, BackendError> {
        Err(BackendError::Unhandled {
            vcpu: 0,
            rip: 0,
            what: format!("backend '{}' has no in-kernel irqchip", self.name()),
        })
    }
    /// Make RDMSR/WRMSR of these inclusive ranges exit to the VMM ([`Exit::MsrRead`]/[`Exit::MsrWrite`]).
    fn trap_msrs(&self, ranges: &[(u32, u32)]) -> Result<(), BackendError> {
        if ranges.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Unhandled {
                vcpu: 0,
                rip: 0,
                what: format!("backend '{}' cannot trap MSRs", self.name()),
            })
        }
    }
    /// Leave these CPUID features (names from [`CPU_FEATURES`]) out of the CPU model, before
    /// any vCPU is created.
    fn hide_cpu_features(&self, names: &[String]) -> Result<(), BackendError> {
        if names.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Unhandled {
                vcpu: 0,
                rip: 0,
                what: format!(
                    "backend '{}' has a fixed CPU model (<cpu hide> needs the emulator)",
                    self.name()
                ),
            })
        }
    }
    /// Start tracking writes to guest memory into `log` (`None`: stop). The backend marks
    /// what its cores write; devices' and the VMM's writes are marked by the core.
    fn set_dirty_log(
        &self,
        log: Option<std::sync::Arc<crate::dirty::DirtyLog>>,
    ) -> Result<(), BackendError>;
    /// Called right after the log was taken: merge what the backend tracked itself (KVM's
    /// log) into `log`, and re-arm tracking so the next write to any page is seen. The
    /// cores complete it with [`Vcpu::sync_dirty`] before the pages are read.
    fn collect_dirty(&self, log: &crate::dirty::DirtyLog) -> Result<(), BackendError>;
    /// Keep only these feature bits (see [`PORTABLE_FEATURES`]) in the CPU model, before any
    /// vCPU is created.
    fn restrict_cpu_features(&self, keep: &[(u32, u32, [u32; 4])]) -> Result<(), BackendError>;
    /// Switch to deterministic time (before any vCPU is created): guest time then comes from
    /// each vCPU's [`Vcpu::virtual_ns`]. False if the backend cannot.
    fn enable_virtual_time(&self) -> bool {
        false
    }
    /// Add or replace these CPUID leaves, (leaf, subleaf, [eax, ebx, ecx, edx]), before any
    /// vCPU is created (the hypervisor range 0x40000000-0x4fffffff included).
    fn set_cpuid_leaves(&self, leaves: &[(u32, u32, [u32; 4])]) -> Result<(), BackendError>;
    /// VMCALL/VMMCALL reach the VMM as [`Exit::Hypercall`] (KVM keeps them for itself).
    fn traps_vmcall(&self) -> bool {
        false
    }
    /// Run the guest TSC at `tsc_hz` (`None`: the backend's own) and guest time at
    /// 1/`dilation` of host time, before any vCPU is created. An error if the backend cannot.
    fn set_time_scale(&self, tsc_hz: Option<u64>, dilation: u32) -> Result<(), BackendError> {
        if tsc_hz.is_none() && dilation == 1 {
            return Ok(());
        }
        Err(BackendError::Unhandled {
            vcpu: 0,
            rip: 0,
            what: format!(
                "backend '{}' cannot set the TSC frequency or dilate time",
                self.name()
            ),
        })
    }
    /// Create vCPU number `index` (its APIC ID is `index`).
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, BackendError>;
    /// The CPUID model guests see, as feature leaves: (leaf, subleaf, [eax, ebx, ecx, edx])
    /// of leaves 1, 7.0 and 0x80000001 (what a checkpoint records and compares).
    fn cpuid_features(&self) -> Vec<(u32, u32, [u32; 4])>;
}

/// The CPU model both backends can present (`<cpu model="portable"/>`, `--cpu portable`),
/// so that a checkpoint moves between them: the emulator's features without MOVBE, POPCNT
/// and RDTSCP, which KVM on this project's hosts does not report. (leaf, subleaf, registers)
/// of the feature bits kept.
pub const PORTABLE_FEATURES: &[(u32, u32, [u32; 4])] = &[
    (
        1,
        0,
        [
            0,
            0,
            (1 << 13) | (1 << 21) | (1 << 24) | (1 << 31), // cx16 x2apic tsc_deadline hypervisor
            // fpu pse tsc msr pae cx8 apic sep mtrr pge cmov pat clflush mmx fxsr sse sse2
            (1 << 0)
                | (1 << 3)
                | (1 << 4)
                | (1 << 5)
                | (1 << 6)
                | (1 << 8)
                | (1 << 9)
                | (1 << 11)
                | (1 << 12)
                | (1 << 13)
                | (1 << 15)
                | (1 << 16)
                | (1 << 19)
                | (1 << 23)
                | (1 << 24)
                | (1 << 25)
                | (1 << 26),
        ],
    ),
    (7, 0, [0, 0, 0, 0]),
    (0x8000_0001, 0, [0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)]), // lahf_lm; syscall nx lm
];

/// The feature leaves a checkpoint records, and which registers hold feature bits.
pub const FEATURE_LEAVES: &[(u32, u32, &[usize])] = &[
    (1, 0, &[2, 3]),
    (7, 0, &[1, 2, 3]),
    (0x8000_0001, 0, &[2, 3]),
];

/// Features of `saved` that `target` lacks, as "leaf.reg bit N" strings (empty: compatible).
pub fn missing_features(
    saved: &[(u32, u32, [u32; 4])],
    target: &[(u32, u32, [u32; 4])],
) -> Vec<String> {
    const REG: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    let mut out = Vec::new();
    for &(leaf, sub, regs) in FEATURE_LEAVES {
        let Some((_, _, s)) = saved.iter().find(|e| e.0 == leaf && e.1 == sub) else {
            continue;
        };
        let t = target
            .iter()
            .find(|e| e.0 == leaf && e.1 == sub)
            .map(|e| e.2)
            .unwrap_or([0; 4]);
        for &r in regs {
            // Leaf 1 ECX bits that follow the OS rather than describe a feature.
            let ignore = if leaf == 1 && r == 2 { 1 << 27 } else { 0 }; // OSXSAVE follows CR4
            let missing = s[r] & !t[r] & !ignore;
            for bit in 0..32 {
                if missing & (1 << bit) != 0 {
                    out.push(format!("CPUID {leaf:#x}.{} bit {bit}", REG[r]));
                }
            }
        }
    }
    out
}

/// One virtual core. Lives on its own thread.
pub trait Vcpu: Send {
    /// An exception is waiting to be delivered at the next entry (KVM queues the
    /// single-step #DB of a HLT executed with TF set); a HLT then does not halt.
    fn exception_pending(&self) -> bool {
        false
    }
    fn index(&self) -> u32;
    /// Run guest code until the next exit.
    fn run(&mut self) -> Result<Exit, BackendError>;
    /// Provide the data of the last `IoIn` / `MmioRead` exit.
    fn complete_read(&mut self, data: &[u8]);

    fn regs(&self) -> Result<Regs, BackendError>;
    fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError>;
    fn sregs(&self) -> Result<SRegs, BackendError>;
    fn set_sregs(&mut self, sregs: &SRegs) -> Result<(), BackendError>;
    fn fpu(&self) -> Result<FpuState, BackendError>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<(), BackendError>;
    /// Read the given MSRs; unknown ones are left out of the result.
    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, BackendError>;
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<(), BackendError>;

    /// Whether an external interrupt can be injected right now (IF=1, no interrupt shadow,
    /// nothing else pending injection).
    fn can_inject(&mut self) -> bool;
    /// Inject external interrupt `vector`; call only when [`Vcpu::can_inject`] is true.
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError>;
    /// Ask for an [`Exit::IrqWindowOpen`] as soon as the guest can take an interrupt.
    fn request_interrupt_window(&mut self, on: bool);
    /// Inject a non-maskable interrupt.
    fn inject_nmi(&mut self) -> Result<(), BackendError>;
    /// Answer the last [`Exit::MsrRead`]; `None` raises #GP in the guest.
    fn complete_msr_read(&mut self, value: Option<u64>);
    /// Answer the last [`Exit::MsrWrite`]; `false` raises #GP in the guest.
    fn complete_msr_write(&mut self, ok: bool);

    /// The complete state of the core (called on the core's thread, between exits).
    /// The default covers what the basic accessors give; backends add the rest.
    fn save_state(&mut self) -> Result<VcpuState, BackendError> {
        Ok(VcpuState {
            regs: self.regs()?,
            sregs: self.sregs()?,
            fpu: self.fpu()?,
            xcr0: 1,
            debug: DebugRegs::default(),
            events: VcpuEvents::default(),
            msrs: self.msrs(SAVED_MSRS)?,
            mode: CoreMode::Running,
            pending_start: None,
            backend: None,
        })
    }

    /// Replace the core's complete state with one from [`Vcpu::save_state`] (of this backend
    /// or another).
    fn restore_state(&mut self, s: &VcpuState) -> Result<(), BackendError> {
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        self.set_fpu(&s.fpu)?;
        self.set_msrs(&s.msrs)?;
        Ok(())
    }

    /// Dirty tracking: drop every write permission granted before the last
    /// [`Backend::collect_dirty`] (the emulator's TLB); nothing for hardware backends.
    fn sync_dirty(&mut self) {}

    /// Load the whole architectural state a loader prepared.
    fn set_state(&mut self, state: &CpuState) -> Result<(), BackendError> {
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        if !state.msrs.is_empty() {
            self.set_msrs(&state.msrs)?;
        }
        Ok(())
    }

    /// A flag that makes [`Vcpu::run`] return [`Exit::Interrupted`] soon after it is set, for
    /// backends that a signal alone does not interrupt (the emulator).
    fn kick_flag(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        None
    }

    /// Deterministic time: this core's guest time in ns (None when time follows the host).
    fn virtual_ns(&self) -> Option<u64> {
        None
    }
    /// Deterministic time: return [`Exit::Interrupted`] once guest time reaches `ns`.
    fn set_virtual_deadline(&mut self, _ns: u64) {}
    /// Deterministic time: an idle (halted) core skips ahead to `ns`.
    fn skip_to(&mut self, _ns: u64) {}

    /// Backend-specific counters for telemetry (name, value).
    fn stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// Before the VMM replaces the core's registers (a SymCall, a hypercall's results): finish
    /// or set aside what the last exit's instruction still has to do with an I/O answer. KVM
    /// completes the instruction; the emulator (which runs it again to pick the answer up)
    /// hands the answer over, to be given back with [`Vcpu::restore_pending`].
    fn set_aside_pending(&mut self) -> Result<PendingIo, BackendError> {
        Ok(PendingIo::default())
    }
    /// Give back what [`Vcpu::set_aside_pending`] returned, once the registers are back.
    fn restore_pending(&mut self, _p: PendingIo) {}
    /// The privilege level and whether the core is in 64-bit mode (for hypercalls; backends
    /// that know them without building [`SRegs`] say so).
    fn cpl_and_64bit(&self) -> Result<(u8, bool), BackendError> {
        let s = self.sregs()?;
        Ok((s.ss.dpl, s.efer & (1 << 10) != 0 && s.cs.l))
    }
    /// Stop at these guest events ([`crate::intercept`]); replaces what was set before.
    /// Backends that cannot say so (KVM: system calls and user-mode entries do not exit).
    fn set_intercepts(&mut self, i: &crate::intercept::Intercepts) -> Result<(), BackendError> {
        if i.is_empty() {
            return Ok(());
        }
        Err(BackendError::Unhandled {
            vcpu: self.index(),
            rip: 0,
            what: "this backend cannot stop at system calls or user-mode entries (GEARS \
                   services need the emulator backend)"
                .into(),
        })
    }
    /// After an [`Exit::Intercept`] of a system call: execute it when the core resumes.
    fn intercept_pass(&mut self) {}
    /// Raise exception `vector` in the guest now, as if the current instruction had (CR2 set
    /// for a page fault). For services that need the guest kernel to do something first,
    /// such as fault in a page of a process.
    fn inject_exception(
        &mut self,
        _vector: u8,
        _code: Option<u32>,
        _cr2: u64,
    ) -> Result<(), BackendError> {
        Err(BackendError::Unhandled {
            vcpu: self.index(),
            rip: 0,
            what: "this backend cannot inject exceptions".into(),
        })
    }
    /// The VMM changed the guest's page tables: drop cached translations.
    fn flush_tlb(&mut self) {}
    /// RIP for messages; 0 if it cannot be read.
    fn rip(&self) -> u64 {
        self.regs().map(|r| r.rip).unwrap_or(0)
    }
}
