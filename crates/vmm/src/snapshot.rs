//! Checkpoints of a VM: save a running (paused) VM through a checkpoint store, and restore a
//! freshly built VM from one. The format and the stores are in `palacios-checkpoint`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use palacios_checkpoint::{CheckpointError, CheckpointStore, MemoryLayout, Meta, Opened, Section};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::{KernelIrqchip, VcpuState, missing_features};
use crate::config::VmConfig;
use crate::control::{CoreStateError, VmHandle};
use crate::memory::{GuestMem, MemoryMap};
use crate::state::DeviceState;
use crate::time::GuestClock;
use crate::vm::Vm;

/// Version of the clock and core sections this build writes.
pub const CLOCK_VERSION: u32 = 1;
pub const CORE_VERSION: u32 = 1;
pub const IRQCHIP_VERSION: u32 = 1;

/// What a checkpoint reads from a VM (set by [`Vm::build`] into its handle).
pub struct VmParts {
    pub config: VmConfig,
    pub mem: GuestMem,
    pub clock: Arc<GuestClock>,
    pub devices: Vec<DeviceState>,
    pub without_state: Vec<String>,
    pub irqchip: Option<Arc<dyn KernelIrqchip>>,
    pub backend: &'static str,
    pub cpuid: Vec<(u32, u32, [u32; 4])>,
    /// One save at a time (a second waits for the first).
    pub save_lock: std::sync::Mutex<()>,
    /// Guest memory is mapped from a checkpoint (not anonymous).
    pub mem_from_file: bool,
    /// The backend (dirty tracking).
    pub backend_obj: Arc<dyn crate::backend::Backend>,
    /// The VM's dirty-page log (see [`crate::dirty`]).
    pub dirty: Arc<crate::dirty::DirtyLog>,
}

/// Why a save or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Control(#[from] crate::control::ControlError),
    #[error("{0}")]
    Core(#[from] CoreStateError),
    #[error("{0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("{0}")]
    State(#[from] crate::state::StateError),
    /// The checkpoint does not fit the VM (devices, cores, memory, CPU model).
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Guest time and the TSC anchor.
#[derive(serde::Serialize, serde::Deserialize)]
struct ClockState {
    guest_ns: u64,
    tsc_hz: u64,
    tsc_base: u64,
    deterministic: bool,
}

/// What a save did.
#[derive(Debug)]
pub struct SaveReport {
    /// Time to pause the VM (zero if it was paused already).
    pub pause: Duration,
    /// The whole save, pause included.
    pub total: Duration,
    /// Guest bytes stored (non-zero pages).
    pub stored: u64,
    /// Guest RAM in all.
    pub ram: u64,
}

/// Guest memory of a paused VM, read in place.
pub(crate) struct MemSource<'a> {
    pub(crate) mem: &'a GuestMem,
    /// The memory is anonymous (not mapped from a checkpoint): a page the process never
    /// touched is zero.
    pub(crate) anonymous: bool,
    pub(crate) pagemap: Option<std::fs::File>,
}

impl MemSource<'_> {
    /// The host address of `[gpa, gpa+len)` if it lies in one region.
    fn host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let r = self.mem.find_region(GuestAddress(gpa))?;
        let off = gpa - r.start_addr().0;
        if off.checked_add(len)? > r.len() {
            return None;
        }
        self.mem.get_host_address(GuestAddress(gpa)).ok()
    }
}

