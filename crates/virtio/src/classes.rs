//! The Palacios device classes for virtio and the disk backends.
//!
//! Frontends sit on the PCI bus (`<bus>pci0</bus>`); a disk backend names its frontend with
//! `<frontend tag="ID">`, as in Palacios:
//!
//! ```xml
//! <device class="PCI" id="pci0"/>
//! <device class="LNX_VIRTIO_BLK" id="blk0"><bus>pci0</bus></device>
//! <device class="FILEDISK" id="disk0" writable="1">
//!   <path>disk.img</path>
//!   <frontend tag="blk0"/>
//! </device>
//! ```
//!
//! Backends: `FILEDISK` (raw file, `writable`), `RAMDISK` (`file` names a `<files>` entry, or
//! `size` in MiB; the image is copied into memory and writes are lost at exit), `TMPDISK`
//! (scratch of `size` MiB, discarded at exit), `QCOWDISK` (qcow2 with backing files,
//! `writable`), `NETDISK` (an NBD server: `IP` and `port`, or `socket`; `export`).
//! The frontend device is built when the VM's devices are all created, so the backend may
//! come before or after it in the config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use palacios_pci::{DevFn, PciRoot, pci_root};
use palacios_storage::BlockBackend;
use palacios_vmm::config::{ConfigNode, DeviceConfig};
use palacios_vmm::state::state_fn;
use palacios_vmm::{BuildCtx, ConfigError, DeviceClass, DeviceOption};

use crate::device::VirtioDevice;
use crate::transport::{TransportState, VirtioPci};

/// Frontends waiting for a backend, by device id.
#[derive(Default)]
pub struct DiskFrontends {
    map: Mutex<HashMap<String, Arc<DiskSlot>>>,
}

/// Where a backend puts its disk for a frontend.
pub struct DiskSlot {
    pub class: &'static str,
    pub disk: OnceLock<(Arc<dyn BlockBackend>, String)>,
}

fn frontends(ctx: &mut BuildCtx) -> Arc<DiskFrontends> {
    ctx.service_or_default::<DiskFrontends>()
}

/// Register a block frontend `id` that a disk backend will fill.
pub fn register_disk_frontend(ctx: &mut BuildCtx, id: &str, class: &'static str) -> Arc<DiskSlot> {
    let slot = Arc::new(DiskSlot {
        class,
        disk: OnceLock::new(),
    });
    palacios_vmm::bus::lock(&frontends(ctx).map).insert(id.to_string(), slot.clone());
    slot
}

const BUS: DeviceOption = DeviceOption {
    name: "bus",
    help: "the PCI bus device's id",
};
const SLOT: DeviceOption = DeviceOption {
    name: "slot",
    help: "PCI slot (2-31); default: the first free one",
};

/// `<slot>N</slot>`: a fixed PCI slot, else the first free one.
fn slot_of(dev: &DeviceConfig) -> Result<Option<DevFn>, ConfigError> {
    match dev.node.num("slot")? {
        None => Ok(None),
        Some(s) if (2..32).contains(&s) => Ok(Some(DevFn::new(s as u8, 0))),
        Some(s) => Err(dev.node.val_err(
            "slot",
            format!("PCI slot {s}: use 2-31 (0 and 1 are the host and ISA bridges)"),
        )),
    }
}

/// Build the PCI function for `device`, plug it in and register its state.
fn plug(
    ctx: &mut BuildCtx,
    id: &str,
    at: Option<DevFn>,
    root: &Arc<PciRoot>,
    device: Box<dyn VirtioDevice>,
    cell: &Arc<OnceLock<Arc<Mutex<VirtioPci>>>>,
) -> Result<(), String> {
    let mut pci = VirtioPci::new(id, device, ctx.mem.clone(), ctx.msi.clone())
        .map_err(|e| format!("cannot start device '{id}': {e}"))?;
    if let Some(ev) = ctx.io_events.clone() {
        pci.set_io_events(ev);
    }
    let pci = Arc::new(Mutex::new(pci));
    let at = root.add(at, id, pci.clone())?;
    let line = root.intx_line(at, 1);
    palacios_vmm::bus::lock(&pci).set_intx(line);
    // Weak: the VM handle outlives the devices (and is reachable from them).
    ctx.vm.add_quiesce(Arc::new(Quiesce(Arc::downgrade(&pci))));
    let _ = cell.set(pci);
    Ok(())
}

