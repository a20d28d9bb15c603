//! The KVM backend: guest code runs under Linux KVM through kvm-ioctls; exits are mapped to the
//! core's [`Exit`] values. Interrupts are injected from user space (KVM_INTERRUPT) with
//! interrupt-window exits; the in-kernel irqchip arrives with the platform work.

mod convert;
mod gears;
mod state;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use palacios_vmm::backend::{FpuState, KernelIrqchip, VcpuState};
use palacios_vmm::{Backend, BackendError, Exit, GuestMem, IoData, Vcpu};
use palacios_x86::{Regs, SRegs};

mod irqchip;
use irqchip::{KvmIoEvents, KvmIrqchip, pc_gsi_routing};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Where KVM's real-mode helper structures live (inside the MMIO hole, never RAM).
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

vmm_sys_util::ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

fn host_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BackendError {
    move |e| BackendError::Host {
        op,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// The KVM device: `/dev/kvm`, or `$PALACIOS_KVM_DEVICE` (lets tests and unusual hosts point
/// elsewhere).
pub fn device_path() -> PathBuf {
    std::env::var_os("PALACIOS_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

fn open_kvm() -> Result<Kvm, kvm_ioctls::Error> {
    let path = std::ffi::CString::new(device_path().as_os_str().as_encoded_bytes())
        .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    Kvm::new_with_path(&path)
}

/// Why KVM cannot be used here, or `None` if it can.
pub fn probe() -> Option<String> {
    let path = device_path();
    let dev: &Path = &path;
    if !dev.exists() {
        return Some(format!(
            "{} does not exist (no KVM on this host, or not passed to this container)",
            dev.display()
        ));
    }
    match open_kvm() {
        Err(e) => Some(format!(
            "cannot open {}: {}",
            dev.display(),
            io::Error::from_raw_os_error(e.errno())
        )),
        Ok(k) if k.get_api_version() != 12 => Some(format!(
            "unsupported KVM API version {}",
            k.get_api_version()
        )),
        Ok(_) => None,
    }
}

/// The guest TSC frequency KVM gives vCPUs here, in ticks per ms (None without KVM).
pub fn tsc_khz() -> Option<u64> {
    let kvm = open_kvm().ok()?;
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().map(u64::from)
}

/// Whether this host's KVM honours a write of the guest TSC (some software KVMs accept the
/// write and ignore it; then a pause or restore cannot hide time from the guest's TSC).
pub fn tsc_writable() -> bool {
    let probe = || -> Option<bool> {
        let kvm = open_kvm().ok()?;
        let vm = kvm.create_vm().ok()?;
        let vcpu = vm.create_vcpu(0).ok()?;
        let set = Msrs::from_entries(&[kvm_msr_entry {
            index: palacios_x86::msr::IA32_TSC,
            data: 1000,
            ..Default::default()
        }])
        .ok()?;
        vcpu.set_msrs(&set).ok()?;
        let mut get = Msrs::from_entries(&[kvm_msr_entry {
            index: palacios_x86::msr::IA32_TSC,
            ..Default::default()
        }])
        .ok()?;
        vcpu.get_msrs(&mut get).ok()?;
        Some(get.as_slice()[0].data < 1_000_000_000)
    };
    probe().unwrap_or(false)
}

/// A VM under KVM.
pub struct KvmBackend {
    kvm: Kvm,
    vm: Arc<VmFd>,
    cpuid: std::sync::Mutex<kvm_bindings::CpuId>,
    tsc_khz: Option<u32>,
    /// `<time khz>`: the TSC frequency each vCPU is given (KVM_SET_TSC_KHZ).
    set_khz: std::sync::Mutex<Option<u32>>,
    /// Bitmaps referenced by the installed MSR filter (KVM copies them; kept for clarity).
    msr_bitmaps: std::sync::Mutex<Vec<Vec<u8>>>,
    /// KVM_GET_MSR_INDEX_LIST: every MSR a checkpoint saves.
    msr_list: Arc<Vec<u32>>,
    /// The memory slots (re-registered with dirty logging on and off).
    slots: std::sync::Mutex<Vec<kvm_userspace_memory_region>>,
    kernel_irqchip: std::sync::atomic::AtomicBool,
    /// Guest memory, once mapped (handed to each vCPU).
    mem: std::sync::Mutex<Option<GuestMem>>,
}

impl KvmBackend {
    /// Open /dev/kvm and create a VM. `available` lists the other backends for the message.
    pub fn new(available: &str) -> Result<Self, BackendError> {
        let unavailable = |reason: String| BackendError::Unavailable {
            name: "kvm",
            reason,
            available: available.to_string(),
        };
        if let Some(reason) = probe() {
            return Err(unavailable(reason));
        }
        let kvm = open_kvm()
            .map_err(|e| unavailable(io::Error::from_raw_os_error(e.errno()).to_string()))?;
        let vm = kvm.create_vm().map_err(|e| {
            unavailable(format!(
                "KVM_CREATE_VM failed: {}",
                io::Error::from_raw_os_error(e.errno())
            ))
        })?;
        if let Err(e) = vm.set_tss_address(TSS_ADDR) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e} (ignored)");
        }
        if let Err(e) = vm.set_identity_map_address(IDENTITY_MAP_ADDR) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e} (ignored)");
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(host_err("KVM_GET_SUPPORTED_CPUID"))?;
        // KVM reports the guest TSC frequency per vCPU; ask a throw-away VM so that this VM's
        // vCPU numbers stay free.
        let tsc_khz = kvm
            .create_vm()
            .ok()
            .and_then(|v| v.create_vcpu(0).ok())
            .and_then(|c| c.get_tsc_khz().ok());
        let msr_list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(KvmBackend {
            kvm,
            vm: Arc::new(vm),
            cpuid: std::sync::Mutex::new(cpuid),
            tsc_khz,
            set_khz: std::sync::Mutex::new(None),
            msr_bitmaps: std::sync::Mutex::new(Vec::new()),
            msr_list: Arc::new(msr_list),
            slots: std::sync::Mutex::new(Vec::new()),
            kernel_irqchip: std::sync::atomic::AtomicBool::new(false),
            mem: std::sync::Mutex::new(None),
        })
    }

    /// The KVM system handle (capability checks).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn map_memory(&self, mem: &GuestMem) -> Result<(), BackendError> {
        for (slot, region) in mem.iter().enumerate() {
            let host =
                mem.get_host_address(region.start_addr())
                    .map_err(|e| BackendError::Host {
                        op: "guest memory lookup",
                        source: io::Error::other(e.to_string()),
                    })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps alive for as
            // long as the VM fd exists (the Vm holds both and drops vCPUs and VM before memory).
            unsafe { self.vm.set_user_memory_region(r) }
                .map_err(host_err("KVM_SET_USER_MEMORY_REGION"))?;
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).push(r);
        }
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem.clone());
        Ok(())
    }

    fn set_dirty_log(
        &self,
        log: Option<Arc<palacios_vmm::dirty::DirtyLog>>,
    ) -> Result<(), BackendError> {
        let flags = if log.is_some() {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for r in slots.iter_mut() {
            r.flags = flags;
            // SAFETY: the same live mapping registered by map_memory, only the flags change.
            unsafe { self.vm.set_user_memory_region(*r) }
                .map_err(host_err("KVM_SET_USER_MEMORY_REGION (dirty logging)"))?;
        }
        Ok(())
    }

    fn collect_dirty(&self, log: &palacios_vmm::dirty::DirtyLog) -> Result<(), BackendError> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for (i, r) in slots.iter().enumerate() {
            if r.flags & kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES == 0 {
                continue;
            }
            // KVM_GET_DIRTY_LOG fetches and clears the slot's log and write-protects again.
            let bits = self
                .vm
                .get_dirty_log(r.slot, r.memory_size as usize)
                .map_err(host_err("KVM_GET_DIRTY_LOG"))?;
            log.merge_region(i, &bits);
        }
        Ok(())
    }

    fn tsc_hz(&self) -> Option<u64> {
        let set = *self.set_khz.lock().unwrap_or_else(|p| p.into_inner());
        set.or(self.tsc_khz).map(|k| u64::from(k) * 1000)
    }

    fn set_time_scale(&self, tsc_hz: Option<u64>, dilation: u32) -> Result<(), BackendError> {
        if dilation != 1 {
            return Err(BackendError::Unhandled {
                vcpu: 0,
                rip: 0,
                what: "KVM runs the guest TSC and its own timers at host speed: time dilation \
                       needs the emulator backend"
                    .into(),
            });
        }
        let khz = tsc_hz
            .map(|hz| u32::try_from(hz / 1000).unwrap_or(u32::MAX))
            .filter(|&k| Some(k) != self.tsc_khz);
        if let Some(k) = khz {
            // Ask a throw-away vCPU now, so that a KVM that cannot scale the TSC is a config
            // error before anything is built.
            let probe = self
                .kvm
                .create_vm()
                .and_then(|v| v.create_vcpu(0).and_then(|c| c.set_tsc_khz(k)));
            if let Err(e) = probe {
                return Err(BackendError::Unhandled {
                    vcpu: 0,
                    rip: 0,
                    what: format!(
                        "KVM cannot run the guest TSC at {k} kHz here (KVM_SET_TSC_KHZ: {}); \
                         use the emulator backend or leave khz out",
                        io::Error::from_raw_os_error(e.errno())
                    ),
                });
            }
        }
        *self.set_khz.lock().unwrap_or_else(|p| p.into_inner()) = khz;
        Ok(())
    }

    fn set_cpuid_leaves(&self, leaves: &[(u32, u32, [u32; 4])]) -> Result<(), BackendError> {
        let mut cpuid = self.cpuid.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = cpuid.as_slice().to_vec();
        for &(leaf, sub, [eax, ebx, ecx, edx]) in leaves {
            match entries
                .iter_mut()
                .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            {
                Some(e) => {
                    (e.eax, e.ebx, e.ecx, e.edx) = (eax, ebx, ecx, edx);
                }
                None => entries.push(kvm_bindings::kvm_cpuid_entry2 {
                    function: leaf,
                    index: sub,
                    eax,
                    ebx,
                    ecx,
                    edx,
                    ..Default::default()
                }),
            }
        }
        *cpuid = kvm_bindings::CpuId::from_entries(&entries).map_err(|e| BackendError::Host {
            op: "build the CPUID table",
            source: io::Error::other(format!("{e:?}")),
        })?;
        Ok(())
    }

    fn io_events(&self) -> Option<Arc<dyn palacios_vmm::backend::IoEvents>> {
        Some(Arc::new(KvmIoEvents(self.vm.clone())))
    }

    fn create_kernel_irqchip(&self) -> Result<Arc<dyn KernelIrqchip>, BackendError> {
        self.vm
            .create_irq_chip()
            .map_err(host_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm
            .create_pit2(pit)
            .map_err(host_err("KVM_CREATE_PIT2"))?;
        self.vm
            .set_gsi_routing(&pc_gsi_routing()?)
            .map_err(host_err("KVM_SET_GSI_ROUTING"))?;
        self.kernel_irqchip
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(Arc::new(KvmIrqchip {
            vm: self.vm.clone(),
        }))
    }

    fn trap_msrs(&self, ranges: &[(u32, u32)]) -> Result<(), BackendError> {
        if ranges.is_empty() {
            return Ok(());
        }
        if ranges.len() > kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize {
            return Err(BackendError::Host {
                op: "KVM_X86_SET_MSR_FILTER",
                source: io::Error::other("too many MSR ranges"),
            });
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [
                u64::from(
                    kvm_bindings::KVM_MSR_EXIT_REASON_FILTER
                        | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN
                        | kvm_bindings::KVM_MSR_EXIT_REASON_INVAL,
                ),
                0,
                0,
                0,
            ],
            ..Default::default()
        };
        self.vm
            .enable_cap(&cap)
            .map_err(host_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        let mut bitmaps = self.msr_bitmaps.lock().unwrap_or_else(|p| p.into_inner());
        let mut filter = kvm_bindings::kvm_msr_filter {
            flags: kvm_bindings::KVM_MSR_FILTER_DEFAULT_ALLOW,
            ..Default::default()
        };
        for (i, &(first, last)) in ranges.iter().enumerate() {
            let n = last - first + 1;
            // All bits clear: every access in the range is denied by KVM and exits to us.
            let mut bitmap = vec![0u8; n.div_ceil(8) as usize];
            filter.ranges[i] = kvm_bindings::kvm_msr_filter_range {
                flags: kvm_bindings::KVM_MSR_FILTER_READ | kvm_bindings::KVM_MSR_FILTER_WRITE,
                nmsrs: n,
                base: first,
                bitmap: bitmap.as_mut_ptr(),
            };
            bitmaps.push(bitmap);
        }
        // SAFETY: every range's bitmap points to a live Vec of at least nmsrs bits, held in
        // `self.msr_bitmaps` (KVM copies the bitmaps during the ioctl anyway).
        unsafe { self.vm.set_msr_filter_unchecked(&filter) }
            .map_err(host_err("KVM_X86_SET_MSR_FILTER"))
    }

    fn cpuid_features(&self) -> Vec<(u32, u32, [u32; 4])> {
        palacios_vmm::backend::FEATURE_LEAVES
            .iter()
            .filter_map(|&(leaf, sub, _)| {
                self.cpuid
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_slice()
                    .iter()
                    .find(|e| e.function == leaf && e.index == sub)
                    .map(|e| (leaf, sub, [e.eax, e.ebx, e.ecx, e.edx]))
            })
            .collect()
    }

    fn restrict_cpu_features(&self, keep: &[(u32, u32, [u32; 4])]) -> Result<(), BackendError> {
        let mut cpuid = self.cpuid.lock().unwrap_or_else(|p| p.into_inner());
        for e in cpuid.as_mut_slice() {
            if let Some(&(_, _, m)) = keep.iter().find(|k| k.0 == e.function && k.1 == e.index) {
                // Leaf 1 EAX (signature) and EBX (APIC ID, CLFLUSH size) are not features.
                if e.function != 1 {
                    e.eax &= m[0];
                    e.ebx &= m[1];
                }
                e.ecx &= m[2];
                e.edx &= m[3];
            }
        }
        Ok(())
    }

    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, BackendError> {
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(host_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.cpuid.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(host_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = *self.set_khz.lock().unwrap_or_else(|p| p.into_inner()) {
            fd.set_tsc_khz(khz).map_err(|e| BackendError::Unhandled {
                vcpu: index,
                rip: 0,
                what: format!(
                    "KVM cannot run the guest TSC at {khz} kHz here (KVM_SET_TSC_KHZ: {}); \
                     use the emulator backend or leave <time khz> out",
                    io::Error::from_raw_os_error(e.errno())
                ),
            })?;
        }
        palacios_vmm::host::set_kick_hook(kick_hook);
        // Registers come with every exit and go back with the next entry (no ioctls for a
        // hypercall's or a SymCall's register accesses) where KVM offers it.
        let mut fd = fd;
        let sync = self.kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
        if sync {
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
        }
        Ok(Box::new(KvmVcpu {
            index,
            fd,
            sync,
            sync_fresh: false,
            pending_read: None,
            pending_msr: None,
            needs_completion: false,
            pending_out: false,
            msr_list: self.msr_list.clone(),
            kernel_irqchip: self
                .kernel_irqchip
                .load(std::sync::atomic::Ordering::Acquire),
            kick_registered: false,
            mem: self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            syscall_hook: None,
        }))
    }
}

impl KvmVcpu {
    /// Let KVM finish the instruction of the last user-space exit (KVM_RUN with
    /// `immediate_exit`: KVM completes the pending I/O, then returns EINTR at once).
    fn complete_pending(&mut self) -> Result<(), BackendError> {
        if !self.needs_completion {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|e| format!("{e:?}"));
        self.sync_fresh = self.sync;
        self.fd.set_kvm_immediate_exit(0);
        self.needs_completion = false;
        match r {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(host_err("KVM_RUN (immediate exit)")(e)),
            Ok(other) => Err(self.fail(format!(
                "KVM_RUN with immediate_exit returned an exit ({other:?}) instead of EINTR"
            ))),
        }
    }
}

/// The answer slots of the last MSR exit (inside the vCPU's kvm_run mapping).
enum PendingMsr {
    Read { error: *mut u8, data: *mut u64 },
    Write { error: *mut u8 },
}

/// One KVM vCPU.
pub struct KvmVcpu {
    index: u32,
    fd: VcpuFd,
    /// Where the data of the last IoIn/MmioRead exit goes (inside the vCPU's kvm_run mapping).
    pending_read: Option<(*mut u8, usize)>,
    pending_msr: Option<PendingMsr>,
    /// The last exit was to user space for I/O, MMIO or an MSR: KVM finishes that instruction
    /// on the next KVM_RUN, which must happen before the state is read for a checkpoint.
    needs_completion: bool,
    /// KVM_CAP_SYNC_REGS is on: regs and sregs are in `kvm_run` after every KVM_RUN.
    sync: bool,
    /// `kvm_run`'s copy is current (a KVM_RUN has returned since the vCPU was created).
    sync_fresh: bool,
    /// The last exit was an `out`: KVM's completion only moves RIP past it, and only if RIP
    /// is where the `out` was (its emulator already did so before exiting), so registers may
    /// be replaced without completing it first.
    pending_out: bool,
    /// Every MSR KVM can save for this VM (KVM_GET_MSR_INDEX_LIST).
    msr_list: Arc<Vec<u32>>,
    /// The VM uses KVM's in-kernel irqchip (its LAPIC state is per vCPU).
    kernel_irqchip: bool,
    /// The thread this vCPU last ran on has its `immediate_exit` registered for kicks.
    kick_registered: bool,
    /// Guest memory (GEARS reads the IDT).
    mem: Option<GuestMem>,
    /// System-call breakpoints (GEARS).
    syscall_hook: Option<gears::SyscallHook>,
}

thread_local! {
    /// `immediate_exit` of the vCPU this thread runs (null: none). The kick signal handler
    /// sets it, so that a kick arriving between the exit loop's checks and KVM_RUN makes
    /// KVM_RUN return at once instead of being lost.
    static IMMEDIATE_EXIT: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// The kick hook (runs in the kick signal handler, on the kicked thread).
fn kick_hook() {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's vCPU's `immediate_exit` byte, registered by
            // KvmVcpu::run on this thread and cleared by its Drop (also on this thread) before
            // the kvm_run mapping goes away. A volatile byte store is async-signal-safe.
            unsafe { p.write_volatile(1) };
        }
    });
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        if self.kick_registered {
            let mine = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run as *mut u8;
            let _ = IMMEDIATE_EXIT.try_with(|p| {
                if !p.get().is_null()
                    && p.get() as usize >= mine as usize
                    && (p.get() as usize)
                        < mine as usize + std::mem::size_of::<kvm_bindings::kvm_run>()
                {
                    p.set(std::ptr::null_mut());
                }
            });
        }
    }
}

