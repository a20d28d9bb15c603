//! The VM-level configuration model read from `<vm class="PC">`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::{ConfigError, ConfigNode, parse_size};

/// Which CPU backend runs the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendChoice {
    /// KVM where usable, otherwise the next available backend.
    #[default]
    Auto,
    Kvm,
    /// The software x86 emulator.
    Emu,
}

impl BackendChoice {
    pub const NAMES: &'static [&'static str] = &["auto", "kvm", "emu"];
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(BackendChoice::Auto),
            "kvm" => Some(BackendChoice::Kvm),
            "emu" => Some(BackendChoice::Emu),
            _ => None,
        }
    }
}

/// Where the PC's interrupt controllers and PIT are emulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IrqchipMode {
    /// The VMM's own models (PIC, IOAPIC, LAPIC, PIT): portable, observable, used by every backend.
    #[default]
    User,
    /// The backend's (KVM's in-kernel irqchip and PIT): fast, KVM only.
    Kernel,
}

/// Kernel image formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BootFormat {
    /// Detect from the file's contents.
    #[default]
    Auto,
    Flat,
    Multiboot,
    Elf64,
    /// A bzImage through Linux's 64-bit boot protocol (the first module is the initrd).
    Linux,
    /// PVH entry of an ELF vmlinux, or of the vmlinux the VMM extracts from a bzImage.
    Pvh,
}

impl BootFormat {
    pub const NAMES: &'static [&'static str] =
        &["auto", "flat", "multiboot", "elf64", "linux", "pvh"];
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(BootFormat::Auto),
            "flat" => Some(BootFormat::Flat),
            "multiboot" => Some(BootFormat::Multiboot),
            "elf64" => Some(BootFormat::Elf64),
            "linux" => Some(BootFormat::Linux),
            "pvh" => Some(BootFormat::Pvh),
            _ => None,
        }
    }
}

/// A multiboot module.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleConfig {
    pub path: PathBuf,
    /// The module's string (defaults to the file name).
    pub cmdline: String,
}

/// What Palacios set outside its XML: the guest image and how to enter it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootConfig {
    pub format: BootFormat,
    pub kernel: PathBuf,
    pub load_addr: Option<u64>,
    pub entry: Option<u64>,
    pub cmdline: String,
    pub modules: Vec<ModuleConfig>,
}

/// One `<device>`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceConfig {
    pub class: String,
    pub id: String,
    pub node: ConfigNode,
}

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// The file it came from, if any (for messages).
    pub source: Option<PathBuf>,
    pub mem_mib: u64,
    pub mem_alignment: u64,
    pub cores: u32,
    /// `<files>`: id → resolved path (checked to exist).
    pub files: BTreeMap<String, PathBuf>,
    pub devices: Vec<DeviceConfig>,
    pub telemetry: bool,
    pub backend: BackendChoice,
    pub irqchip: IrqchipMode,
    /// `<clock>host|deterministic</clock>`: deterministic guest time comes from the
    /// instruction count (emulator backend, one core), so a run can be reproduced exactly.
    pub deterministic: bool,
    /// `<cpu hide="x2apic,popcnt"/>`: CPUID feature names the CPU model leaves out
    /// (emulator backend; the names are listed by [`crate::backend::CPU_FEATURES`]).
    pub cpu_hide: Vec<String>,
    /// `<cpu model="portable"/>`: the CPU model both backends present
    /// ([`crate::backend::PORTABLE_FEATURES`]), so checkpoints move between them.
    #[serde(default)]
    pub cpu_portable: bool,
    pub boot: Option<BootConfig>,
    /// `<extensions>`: extensions by name, with their options.
    #[serde(default)]
    pub extensions: Vec<super::ExtensionConfig>,
    /// `<time>` and `<core khz>`: time dilation and the guest TSC frequency.
    #[serde(default)]
    pub time: super::TimeConfig,
    /// VSched reservations per core (`<core period slice>`, `<cores period slice>`).
    #[serde(default)]
    pub sched: Vec<Option<crate::sched::Reservation>>,
    /// `<schedule_hz>`: each core returns to its loop (and yields) at least this often.
    #[serde(default)]
    pub schedule_hz: Option<u32>,
    /// `<perftune><group name="yield">`: what idle cores do.
    #[serde(default)]
    pub yield_policy: crate::sched::YieldPolicy,
}

/// Largest supported guest.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most cores a VM may have (xAPIC IDs below 255).
pub const MAX_CORES: u32 = 255;