struct Quiesce(std::sync::Weak<Mutex<VirtioPci>>);

impl palacios_vmm::control::Quiesce for Quiesce {
    fn quiesce(&self, stop: bool) {
        let Some(pci) = self.0.upgrade() else {
            return;
        };
        // Not under the function's lock: the worker may need it to finish its batch.
        let sh = palacios_vmm::bus::lock(&pci).shared.clone();
        crate::transport::set_paused(&sh, stop);
    }
}

/// Register the state of a function that is built later (in a finisher).
fn register_late_state(ctx: &mut BuildCtx, cell: &Arc<OnceLock<Arc<Mutex<VirtioPci>>>>) {
    let (c1, c2) = (cell.clone(), cell.clone());
    ctx.register_state(state_fn(
        1,
        move || c1.get().map(|p| palacios_vmm::bus::lock(p).save()),
        move |st: Option<TransportState>| match (c2.get(), st) {
            (Some(p), Some(st)) => palacios_vmm::bus::lock(p).restore(st),
            (None, None) => Ok(()),
            _ => Err("virtio function present on one side only".into()),
        },
    ));
}

pub struct VirtioBlkClass;

impl DeviceClass for VirtioBlkClass {
    fn name(&self) -> &'static str {
        "LNX_VIRTIO_BLK"
    }
    fn help(&self) -> &'static str {
        "virtio block device on PCI (transitional: virtio 1.x and legacy drivers); its disk is a \
         backend device (FILEDISK, RAMDISK, TMPDISK, QCOWDISK, NETDISK) with <frontend tag=ID>"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            BUS,
            SLOT,
            DeviceOption {
                name: "readonly",
                help: "1: the guest sees a read-only disk",
            },
        ]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let root = pci_root(ctx, dev)?;
        let at = slot_of(dev)?;
        let ro = flag(&dev.node, "readonly")?;
        let slot = register_disk_frontend(ctx, &dev.id, "LNX_VIRTIO_BLK");
        let cell = Arc::new(OnceLock::new());
        register_late_state(ctx, &cell);
        let (id, node) = (dev.id.clone(), dev.node.clone());
        ctx.on_finish(move |ctx| {
            let (disk, _) = slot.disk.get().cloned().ok_or_else(|| {
                node.err(format!(
                    "virtio disk '{id}' has no backend: add a FILEDISK, RAMDISK, TMPDISK, QCOWDISK \
                     or NETDISK device with <frontend tag=\"{id}\"/>"
                ))
            })?;
            let blk = crate::blk::Blk::new(disk, ro);
            plug(ctx, &id, at, &root, Box::new(blk), &cell).map_err(|e| node.err(e))
        });
        Ok(())
    }
}

pub struct VirtioRngClass;

impl DeviceClass for VirtioRngClass {
    fn name(&self) -> &'static str {
        "LNX_VIRTIO_RNG"
    }
    fn help(&self) -> &'static str {
        "virtio entropy device on PCI, fed by the host's getrandom(2)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[BUS, SLOT]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let root = pci_root(ctx, dev)?;
        let at = slot_of(dev)?;
        let cell = Arc::new(OnceLock::new());
        register_late_state(ctx, &cell);
        plug(
            ctx,
            &dev.id,
            at,
            &root,
            Box::new(crate::rng::Rng::default()),
            &cell,
        )
        .map_err(|e| dev.node.err(e))
    }
}

fn flag(n: &ConfigNode, key: &str) -> Result<bool, ConfigError> {
    match n.val(key)? {
        None | Some("0") | Some("no") | Some("false") => Ok(false),
        Some("1") | Some("yes") | Some("true") => Ok(true),
        Some(v) => Err(n.val_err(key, format!("'{v}': use 1 or 0"))),
    }
}