impl palacios_checkpoint::MemorySource for MemSource<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn slice(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let p = self.host(gpa, len)?;
        // SAFETY: `p..p+len` lies inside one live mapping of guest memory that `self.mem`
        // keeps alive for the borrow. The VM is paused while a save runs (no core runs, no
        // device does DMA, the host input pumps wait), so nothing writes it meanwhile.
        Some(unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    fn known_zero(&self, gpa: u64, len: u64) -> Option<Vec<bool>> {
        use std::os::unix::fs::FileExt;
        if !self.anonymous {
            return None;
        }
        let f = self.pagemap.as_ref()?;
        let p = self.host(gpa, len)? as u64;
        if p % 4096 != 0 || len % 4096 != 0 {
            return None;
        }
        // /proc/self/pagemap: 8 bytes per virtual page; bit 63 present, bit 62 swapped. A page
        // of an anonymous mapping that is neither was never touched and reads as zero.
        let pages = (len / 4096) as usize;
        let mut raw = vec![0u8; pages * 8];
        f.read_exact_at(&mut raw, (p / 4096) * 8).ok()?;
        Some(
            raw.chunks_exact(8)
                .map(|e| {
                    let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
                    v & (3 << 62) == 0
                })
                .collect(),
        )
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Save the VM behind `handle` to `path` through `store`. A running VM is paused for the
/// save and resumed after it (unless `stay_paused`); a paused one stays paused.
pub fn save(
    handle: &VmHandle,
    store: &dyn CheckpointStore,
    path: &std::path::Path,
    stay_paused: bool,
    progress: &mut palacios_checkpoint::Progress,
) -> Result<SaveReport, SnapshotError> {
    let t0 = Instant::now();
    let parts = handle
        .parts()
        .cloned()
        .ok_or_else(|| SnapshotError::Unsupported("the VM is not built yet".into()))?;
    if !parts.without_state.is_empty() {
        return Err(SnapshotError::Unsupported(format!(
            "cannot checkpoint this VM: device(s) {} keep state this build cannot save",
            parts.without_state.join(", ")
        )));
    }
    let _one_at_a_time = parts.save_lock.lock().unwrap_or_else(|p| p.into_inner());
    let was_paused = handle.is_paused();
    let pause = handle.pause(Duration::from_secs(10))?;
    // Nobody may resume the VM while its state is collected.
    handle.hold_paused(true);
    let r = collect_and_write(handle, &parts, store, path, progress);
    // A failed save never leaves a running VM paused (nor stops it).
    if !was_paused && (!stay_paused || r.is_err()) {
        handle.release_and_resume();
    } else {
        handle.hold_paused(false);
    }
    let meta = r?;
    Ok(SaveReport {
        pause,
        total: t0.elapsed(),
        stored: meta.memory.extents.iter().map(|e| e.1).sum(),
        ram: meta.memory.image_len(),
    })
}

fn collect_and_write(
    handle: &VmHandle,
    parts: &VmParts,
    store: &dyn CheckpointStore,
    path: &std::path::Path,
    progress: &mut palacios_checkpoint::Progress,
) -> Result<Meta, SnapshotError> {
    let meta = meta_of(handle, parts)?;
    let src = MemSource {
        mem: &parts.mem,
        anonymous: !parts.mem_from_file,
        pagemap: std::fs::File::open("/proc/self/pagemap").ok(),
    };
    Ok(store.save(path, meta, &src, progress)?)
}

/// Everything but guest memory, of a paused VM: its config, CPU model and every section.
pub fn meta_of(handle: &VmHandle, parts: &VmParts) -> Result<Meta, SnapshotError> {
    let mut sections = Vec::new();
    let clock = ClockState {
        guest_ns: parts.clock.now(),
        tsc_hz: parts.clock.tsc_hz(),
        tsc_base: parts.clock.tsc_base(),
        deterministic: parts.clock.is_virtual(),
    };
    sections.push(Section {
        kind: "clock".into(),
        id: "guest".into(),
        class: String::new(),
        version: CLOCK_VERSION,
        state: serde_json::to_value(&clock).unwrap_or_default(),
    });
    for cpu in 0..handle.cores() {
        let st = handle.save_core(cpu, Duration::from_secs(10))?;
        sections.push(Section {
            kind: "core".into(),
            id: cpu.to_string(),
            class: String::new(),
            version: CORE_VERSION,
            state: serde_json::to_value(&st).map_err(|e| {
                SnapshotError::Unsupported(format!("core {cpu}: cannot encode its state: {e}"))
            })?,
        });
    }
    for d in &parts.devices {
        sections.push(Section {
            kind: "device".into(),
            id: d.id.clone(),
            class: d.class.clone(),
            version: d.state.version(),
            state: d.state.save(),
        });
    }
    if let Some(chip) = &parts.irqchip {
        sections.push(Section {
            kind: "backend".into(),
            id: "irqchip".into(),
            class: String::new(),
            version: IRQCHIP_VERSION,
            state: chip.save()?,
        });
    }
    let map = MemoryMap::pc(parts.config.mem_mib << 20);
    let meta = Meta {
        created_unix: now_unix(),
        writer: format!("palacios-rs {}", env!("CARGO_PKG_VERSION")),
        backend: parts.backend.to_string(),
        config: serde_json::to_value(&parts.config).unwrap_or_default(),
        cpuid: parts.cpuid.clone(),
        memory: MemoryLayout {
            slots: map.slots().iter().copied().filter(|s| s.1 > 0).collect(),
            extents: Vec::new(),
        },
        sections,
    };
    Ok(meta)
}

/// The config a checkpoint was taken with.
pub fn config_of(o: &Opened) -> Result<VmConfig, SnapshotError> {
    let cfg: VmConfig = serde_json::from_value(o.meta.config.clone()).map_err(|e| {
        SnapshotError::Checkpoint(CheckpointError::Format(
            palacios_checkpoint::FormatError::Corrupt(format!("unreadable VM config: {e}")),
        ))
    })?;
    if cfg.mem_mib == 0
        || cfg.mem_mib > crate::config::vm::MAX_MEM_MIB
        || cfg.cores == 0
        || cfg.cores > crate::config::vm::MAX_CORES
    {
        return Err(SnapshotError::Mismatch(format!(
            "the checkpoint's config is impossible ({} MiB, {} cores)",
            cfg.mem_mib, cfg.cores
        )));
    }
    Ok(cfg)
}

/// Guest RAM for `cfg`, mapped copy-on-write from the checkpoint's memory image.
pub fn memory_of(o: &Opened, cfg: &VmConfig) -> Result<GuestMem, SnapshotError> {
    let map = MemoryMap::pc(cfg.mem_mib << 20);
    let slots: Vec<(u64, u64)> = map.slots().iter().copied().filter(|s| s.1 > 0).collect();
    if slots != o.meta.memory.slots {
        return Err(SnapshotError::Mismatch(format!(
            "the checkpoint's memory layout {:x?} is not that of a {} MiB VM {:x?}",
            o.meta.memory.slots, cfg.mem_mib, slots
        )));
    }
    map.create_memory_from_file(&o.memory, o.mem_offset)
        .map_err(SnapshotError::Unsupported)
}

/// Restore a VM built from [`config_of`] and [`memory_of`] (not yet run) to the checkpoint's
/// state: guest time, every device (by id), the backend's irqchip, every core.
pub fn restore(vm: &mut Vm, o: &Opened) -> Result<(), SnapshotError> {
    restore_meta(vm, &o.meta)
}

/// [`restore`] from the metadata alone (guest memory is in place already: a migration).
pub fn restore_meta(vm: &mut Vm, meta: &Meta) -> Result<(), SnapshotError> {
    struct O<'a> {
        meta: &'a Meta,
    }
    let o = O { meta };
    let handle = vm.handle();
    let parts = handle
        .parts()
        .cloned()
        .ok_or_else(|| SnapshotError::Unsupported("the VM is not built yet".into()))?;
    let missing = missing_features(&o.meta.cpuid, &parts.cpuid);
    if !missing.is_empty() {
        return Err(SnapshotError::Mismatch(format!(
            "the checkpoint's CPU model (backend {}) has features backend '{}' cannot present: {}",
            o.meta.backend,
            parts.backend,
            missing.join(", ")
        )));
    }
    // Guest time first: devices re-arm their timers against it.
    let clock = o
        .meta
        .sections("clock")
        .next()
        .ok_or_else(|| SnapshotError::Mismatch("the checkpoint has no clock section".into()))?;
    if clock.version != CLOCK_VERSION {
        return Err(crate::state::StateError::Version {
            what: "the guest clock".into(),
            found: clock.version,
            supported: CLOCK_VERSION,
        }
        .into());
    }
    let cs: ClockState = serde_json::from_value(clock.state.clone()).map_err(|e| {
        crate::state::StateError::Malformed {
            what: "the guest clock".into(),
            msg: e.to_string(),
        }
    })?;
    if cs.deterministic != parts.clock.is_virtual() {
        return Err(SnapshotError::Mismatch(format!(
            "the checkpoint was taken with {} time, this VM has {} time",
            if cs.deterministic {
                "deterministic"
            } else {
                "host"
            },
            if parts.clock.is_virtual() {
                "deterministic"
            } else {
                "host"
            }
        )));
    }
    parts.clock.continue_from(cs.guest_ns);
    parts.clock.set_tsc_base(cs.tsc_base);
    if cs.tsc_hz != parts.clock.tsc_hz() {
        tracing::warn!(
            "the checkpoint's TSC ran at {} Hz, this backend's at {} Hz: guest TSC reads keep \
             the saved values, the rate changes",
            cs.tsc_hz,
            parts.clock.tsc_hz()
        );
    }
    // Devices, by config id.
    for d in &parts.devices {
        let found = o.meta.sections("device").find(|s| s.id == d.id);
        if found.is_none() && d.id.starts_with("core:") {
            // A part of the core newer than the checkpoint: it keeps its initial state.
            tracing::debug!(
                "the checkpoint has no state for {}: left as it starts",
                d.id
            );
            continue;
        }
        let s = found.ok_or_else(|| {
            SnapshotError::Mismatch(format!(
                "the checkpoint has no state for device '{}' (class {}): it comes from a VM \
                     with a different device set",
                d.id, d.class
            ))
        })?;
        if s.class != d.class {
            return Err(SnapshotError::Mismatch(format!(
                "device '{}' is of class {} in the checkpoint but {} in this VM",
                d.id, s.class, d.class
            )));
        }
        d.state.restore(
            &format!("device '{}' ({})", d.id, d.class),
            s.version,
            &s.state,
        )?;
    }
    for s in o.meta.sections("device") {
        if !parts.devices.iter().any(|d| d.id == s.id) {
            return Err(SnapshotError::Mismatch(format!(
                "the checkpoint has state for device '{}' (class {}), which this VM does not have",
                s.id, s.class
            )));
        }
    }
    match (
        &parts.irqchip,
        o.meta.sections("backend").find(|s| s.id == "irqchip"),
    ) {
        (Some(chip), Some(s)) => chip.restore(&s.state)?,
        (None, None) => {}
        (Some(_), None) => {
            return Err(SnapshotError::Mismatch(
                "this VM uses the in-kernel irqchip, the checkpoint's did not".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(SnapshotError::Mismatch(
                "the checkpoint's VM used KVM's in-kernel irqchip: restore it on KVM with \
                 <irqchip>kernel</irqchip>"
                    .into(),
            ));
        }
    }
    let cores: Vec<&Section> = o.meta.sections("core").collect();
    if cores.len() as u32 != vm.cores() {
        return Err(SnapshotError::Mismatch(format!(
            "the checkpoint has {} cores, the VM {}",
            cores.len(),
            vm.cores()
        )));
    }
    for s in cores {
        let cpu: u32 =
            s.id.parse()
                .map_err(|_| SnapshotError::Mismatch(format!("bad core section id '{}'", s.id)))?;
        if s.version != CORE_VERSION {
            return Err(crate::state::StateError::Version {
                what: format!("core {cpu}"),
                found: s.version,
                supported: CORE_VERSION,
            }
            .into());
        }
        let mut st: VcpuState = serde_json::from_value(s.state.clone()).map_err(|e| {
            crate::state::StateError::Malformed {
                what: format!("core {cpu}"),
                msg: e.to_string(),
            }
        })?;
        // Guest time has run since the clock was restored: the TSC moves on with it, so
        // that the two agree as they did when saved.
        let ran = parts.clock.now().saturating_sub(cs.guest_ns);
        let ticks = ((u128::from(ran) * u128::from(parts.clock.tsc_hz())) / 1_000_000_000) as u64;
        for m in st
            .msrs
            .iter_mut()
            .filter(|m| m.0 == palacios_x86::msr::IA32_TSC)
        {
            m.1 = m.1.wrapping_add(ticks);
        }
        vm.restore_core(cpu, &st).map_err(|e| {
            SnapshotError::Mismatch(format!("core {cpu}: cannot restore its state: {e}"))
        })?;
    }
    Ok(())
}