/// Top-level elements of Palacios configs that this project accepts and ignores.
const IGNORED_TOP: &[&str] = &["paging", "mem_layout", "name"];
const KNOWN_TOP: &[&str] = &[
    "memory",
    "cores",
    "files",
    "devices",
    "telemetry",
    "backend",
    "irqchip",
    "clock",
    "cpu",
    "boot",
    "extensions",
    "time",
    "schedule_hz",
    "perftune",
];

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            source: None,
            mem_mib: 128,
            mem_alignment: 4096,
            cores: 1,
            files: BTreeMap::new(),
            devices: Vec::new(),
            telemetry: false,
            backend: BackendChoice::Auto,
            irqchip: IrqchipMode::User,
            deterministic: false,
            cpu_hide: Vec::new(),
            cpu_portable: false,
            boot: None,
            extensions: Vec::new(),
            time: super::TimeConfig::default(),
            sched: Vec::new(),
            schedule_hz: None,
            yield_policy: crate::sched::YieldPolicy::default(),
        }
    }
}

impl VmConfig {
    /// Read and parse a config file. Relative paths in it resolve against its directory.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(None, format!("cannot read config: {e}")).in_file(Some(path))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut cfg = Self::parse(&text, &base).map_err(|e| e.in_file(Some(path)))?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parse config text; `base_dir` resolves relative file names.
    pub fn parse(text: &str, base_dir: &Path) -> Result<VmConfig, ConfigError> {
        let root = ConfigNode::parse_xml(text)?;
        Self::from_node(&root, base_dir)
    }

    /// Build the model from a parsed tree.
    pub fn from_node(root: &ConfigNode, base_dir: &Path) -> Result<VmConfig, ConfigError> {
        if root.name != "vm" {
            return Err(root.err(format!(
                "the root element must be <vm>, not <{}>",
                root.name
            )));
        }
        let class = root.req("class")?;
        if class != "PC" {
            return Err(root.val_err("class", format!("unknown VM class '{class}' (known: PC)")));
        }
        for c in &root.children {
            if IGNORED_TOP.contains(&c.name.as_str()) {
                tracing::warn!(
                    "config: <{}> is accepted for compatibility with Palacios and ignored",
                    c.name
                );
            } else if !KNOWN_TOP.contains(&c.name.as_str()) {
                return Err(c.err(format!(
                    "unknown element <{}> in <vm> (known: {})",
                    c.name,
                    KNOWN_TOP.join(", ")
                )));
            }
        }
        for a in &root.attrs {
            if a.name != "class" {
                return Err(super::ConfigError::new(
                    a.pos.or(root.pos),
                    format!("unknown attribute '{}' of <vm>", a.name),
                ));
            }
        }
        for (name, known) in [
            ("telemetry", &[][..]),
            ("backend", &[]),
            ("irqchip", &[]),
            ("clock", &[]),
            ("cpu", &["hide", "model"]),
            ("files", &[]),
            ("devices", &[]),
        ] {
            for c in root.children_named(name) {
                c.warn_unknown_attrs(known);
            }
        }
        let mut cfg = VmConfig::default();
        if let Some(m) = root.child("memory") {
            cfg.parse_memory(m)?;
        }
        if let Some(c) = root.child("cores") {
            cfg.cores = parse_cores(c)?;
        }
        if let Some(f) = root.child("files") {
            cfg.parse_files(f, base_dir)?;
        }
        if let Some(t) = root.val("telemetry")? {
            cfg.telemetry = match t.trim().to_ascii_lowercase().as_str() {
                "enable" | "enabled" | "on" | "1" | "true" => true,
                "disable" | "disabled" | "off" | "0" | "false" => false,
                other => {
                    return Err(root.val_err(
                        "telemetry",
                        format!("<telemetry> must be 'enable' or 'disable', not '{other}'"),
                    ));
                }
            };
        }
        if let Some(b) = root.val("backend")? {
            cfg.backend = BackendChoice::parse(b).ok_or_else(|| {
                root.val_err(
                    "backend",
                    format!(
                        "unknown backend '{b}' (known: {})",
                        BackendChoice::NAMES.join(", ")
                    ),
                )
            })?;
        }
        if let Some(m) = root.val("irqchip")? {
            cfg.irqchip = match m.trim() {
                "user" => IrqchipMode::User,
                "kernel" => IrqchipMode::Kernel,
                other => {
                    return Err(root.val_err(
                        "irqchip",
                        format!("<irqchip> must be 'user' or 'kernel', not '{other}'"),
                    ));
                }
            };
        }
        if let Some(c) = root.val("clock")? {
            cfg.deterministic = match c.trim() {
                "host" => false,
                "deterministic" => true,
                other => {
                    return Err(root.val_err(
                        "clock",
                        format!("<clock> must be 'host' or 'deterministic', not '{other}'"),
                    ));
                }
            };
        }
        if let Some(c) = root.child("cpu") {
            match c.val("model")? {
                None | Some("full") => {}
                Some("portable") => cfg.cpu_portable = true,
                Some(other) => {
                    return Err(c.val_err(
                        "model",
                        format!("<cpu model> must be 'full' or 'portable', not '{other}'"),
                    ));
                }
            }
            if let Some(h) = c.val("hide")? {
                for name in h.split([',', ' ']).map(str::trim).filter(|n| !n.is_empty()) {
                    let name = name.to_ascii_lowercase();
                    if !crate::backend::CPU_FEATURES.contains(&name.as_str()) {
                        return Err(c.val_err(
                            "hide",
                            format!(
                                "unknown CPU feature '{name}' (known: {})",
                                crate::backend::CPU_FEATURES.join(", ")
                            ),
                        ));
                    }
                    cfg.cpu_hide.push(name);
                }
            }
        }
        if let Some(e) = root.child("extensions") {
            cfg.extensions = super::ext::parse_extensions(e)?;
        }
        cfg.time = super::ext::parse_time(root.child("time"), root.child("cores"))?;
        cfg.sched = super::ext::parse_sched(root.child("cores"), cfg.cores)?;
        cfg.schedule_hz = super::ext::parse_schedule_hz(root.child("schedule_hz"))?;
        cfg.yield_policy = super::ext::parse_perftune(root.child("perftune"))?;
        if let Some(d) = root.child("devices") {
            cfg.parse_devices(d)?;
        }
        if let Some(b) = root.child("boot") {
            cfg.boot = Some(cfg.parse_boot(b, base_dir)?);
        }
        Ok(cfg)
    }