/// The `<frontend tag=..>` a backend attaches to.
fn attach(
    ctx: &mut BuildCtx,
    dev: &DeviceConfig,
    disk: Arc<dyn BlockBackend>,
) -> Result<(), ConfigError> {
    let n = &dev.node;
    let mut fes = n.children_named("frontend");
    let fe = fes.next().ok_or_else(|| {
        n.err(format!(
            "{} needs a <frontend tag=\"...\"> naming its disk frontend",
            dev.class
        ))
    })?;
    if let Some(extra) = fes.next() {
        return Err(extra.err("a disk backend serves exactly one frontend"));
    }
    let tag = fe.req("tag")?;
    let slot = palacios_vmm::bus::lock(&frontends(ctx).map)
        .get(tag)
        .cloned();
    let slot = slot.ok_or_else(|| {
        fe.val_err(
            "tag",
            format!("'{tag}' is not a disk frontend declared before this backend (LNX_VIRTIO_BLK)"),
        )
    })?;
    slot.disk
        .set((disk, dev.id.clone()))
        .map_err(|(_, _)| fe.val_err("tag", format!("frontend '{tag}' already has a disk")))
}

fn disk_err(n: &ConfigNode, key: &str, e: palacios_storage::DiskError) -> ConfigError {
    n.val_err(key, e.to_string())
}

macro_rules! backend_class {
    ($ty:ident, $name:expr, $help:expr, [$($opt:expr => $ohelp:expr),*], |$ctx:ident, $dev:ident| $body:block) => {
        pub struct $ty;
        impl DeviceClass for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn help(&self) -> &'static str {
                $help
            }
            fn options(&self) -> &'static [DeviceOption] {
                &[
                    DeviceOption { name: "frontend", help: "<frontend tag=\"ID\"/>: the disk frontend served" },
                    $(DeviceOption { name: $opt, help: $ohelp },)*
                ]
            }
            // The disk's contents live in the backend itself (the image file or server);
            // the guest-visible state (queues, requests) belongs to the frontend.
            fn stateless(&self) -> bool {
                true
            }
            fn create(&self, $ctx: &mut BuildCtx, $dev: &DeviceConfig) -> Result<(), ConfigError> {
                let disk: Arc<dyn BlockBackend> = $body;
                attach($ctx, $dev, disk)
            }
        }
    };
}

backend_class!(FileDiskClass, "FILEDISK", "a raw disk image file (read-only unless writable=1)",
["path" => "the image file (relative to the config)", "writable" => "1: guest writes reach the file"],
|ctx, dev| {
    let n = &dev.node;
    let path = ctx.resolve_path(n.req("path")?);
    let w = flag(n, "writable")?;
    palacios_storage::open_file(&path, w).map_err(|e| disk_err(n, "path", e))?
});

backend_class!(QcowDiskClass, "QCOWDISK", "a qcow2 image (v2/v3, backing files; read-only unless writable=1)",
["path" => "the qcow2 file", "writable" => "1: writes allocate clusters in the image"],
|ctx, dev| {
    let n = &dev.node;
    let path = ctx.resolve_path(n.req("path")?);
    let w = flag(n, "writable")?;
    palacios_storage::open_qcow2(&path, w).map_err(|e| disk_err(n, "path", e))?
});

backend_class!(RamDiskClass, "RAMDISK", "a disk in memory, from a <files> entry or empty; writes are lost at exit",
["file" => "id of a <files> entry holding the image", "size" => "size in MiB (empty disk) when no file", "writable" => "0: read-only (default 1)"],
|ctx, dev| {
    let n = &dev.node;
    let w = match n.val("writable")? { None => true, Some(_) => flag(n, "writable")? };
    match (n.val("file")?, n.num("size")?) {
        (Some(id), None) => {
            let path = ctx.files.get(id).cloned().ok_or_else(|| n.val_err("file", format!("no <file id=\"{id}\"> in <files>")))?;
            let data = ctx.host.read_file(&path).map_err(|e| n.val_err("file", format!("reading {}: {e}", path.display())))?;
            palacios_storage::ram_from_bytes(data, w)
        }
        (None, Some(mib)) if (1..=65536).contains(&mib) => palacios_storage::ram_from_bytes(vec![0; (mib << 20) as usize], w),
        (None, Some(mib)) => return Err(n.val_err("size", format!("{mib} MiB: use 1-65536"))),
        _ => return Err(n.err("RAMDISK needs either file=\"FILE-ID\" or size=\"MiB\"")),
    }
});