// SAFETY: the raw pointers point into this vCPU's own kvm_run mapping, which lives as long as
// `fd` and is only touched from the thread that owns the KvmVcpu.
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    fn fail(&self, what: String) -> BackendError {
        BackendError::Unhandled {
            vcpu: self.index,
            rip: self.rip(),
            what,
        }
    }
}

impl KvmVcpu {
    /// One KVM_RUN; a debug exit comes back as (DR6, PC) beside a placeholder exit.
    fn run_once(&mut self) -> Result<(Exit, Option<(u64, u64)>), BackendError> {
        self.pending_read = None;
        self.pending_msr = None;
        self.needs_completion = false;
        if !self.kick_registered {
            let p = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
            IMMEDIATE_EXIT.with(|c| c.set(p));
            self.kick_registered = true;
        }
        let r = self.fd.run();
        self.sync_fresh = self.sync;
        let mut debug = None;
        let exit = match r {
            Ok(VcpuExit::X86Rdmsr(m)) => {
                let index = m.index;
                // Default answer: #GP, unless the VMM completes it.
                *m.error = 1;
                self.pending_msr = Some(PendingMsr::Read {
                    error: m.error as *mut u8,
                    data: m.data as *mut u64,
                });
                Exit::MsrRead { index }
            }
            Ok(VcpuExit::X86Wrmsr(m)) => {
                let (index, value) = (m.index, m.data);
                *m.error = 1;
                self.pending_msr = Some(PendingMsr::Write {
                    error: m.error as *mut u8,
                });
                Exit::MsrWrite { index, value }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pending_read = Some((data.as_mut_ptr(), data.len()));
                Exit::IoIn {
                    port,
                    size: data.len() as u8,
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut {
                port,
                data: IoData::new(data),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.pending_read = Some((data.as_mut_ptr(), data.len()));
                Exit::MmioRead {
                    addr,
                    size: data.len() as u8,
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite {
                addr,
                data: IoData::new(data),
            },
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::IrqWindowOpen) => Exit::IrqWindowOpen,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union field.
                let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Err(BackendError::InternalError {
                    vcpu: self.index,
                    rip: self.rip(),
                    suberror: sub,
                });
            }
            Ok(VcpuExit::Debug(d)) => {
                debug = Some((d.dr6, d.pc));
                Exit::Interrupted
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                return Err(BackendError::FailEntry {
                    vcpu: self.index,
                    rip: self.rip(),
                    reason,
                });
            }
            Ok(other) => {
                let what = format!("{other:?}");
                return Err(self.fail(what));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => return Err(host_err("KVM_RUN")(e)),
        };
        // A kick that set immediate_exit has done its job.
        self.fd.set_kvm_immediate_exit(0);
        self.pending_out = matches!(exit, Exit::IoOut { .. });
        self.needs_completion = matches!(
            exit,
            Exit::IoIn { .. }
                | Exit::IoOut { .. }
                | Exit::MmioRead { .. }
                | Exit::MmioWrite { .. }
                | Exit::MsrRead { .. }
                | Exit::MsrWrite { .. }
        );
        Ok((exit, debug))
    }
}

impl Vcpu for KvmVcpu {
    fn exception_pending(&self) -> bool {
        self.fd
            .get_vcpu_events()
            .is_ok_and(|e| e.exception.injected != 0 || e.exception.pending != 0)
    }

    fn index(&self) -> u32 {
        self.index
    }

    fn run(&mut self) -> Result<Exit, BackendError> {
        self.refresh_breakpoints()?;
        loop {
            let (exit, debug) = self.run_once()?;
            match debug {
                // A system-call breakpoint the filter does not select: straight back in.
                Some((dr6, pc)) => match self.on_debug(dr6, pc)? {
                    Some(e) => return Ok(e),
                    None => continue,
                },
                None => return Ok(exit),
            }
        }
    }

    fn set_intercepts(
        &mut self,
        i: &palacios_vmm::intercept::Intercepts,
    ) -> Result<(), BackendError> {
        self.apply_intercepts(i)
    }

    fn intercept_pass(&mut self) {
        self.pass_breakpoint();
    }

    fn stats(&self) -> Vec<(String, u64)> {
        match &self.syscall_hook {
            Some(h) => vec![("kvm system-call breakpoint exits".to_string(), h.hits)],
            None => Vec::new(),
        }
    }

    fn save_state(&mut self) -> Result<VcpuState, BackendError> {
        self.save_full()
    }

    fn restore_state(&mut self, s: &VcpuState) -> Result<(), BackendError> {
        self.restore_full(s)
    }

    fn complete_read(&mut self, data: &[u8]) {
        if let Some((ptr, len)) = self.pending_read.take() {
            let n = len.min(data.len());
            // SAFETY: `ptr..ptr+len` is the data area of the last exit inside this vCPU's
            // kvm_run mapping; no KVM_RUN has happened since, and `n <= len`.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, n) };
        }
    }

    fn regs(&self) -> Result<Regs, BackendError> {
        if self.sync_fresh {
            return Ok(convert::regs_from_kvm(&self.fd.sync_regs().regs));
        }
        self.fd
            .get_regs()
            .map(|r| convert::regs_from_kvm(&r))
            .map_err(host_err("KVM_GET_REGS"))
    }

    fn set_aside_pending(&mut self) -> Result<palacios_vmm::backend::PendingIo, BackendError> {
        self.complete_pending()?;
        Ok(Default::default())
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError> {
        // The last exit's instruction finishes first, or KVM would finish it on top of these
        // (an `out` need not: see `pending_out`).
        if !self.pending_out {
            self.complete_pending()?;
        }
        if self.sync_fresh {
            // Applied by the next KVM_RUN, before anything else it does.
            self.fd.sync_regs_mut().regs = convert::regs_to_kvm(regs);
            self.fd.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
            return Ok(());
        }
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(host_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SRegs, BackendError> {
        if self.sync_fresh {
            return Ok(convert::sregs_from_kvm(&self.fd.sync_regs().sregs));
        }
        self.fd
            .get_sregs()
            .map(|s| convert::sregs_from_kvm(&s))
            .map_err(host_err("KVM_GET_SREGS"))
    }

    fn set_sregs(&mut self, sregs: &SRegs) -> Result<(), BackendError> {
        self.complete_pending()?;
        if self.sync_fresh {
            let k = &mut self.fd.sync_regs_mut().sregs;
            convert::sregs_to_kvm(sregs, k);
            self.fd
                .set_sync_dirty_reg(kvm_ioctls::SyncReg::SystemRegister);
            return Ok(());
        }
        let mut k = self.fd.get_sregs().map_err(host_err("KVM_GET_SREGS"))?;
        convert::sregs_to_kvm(sregs, &mut k);
        self.fd.set_sregs(&k).map_err(host_err("KVM_SET_SREGS"))
    }

    fn fpu(&self) -> Result<FpuState, BackendError> {
        self.fd
            .get_fpu()
            .map(|f| convert::fpu_from_kvm(&f))
            .map_err(host_err("KVM_GET_FPU"))
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<(), BackendError> {
        self.fd
            .set_fpu(&convert::fpu_to_kvm(fpu))
            .map_err(host_err("KVM_SET_FPU"))
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, BackendError> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| BackendError::Host {
            op: "KVM_GET_MSRS",
            source: io::Error::other(format!("{e:?}")),
        })?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(host_err("KVM_GET_MSRS"))?;
        Ok(msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect())
    }

    fn set_msrs(&mut self, list: &[(u32, u64)]) -> Result<(), BackendError> {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| BackendError::Host {
            op: "KVM_SET_MSRS",
            source: io::Error::other(format!("{e:?}")),
        })?;
        let n = self.fd.set_msrs(&msrs).map_err(host_err("KVM_SET_MSRS"))?;
        if n != list.len() {
            let bad = list[n].0;
            return Err(BackendError::Host {
                op: "KVM_SET_MSRS",
                source: io::Error::other(format!("MSR {bad:#x} refused")),
            });
        }
        Ok(())
    }

    fn can_inject(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        if run.ready_for_interrupt_injection == 0 || run.if_flag == 0 {
            return false;
        }
        // The flags describe the last exit; make sure the guest has not cleared IF since (the
        // software KVM of this project's reference machines has been seen reporting stale
        // flags, and injecting into IF=0 would acknowledge an interrupt the guest cannot take).
        self.fd
            .get_regs()
            .map(|r| r.rflags & palacios_x86::rflags::IF != 0)
            .unwrap_or(false)
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<(), BackendError> {
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads a kvm_interrupt from the pointer, which is valid.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
        if r < 0 {
            return Err(BackendError::Host {
                op: "KVM_INTERRUPT",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }

    fn inject_nmi(&mut self) -> Result<(), BackendError> {
        self.fd.nmi().map_err(host_err("KVM_NMI"))
    }

    fn complete_msr_read(&mut self, value: Option<u64>) {
        if let Some(PendingMsr::Read { error, data }) = self.pending_msr.take() {
            // SAFETY: both pointers are fields of the msr exit in this vCPU's kvm_run mapping;
            // no KVM_RUN has happened since the exit that produced them.
            unsafe {
                *error = u8::from(value.is_none());
                *data = value.unwrap_or(0);
            }
        }
    }

    fn complete_msr_write(&mut self, ok: bool) {
        if let Some(PendingMsr::Write { error }) = self.pending_msr.take() {
            // SAFETY: as in complete_msr_read.
            unsafe { *error = u8::from(!ok) };
        }
    }
}