    fn parse_memory(&mut self, m: &ConfigNode) -> Result<(), ConfigError> {
        m.check_options("<memory>", &["alignment", "size"])?;
        let text = match (m.text.is_empty(), m.val("size")?) {
            (true, size) => size.unwrap_or(""),
            (false, None) => m.text.as_str(),
            (false, Some(size)) => {
                return Err(m.val_err(
                    "size",
                    format!(
                        "<memory> gives its size twice ('size=\"{size}\"' and the text '{}'): keep one",
                        m.text
                    ),
                ));
            }
        };
        let mib = super::parse_number(text)
            .ok_or_else(|| m.err(format!("<memory> must give the size in MB, not '{text}'")))?;
        if mib == 0 || mib > MAX_MEM_MIB {
            return Err(m.err(format!(
                "<memory> of {mib} MB is out of range (1 to {MAX_MEM_MIB})"
            )));
        }
        self.mem_mib = mib;
        if let Some(a) = m.val("alignment")? {
            let bytes = parse_size(a)
                .filter(|b| b.is_power_of_two() && *b >= 4096)
                .ok_or_else(|| {
                    m.val_err(
                        "alignment",
                        format!("memory alignment '{a}' must be a power of two of at least 4KB"),
                    )
                })?;
            self.mem_alignment = bytes;
        }
        Ok(())
    }

    fn parse_files(&mut self, f: &ConfigNode, base_dir: &Path) -> Result<(), ConfigError> {
        for c in &f.children {
            if c.name != "file" {
                return Err(c.err(format!("unknown element <{}> in <files>", c.name)));
            }
            c.check_options("<file>", &["id", "filename"])?;
            let id = c.req("id")?;
            let name = c.req("filename")?;
            let path = resolve_existing(c, "filename", name, base_dir)?;
            if self.files.insert(id.to_string(), path).is_some() {
                return Err(c.val_err("id", format!("file id '{id}' is defined twice")));
            }
        }
        Ok(())
    }