backend_class!(TmpDiskClass, "TMPDISK", "a zero-filled scratch disk (sparse host file, deleted at exit)",
["size" => "size in MiB"],
|ctx, dev| {
    let _ = &ctx;
    let n = &dev.node;
    let mib = n.num("size")?.ok_or_else(|| n.err("TMPDISK needs size=\"MiB\""))?;
    if !(1..=(1 << 24)).contains(&mib) {
        return Err(n.val_err("size", format!("{mib} MiB: use 1 MiB to 16 TiB")));
    }
    palacios_storage::tmp_disk(mib << 20).map_err(|e| disk_err(n, "size", e))?
});

backend_class!(NetDiskClass, "NETDISK", "a disk on an NBD server (qemu-nbd): IP and port, or socket",
["IP" => "server address", "port" => "server port (default 10809)", "socket" => "a Unix socket path instead of IP/port", "export" => "export name", "writable" => "1: writes go to the server"],
|ctx, dev| {
    let n = &dev.node;
    let addr = match (n.val("socket")?, n.val("IP")?) {
        (Some(s), None) => format!("unix:{}", ctx.resolve_path(s).display()),
        (None, Some(ip)) => format!("{ip}:{}", n.num("port")?.unwrap_or(10809)),
        _ => return Err(n.err("NETDISK needs IP (and port) or socket")),
    };
    let w = flag(n, "writable")?;
    palacios_storage::connect_nbd(&addr, n.val("export")?, w).map_err(|e| n.err(format!("NBD server {addr}: {e}")))?
});

/// Register every class of this crate.
pub fn register_all(r: &mut palacios_vmm::Registry) {
    r.register(Box::new(VirtioBlkClass));
    r.register(Box::new(VirtioRngClass));
    r.register(Box::new(FileDiskClass));
    r.register(Box::new(QcowDiskClass));
    r.register(Box::new(RamDiskClass));
    r.register(Box::new(TmpDiskClass));
    r.register(Box::new(NetDiskClass));
    r.register(Box::new(VirtioBalloonClass));
    r.register(Box::new(VirtioConsoleClass));
    register_net(r);
}

type NicSlot = Arc<Mutex<Option<(crate::tap::Tap, String)>>>;

/// NIC frontends waiting for a backend (a TAP), by device id.
#[derive(Default)]
pub struct NicFrontends {
    map: Mutex<HashMap<String, NicSlot>>,
}