    fn parse_devices(&mut self, d: &ConfigNode) -> Result<(), ConfigError> {
        let mut ids = HashSet::new();
        for c in &d.children {
            if c.name != "device" {
                return Err(c.err(format!(
                    "unknown element <{}> in <devices> (expected <device>)",
                    c.name
                )));
            }
            let class = c.req("class")?.to_string();
            let id = c
                .val("id")?
                .map(str::to_string)
                .unwrap_or_else(|| class.to_ascii_lowercase());
            if !ids.insert(id.clone()) {
                return Err(c.err(format!("device id '{id}' is used twice")));
            }
            self.devices.push(DeviceConfig {
                class,
                id,
                node: c.clone(),
            });
        }
        // Every frontend tag must name a device.
        for dev in &self.devices {
            for fe in dev.node.children_named("frontend") {
                let tag = fe.req("tag")?;
                if !ids.contains(tag) {
                    return Err(fe.val_err(
                        "tag",
                        format!(
                            "<frontend tag=\"{tag}\"> of device '{}' names no device",
                            dev.id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn parse_boot(&self, b: &ConfigNode, base_dir: &Path) -> Result<BootConfig, ConfigError> {
        b.check_options(
            "<boot>",
            &[
                "format",
                "kernel",
                "load_addr",
                "entry",
                "cmdline",
                "module",
                "initrd",
            ],
        )?;
        let format = match b.val("format")? {
            None => BootFormat::Auto,
            Some(f) => BootFormat::parse(f).ok_or_else(|| {
                b.val_err(
                    "format",
                    format!(
                        "unknown boot format '{f}' (known: {})",
                        BootFormat::NAMES.join(", ")
                    ),
                )
            })?,
        };
        let kernel = self.file_ref(b, "kernel", b.req("kernel")?, base_dir)?;
        let mut modules = Vec::new();
        // `initrd` (Linux): handed to the loader as the first module.
        if let Some(i) = b.val("initrd")? {
            let path = self.file_ref(b, "initrd", i, base_dir)?;
            modules.push(ModuleConfig {
                path,
                cmdline: "initrd".into(),
            });
        }
        for m in b.children_named("module") {
            m.check_options("<module>", &["file", "cmdline"])?;
            let path = self.file_ref(m, "file", m.req("file")?, base_dir)?;
            let cmdline = match m.val("cmdline")? {
                Some(c) => c.to_string(),
                None => path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            modules.push(ModuleConfig { path, cmdline });
        }
        Ok(BootConfig {
            format,
            kernel,
            load_addr: b.num("load_addr")?,
            entry: b.num("entry")?,
            cmdline: b.val("cmdline")?.unwrap_or("").to_string(),
            modules,
        })
    }

    /// A file given as the id of a `<files>` entry, or as a path.
    fn file_ref(
        &self,
        n: &ConfigNode,
        key: &str,
        v: &str,
        base_dir: &Path,
    ) -> Result<PathBuf, ConfigError> {
        match self.files.get(v) {
            Some(p) => Ok(p.clone()),
            None => resolve_existing(n, key, v, base_dir),
        }
    }

    /// Path of a `<files>` entry.
    pub fn file(&self, id: &str) -> Option<&Path> {
        self.files.get(id).map(PathBuf::as_path)
    }
}

fn parse_cores(c: &ConfigNode) -> Result<u32, ConfigError> {
    c.check_options("<cores>", &["count", "core", "period", "slice"])?;

    let listed = c.children_named("core").count() as u64;
    let count = match c.num("count")? {
        Some(n) => {
            if listed > 0 && listed != n {
                return Err(c.val_err(
                    "count",
                    format!("<cores count=\"{n}\"> but {listed} <core> elements are listed"),
                ));
            }
            n
        }
        None => listed,
    };
    if count == 0 || count > u64::from(MAX_CORES) {
        return Err(c.err(format!("a VM needs 1 to {MAX_CORES} cores, not {count}")));
    }
    Ok(count as u32)
}

fn resolve_existing(
    n: &ConfigNode,
    key: &str,
    name: &str,
    base_dir: &Path,
) -> Result<PathBuf, ConfigError> {
    if name.is_empty() {
        return Err(n.val_err(key, format!("'{key}' is empty")));
    }
    // A guest bundled into the program: kept as a name, served by the host.
    if name.starts_with(crate::host::BUNDLED_PREFIX) {
        return Ok(PathBuf::from(name));
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    if path.is_dir() {
        return Err(n.val_err(
            key,
            format!("{} is a directory, not a file", path.display()),
        ));
    }
    if !path.is_file() {
        return Err(n.val_err(key, format!("file not found: {}", path.display())));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("palacios-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn full_config() {
        let d = tmpdir("full");
        std::fs::write(d.join("k.elf"), b"x").unwrap();
        std::fs::write(d.join("m.txt"), b"x").unwrap();
        let xml = r#"<vm class="PC">
  <memory alignment="2MB">256</memory>
  <cores count="2"><core/><core/></cores>
  <telemetry>enable</telemetry>
  <files><file id="kernel" filename="k.elf"/></files>
  <devices>
    <device class="SERIAL" id="serial"/>
    <device class="CHAR_STREAM" id="s1"><name>null</name><frontend tag="serial"><com_port>1</com_port></frontend></device>
  </devices>
  <boot format="multiboot" kernel="kernel" cmdline="a=b"><module file="m.txt"/></boot>
</vm>"#;
        let c = VmConfig::parse(xml, &d).unwrap();
        assert_eq!(
            (c.mem_mib, c.mem_alignment, c.cores, c.telemetry),
            (256, 2 << 20, 2, true)
        );
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[1].id, "s1");
        let b = c.boot.unwrap();
        assert_eq!(b.format, BootFormat::Multiboot);
        assert_eq!(b.kernel, d.join("k.elf"));
        assert_eq!(b.cmdline, "a=b");
        assert_eq!(
            b.modules,
            vec![ModuleConfig {
                path: d.join("m.txt"),
                cmdline: "m.txt".into()
            }]
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    fn err(xml: &str) -> ConfigError {
        VmConfig::parse(xml, Path::new("/nonexistent")).unwrap_err()
    }

    #[test]
    fn errors_carry_positions() {
        let e = err("<vm class=\"PC\">\n <memory>lots</memory></vm>");
        assert_eq!(e.pos.unwrap().line, 2);
        assert!(e.msg.contains("MB"));
        let e =
            err("<vm class=\"PC\"><files>\n<file id=\"k\" filename=\"nope.bin\"/></files></vm>");
        assert!(
            e.msg.contains("file not found: /nonexistent/nope.bin"),
            "{e}"
        );
        assert_eq!(e.pos.unwrap().line, 2);
        assert!(err("<vm class=\"XT\"/>").msg.contains("unknown VM class"));
        assert!(
            err("<vm class=\"PC\"><cores count=\"3\"><core/></cores></vm>")
                .msg
                .contains("3")
        );
        assert!(
            err("<vm class=\"PC\"><cores count=\"0\"/></vm>")
                .msg
                .contains("1 to")
        );
        assert!(
            err("<vm class=\"PC\"><bogus/></vm>")
                .msg
                .contains("unknown element <bogus>")
        );
        assert!(
            err("<vm class=\"PC\"><memory>0</memory></vm>")
                .msg
                .contains("out of range")
        );
        assert!(
            err("<vm class=\"PC\"><memory alignment=\"3000\">4</memory></vm>")
                .msg
                .contains("power of two")
        );
        assert!(
            err("<vm class=\"PC\"><telemetry>maybe</telemetry></vm>")
                .msg
                .contains("enable")
        );
        assert!(
            err("<vm class=\"PC\"><backend>xen</backend></vm>")
                .msg
                .contains("auto, kvm")
        );
        let e = err(
            "<vm class=\"PC\"><devices><device class=\"A\" id=\"x\"/><device class=\"B\" id=\"x\"/></devices></vm>",
        );
        assert!(e.msg.contains("used twice"));
        let e = err(
            "<vm class=\"PC\"><devices><device class=\"A\" id=\"x\"><frontend tag=\"y\"/></device></devices></vm>",
        );
        assert!(e.msg.contains("names no device"));
        assert!(
            err("<vm class=\"PC\"><boot format=\"coff\" kernel=\"x\"/></vm>")
                .msg
                .contains("unknown boot format")
        );
        assert!(
            err("<vm class=\"PC\"><boot kernel=\"x\"/></vm>")
                .msg
                .contains("file not found")
        );
    }

    #[test]
    fn load_sets_source_and_base_dir() {
        let d = tmpdir("load");
        std::fs::write(d.join("k.bin"), b"x").unwrap();
        std::fs::write(
            d.join("vm.xml"),
            "<vm class=\"PC\"><boot kernel=\"k.bin\"/></vm>",
        )
        .unwrap();
        let c = VmConfig::load(&d.join("vm.xml")).unwrap();
        assert_eq!(c.boot.unwrap().kernel, d.join("k.bin"));
        let e = VmConfig::load(&d.join("missing.xml")).unwrap_err();
        assert!(e.to_string().contains("missing.xml") && e.msg.contains("cannot read"));
        std::fs::remove_dir_all(d).unwrap();
    }
}