fn nic_frontends(ctx: &mut BuildCtx) -> Arc<NicFrontends> {
    ctx.service_or_default::<NicFrontends>()
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

pub struct VirtioNicClass;

impl DeviceClass for VirtioNicClass {
    fn name(&self) -> &'static str {
        "LNX_VIRTIO_NIC"
    }
    fn help(&self) -> &'static str {
        "virtio network device on PCI (checksum and TSO offloads, mergeable receive buffers); its \
         host side is a TAP or NIC_BRIDGE backend with <frontend tag=ID>"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            BUS,
            SLOT,
            DeviceOption {
                name: "mac",
                help: "the MAC address, aa:bb:cc:dd:ee:ff (default: 52:54:00 plus three bytes from the id)",
            },
        ]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let root = pci_root(ctx, dev)?;
        let at = slot_of(dev)?;
        let mac = match dev.node.val("mac")? {
            Some(m) => {
                let mac = parse_mac(m).ok_or_else(|| {
                    dev.node.val_err(
                        "mac",
                        format!("'{m}' is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                    )
                })?;
                if mac[0] & 1 != 0 {
                    return Err(dev
                        .node
                        .val_err("mac", format!("'{m}' is a multicast address")));
                }
                mac
            }
            None => {
                let h = dev.id.bytes().fold(0x811c_9dc5u32, |h, b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                let b = h.to_le_bytes();
                [0x52, 0x54, 0x00, b[0], b[1], b[2]]
            }
        };
        let slot: NicSlot = Arc::new(Mutex::new(None));
        palacios_vmm::bus::lock(&nic_frontends(ctx).map).insert(dev.id.clone(), slot.clone());
        let cell = Arc::new(OnceLock::new());
        register_late_state(ctx, &cell);
        let (id, node) = (dev.id.clone(), dev.node.clone());
        ctx.on_finish(move |ctx| {
            let (tap, _) = palacios_vmm::bus::lock(&slot).take().ok_or_else(|| {
                node.err(format!(
                    "virtio NIC '{id}' has no backend: add a TAP or NIC_BRIDGE device with <frontend tag=\"{id}\"/>"
                ))
            })?;
            let net = crate::net::Net::new(tap, mac);
            plug(ctx, &id, at, &root, Box::new(net), &cell).map_err(|e| node.err(e))
        });
        Ok(())
    }
}

fn attach_nic(
    ctx: &mut BuildCtx,
    dev: &DeviceConfig,
    tap: crate::tap::Tap,
) -> Result<(), ConfigError> {
    let n = &dev.node;
    let fe = n.child("frontend").ok_or_else(|| {
        n.err(format!(
            "{} needs a <frontend tag=\"...\"> naming its NIC",
            dev.class
        ))
    })?;
    let tag = fe.req("tag")?;
    let f = nic_frontends(ctx);
    let slot = palacios_vmm::bus::lock(&f.map).get(tag).cloned();
    let slot = slot.ok_or_else(|| {
        fe.val_err(
            "tag",
            format!("'{tag}' is not a NIC frontend declared before this backend (LNX_VIRTIO_NIC)"),
        )
    })?;
    let mut s = palacios_vmm::bus::lock(&slot);
    if s.is_some() {
        return Err(fe.val_err("tag", format!("NIC '{tag}' already has a backend")));
    }
    *s = Some((tap, dev.id.clone()));
    Ok(())
}

fn open_tap(n: &ConfigNode, name: Option<&str>) -> Result<crate::tap::Tap, ConfigError> {
    let name = name.unwrap_or("v3tap%d");
    crate::tap::Tap::open(name).map_err(|e| {
        n.err(format!(
            "TAP '{name}': {e} (creating a TAP needs CAP_NET_ADMIN; an existing one can be given \
             to the user with `ip tuntap add NAME mode tap user USER`)"
        ))
    })
}

pub struct TapClass;

impl DeviceClass for TapClass {
    fn name(&self) -> &'static str {
        "TAP"
    }
    fn help(&self) -> &'static str {
        "a Linux TAP interface as a NIC's host side (the virtio-net header and offloads pass through)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            DeviceOption {
                name: "frontend",
                help: "<frontend tag=\"ID\"/>: the NIC served",
            },
            DeviceOption {
                name: "ifname",
                help: "the TAP's name (created if missing; default v3tapN)",
            },
        ]
    }
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let tap = open_tap(&dev.node, dev.node.val("ifname")?)?;
        attach_nic(ctx, dev, tap)
    }
}

pub struct NicBridgeClass;

impl DeviceClass for NicBridgeClass {
    fn name(&self) -> &'static str {
        "NIC_BRIDGE"
    }
    fn help(&self) -> &'static str {
        "a NIC's host side on a Linux bridge: a TAP added to the bridge named by <hostnic name=..> \
         (or <bridge>)"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            DeviceOption {
                name: "frontend",
                help: "<frontend tag=\"ID\"/>: the NIC served",
            },
            DeviceOption {
                name: "hostnic",
                help: "<hostnic name=\"BRIDGE\"/>: the Linux bridge to join",
            },
            DeviceOption {
                name: "bridge",
                help: "the Linux bridge to join (instead of hostnic)",
            },
            DeviceOption {
                name: "ifname",
                help: "the TAP's name (default v3tapN)",
            },
        ]
    }
    fn stateless(&self) -> bool {
        true
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let n = &dev.node;
        let bridge = match (
            n.child("hostnic").and_then(|h| h.attr("name")),
            n.val("bridge")?,
        ) {
            (Some(a), None) => a.value.clone(),
            (None, Some(b)) => b.to_string(),
            _ => {
                return Err(
                    n.err("NIC_BRIDGE needs the bridge: <hostnic name=\"BRIDGE\"/> or <bridge>")
                );
            }
        };
        let tap = open_tap(n, n.val("ifname")?)?;
        tap.join_bridge(&bridge).map_err(|e| {
            n.err(format!(
                "{e} (does the bridge exist? `ip link add {bridge} type bridge`)"
            ))
        })?;
        attach_nic(ctx, dev, tap)
    }
}

/// Register the network classes.
pub fn register_net(r: &mut palacios_vmm::Registry) {
    r.register(Box::new(VirtioNicClass));
    r.register(Box::new(TapClass));
    r.register(Box::new(NicBridgeClass));
}

pub struct VirtioBalloonClass;

impl DeviceClass for VirtioBalloonClass {
    fn name(&self) -> &'static str {
        "LNX_VIRTIO_BALLOON"
    }
    fn help(&self) -> &'static str {
        "virtio memory balloon on PCI: the guest gives back the memory asked for (`v3 balloon`, \
         PUT /vm/balloon), freed on the host; statistics every second"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[
            BUS,
            SLOT,
            DeviceOption {
                name: "target",
                help: "MiB to take from the guest at boot (default 0)",
            },
        ]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let root = pci_root(ctx, dev)?;
        let at = slot_of(dev)?;
        let target = dev.node.num("target")?.unwrap_or(0);
        let mem_mib = ctx.map.ram_bytes() >> 20;
        if target >= mem_mib {
            return Err(dev.node.val_err(
                "target",
                format!("{target} MiB is not below the guest's {mem_mib} MiB"),
            ));
        }
        let b = crate::balloon::Balloon::new(target)
            .map_err(|e| dev.node.err(format!("cannot create the balloon: {e}")))?;
        ctx.vm.add_control(&b.ctl);
        let cell = Arc::new(OnceLock::new());
        register_late_state(ctx, &cell);
        // The control must live as long as the device: the device holds it.
        plug(ctx, &dev.id, at, &root, Box::new(b), &cell).map_err(|e| dev.node.err(e))
    }
}

pub struct VirtioConsoleClass;

impl DeviceClass for VirtioConsoleClass {
    fn name(&self) -> &'static str {
        "LNX_VIRTIO_CONSOLE"
    }
    fn help(&self) -> &'static str {
        "virtio console on PCI (/dev/hvc0 in Linux); a character frontend: connect it with a \
         CHAR_STREAM whose <frontend tag=ID>"
    }
    fn options(&self) -> &'static [DeviceOption] {
        &[BUS, SLOT]
    }
    fn create(&self, ctx: &mut BuildCtx, dev: &DeviceConfig) -> Result<(), ConfigError> {
        let root = pci_root(ctx, dev)?;
        let at = slot_of(dev)?;
        let port = crate::console::ConsolePort::new()
            .map_err(|e| dev.node.err(format!("cannot create the console: {e}")))?;
        ctx.char_frontends.insert(
            dev.id.clone(),
            Arc::new(crate::console::ConsoleFrontend(port.clone())),
        );
        let cell = Arc::new(OnceLock::new());
        register_late_state(ctx, &cell);
        plug(
            ctx,
            &dev.id,
            at,
            &root,
            Box::new(crate::console::Console::new(port)),
            &cell,
        )
        .map_err(|e| dev.node.err(e))
    }
}
