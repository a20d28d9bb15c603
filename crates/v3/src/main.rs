//! `v3`: the Palacios-rs command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{Parser, Subcommand, ValueEnum};
use palacios::launch::{self, Image, LaunchError};
use palacios::session::{self, SessionOpts};
use palacios::{platform, status};
use palacios_vmm::config::{BackendChoice, BootFormat, ModuleConfig, VmConfig};
use palacios_vmm::host::restore_terminal;

#[derive(Parser)]
#[command(name = "v3", version, about = "Palacios-rs: compose and run virtual machines", after_help = STATUS_HELP)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

const STATUS_HELP: &str = "Exit status of `v3 run`: 0 guest halted; (v<<1)|1 guest wrote v to the debug-exit port; \
2 usage, config or guest-image error; 4 VM failure (triple fault, backend error); 6 no usable backend; \
130 stopped by the user (Ctrl-A x on the console, SIGINT, SIGTERM or SIGHUP). \
On a terminal, Ctrl-C goes to the guest; Ctrl-A h lists the console keys.";

#[derive(Subcommand)]
enum Cmd {
    /// Run a VM: from a Palacios XML config, from a kernel (quick form), or the bundled demo.
    Run(RunArgs),
    /// Validate a config (XML, device classes and options, the guest image) without running it.
    Check { config: PathBuf },
    /// List the registered device classes and their options.
    Devices,
    /// List the registered extension classes and their options.
    Extensions,
    /// Run a SymCall: a function the guest registered, called in guest context on one core.
    Symcall {
        /// The VM: its --name, or its API socket path.
        vm: String,
        /// The call number (decimal or 0x hex).
        call: String,
        /// Up to five arguments (decimal or 0x hex).
        args: Vec<String>,
        #[arg(long, default_value_t = 0)]
        cpu: u32,
        /// Give up (and restore the guest) after this long.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Run it this many times (a benchmark: the result has the mean time per call).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Print what the guest published on its SymSpy page.
    Symspy { vm: String },
    /// Queue a module blob for the guest to fetch with the SYMMOD_QUERY hypercall.
    Symmod { vm: String, file: PathBuf },
    /// Print a VM's state tree (cores, devices, extensions); needs the inspector extension.
    Inspect { vm: String },
    /// GEARS services and guarded modules of a running VM (docs/gears.md).
    Gears(palacios::gears_cli::GearsArgs),
    /// Show or change a running VM's VSched reservations (period/slice per vCPU, in µs).
    Sched(palacios::sched_api::SchedArgs),
    /// ConCORD: memory-content queries and collective checkpoints (docs/concord.md).
    Concord(palacios::concord_cli::ConcordArgs),
    /// List the guests bundled into this v3 (name them as guest:NAME in a config or --kernel).
    Guests,
    /// Restore a VM from a checkpoint and run it (guest memory is mapped copy-on-write).
    Load(LoadArgs),
    /// Pause a running VM (every core out of guest mode, guest time stopped).
    Pause { vm: String },
    /// Let a paused VM run again.
    Continue { vm: String },
    /// Stop a VM.
    Stop { vm: String },
    /// Show a VM's memory balloon (LNX_VIRTIO_BALLOON), or set the memory it should take
    /// from the guest.
    Balloon {
        /// The VM: its --name, or its API socket path.
        vm: String,
        /// MiB the guest should give back (0 returns everything).
        #[arg(long)]
        target: Option<u64>,
    },
    /// Live-migrate a running VM to a `v3 receive` (pre-copy; the VM ends here once it runs
    /// there).
    Send {
        /// The VM: its --name, or its API socket path.
        vm: String,
        /// HOST:PORT of the receiver.
        dest: String,
        /// The longest pause of the guest for the last copy, ms.
        #[arg(long, default_value_t = 50)]
        downtime: u64,
        /// Cap on the link use, Mbit/s.
        #[arg(long)]
        bandwidth: Option<u64>,
    },
    /// Wait for one live migration and run the VM it brings.
    Receive(ReceiveArgs),
    /// Print a VM's state (JSON).
    Status { vm: String },
    /// Save a checkpoint of a VM (it is paused for the save, then continues).
    Save {
        /// The VM: its --name, or its API socket path.
        vm: String,
        /// Where to write the checkpoint.
        path: PathBuf,
        /// Checkpoint store: file (one file) or dir (a directory).
        #[arg(long, default_value = "file")]
        store: String,
        /// Stop the VM after the save.
        #[arg(long)]
        stop: bool,
    },
}

#[derive(clap::Args)]
struct ReceiveArgs {
    /// ADDR:PORT to listen on (for example 0.0.0.0:7777).
    #[arg(long)]
    listen: String,
    /// CPU backend to run the VM on (default: the source's).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Use this config instead of the source's (file paths differ between hosts); its
    /// devices, memory and cores must match the source's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve the VM's control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Name the VM (its API socket as for `v3 run --name`).
    #[arg(long, conflicts_with = "api_sock")]
    name: Option<String>,
    /// Print per-core exit telemetry when the VM ends.
    #[arg(long)]
    stats: bool,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// A checkpoint written by `v3 save` (a file, or a directory of the dir store).
    checkpoint: PathBuf,
    /// CPU backend to restore on (default: the config's; a checkpoint moves between them).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Serve the VM's control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Name the restored VM (its API socket as for `v3 run --name`).
    #[arg(long, conflicts_with = "api_sock")]
    name: Option<String>,
    /// Start paused: the restored VM waits for `v3 continue`.
    #[arg(long)]
    paused: bool,
    /// Print per-core exit telemetry when the VM ends.
    #[arg(long)]
    stats: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Auto,
    Flat,
    Multiboot,
    Elf64,
    Linux,
    /// PVH entry: an ELF vmlinux, or the vmlinux extracted from a bzImage.
    Pvh,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Kvm,
    Emu,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Palacios-style XML config. Without it (and without --kernel) the demo guest boots.
    config: Option<PathBuf>,
    /// Quick form: boot this kernel on the standard PC platform.
    #[arg(long, conflicts_with = "config")]
    kernel: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto", requires = "kernel")]
    format: FormatArg,
    /// Load address of a flat binary (default 0x7c00).
    #[arg(long, value_parser = parse_addr, requires = "kernel")]
    load_addr: Option<u64>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128, conflicts_with = "config")]
    mem: u64,
    /// Number of cores.
    #[arg(long, default_value_t = 1, conflicts_with = "config")]
    cores: u32,
    /// Kernel command line.
    #[arg(long, default_value = "", requires = "kernel")]
    cmdline: String,
    /// Multiboot module (repeatable); its string is the file name.
    #[arg(long = "module", requires = "kernel")]
    modules: Vec<PathBuf>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// CPU backend (overrides the config's <backend>).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Interrupt controllers and PIT: this project's models (user) or KVM's in-kernel ones
    /// (overrides the config's <irqchip>).
    #[arg(long, value_enum)]
    irqchip: Option<IrqchipArg>,
    /// Guest time: the host's clock, or deterministic time from the instruction count
    /// (emulator backend, one core; overrides the config's <clock>).
    #[arg(long, value_enum)]
    clock: Option<ClockArg>,
    /// Print per-core exit telemetry when the VM ends.
    #[arg(long)]
    stats: bool,
    /// CPU model: full (everything the backend has) or portable (what both backends present,
    /// so that a checkpoint moves between them; overrides the config's <cpu model>).
    #[arg(long, value_enum)]
    cpu: Option<CpuArg>,
    /// Serve the VM's control API (HTTP/JSON) on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Name the VM: its API socket is $XDG_RUNTIME_DIR/palacios-rs/NAME.sock (or
    /// /tmp/palacios-rs-UID/NAME.sock), and `v3 pause NAME` etc. reach it.
    #[arg(long, conflicts_with = "api_sock")]
    name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum CpuArg {
    Full,
    Portable,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClockArg {
    Host,
    Deterministic,
}

#[derive(Clone, Copy, ValueEnum)]
enum IrqchipArg {
    User,
    Kernel,
}

fn parse_addr(s: &str) -> Result<u64, String> {
    palacios_vmm::config::parse_number(s)
        .ok_or_else(|| format!("'{s}' is not a number (decimal or 0x hex)"))
}

/// Log lines go to stderr; while the terminal is raw, a newline also returns the carriage.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut e = std::io::stderr().lock();
        if palacios::session::RAW.load(Ordering::Relaxed) != 0 {
            for line in buf.split_inclusive(|&b| b == b'\n') {
                match line.strip_suffix(b"\n") {
                    Some(l) => {
                        e.write_all(l)?;
                        e.write_all(b"\r\n")?;
                    }
                    None => e.write_all(line)?,
                }
            }
        } else {
            e.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logging(level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("bad --log-level '{level}': {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .without_time()
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init()
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::CONFIG_ERROR
            } else {
                0
            });
        }
    };
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("v3: {e}");
        return ExitCode::from(status::CONFIG_ERROR);
    }
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        prev(info);
    }));
    let code = match cli.cmd {
        Cmd::Devices => devices(),
        Cmd::Extensions => extensions(),
        Cmd::Symcall {
            vm,
            call,
            args,
            cpu,
            timeout_ms,
            repeat,
        } => symcall(&vm, &call, &args, cpu, timeout_ms, repeat),
        Cmd::Symspy { vm } => client(&vm, "GET", "/vm/symspy", None),
        Cmd::Symmod { vm, file } => symmod(&vm, &file),
        Cmd::Inspect { vm } => client(&vm, "GET", "/vm/inspect", None),
        Cmd::Gears(a) => palacios::gears_cli::run(&a),
        Cmd::Sched(a) => palacios::sched_api::run(&a),
        Cmd::Concord(a) => palacios::concord_cli::run(&a),
        Cmd::Guests => guests(),
        Cmd::Load(a) => load(a),
        Cmd::Send {
            vm,
            dest,
            downtime,
            bandwidth,
        } => send(&vm, &dest, downtime, bandwidth),
        Cmd::Receive(a) => receive(a),
        Cmd::Pause { vm } => client(&vm, "PUT", "/vm/pause", None),
        Cmd::Continue { vm } => client(&vm, "PUT", "/vm/resume", None),
        Cmd::Stop { vm } => client(&vm, "PUT", "/vm/stop", None),
        Cmd::Status { vm } => client(&vm, "GET", "/vm", None),
        Cmd::Balloon { vm, target: None } => client(&vm, "GET", "/vm/balloon", None),
        Cmd::Balloon {
            vm,
            target: Some(t),
        } => client(
            &vm,
            "PUT",
            "/vm/balloon",
            Some(serde_json::json!({ "target_mib": t })),
        ),
        Cmd::Save {
            vm,
            path,
            store,
            stop,
        } => save(&vm, &path, &store, stop),
        Cmd::Check { config } => check(&config),
        Cmd::Run(args) => run(args),
    };
    restore_terminal();
    ExitCode::from(code)
}

fn devices() -> u8 {
    let r = palacios::registry();
    for c in r.classes() {
        println!("{:<12} {}", c.name(), c.help());
        for o in c.options() {
            println!("    {:<10} {}", o.name, o.help);
        }
    }
    status::OK
}

fn extensions() -> u8 {
    let r = palacios::registry();
    for c in r.extension_classes() {
        println!("{:<14} {}", c.name(), c.help());
        for o in c.options() {
            println!("    {:<10} {}", o.name, o.help);
        }
    }
    status::OK
}

fn symcall(vm: &str, call: &str, args: &[String], cpu: u32, timeout_ms: u64, repeat: u32) -> u8 {
    let num = |s: &str| palacios_vmm::config::parse_number(s);
    let Some(call) = num(call) else {
        eprintln!("v3: the call number '{call}' is not a number");
        return status::CONFIG_ERROR;
    };
    let mut a = Vec::new();
    for s in args {
        match num(s) {
            Some(v) => a.push(v),
            None => {
                eprintln!("v3: the argument '{s}' is not a number");
                return status::CONFIG_ERROR;
            }
        }
    }
    if a.len() > 5 {
        eprintln!("v3: a SymCall takes at most 5 arguments, not {}", a.len());
        return status::CONFIG_ERROR;
    }
    client(
        vm,
        "PUT",
        "/vm/symcall",
        Some(serde_json::json!({
            "cpu": cpu, "call": call, "args": a, "timeout_ms": timeout_ms, "repeat": repeat
        })),
    )
}

fn symmod(vm: &str, file: &std::path::Path) -> u8 {
    let blob = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("v3: cannot read {}: {e}", file.display());
            return status::CONFIG_ERROR;
        }
    };
    if blob.is_empty() || blob.len() > palacios::sym_api::MAX_API_MODULE {
        eprintln!(
            "v3: {}: a module is 1 to {} bytes, not {}",
            file.display(),
            palacios::sym_api::MAX_API_MODULE,
            blob.len()
        );
        return status::CONFIG_ERROR;
    }
    let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
    client(
        vm,
        "PUT",
        "/vm/symmod",
        Some(serde_json::json!({ "hex": hex })),
    )
}

fn guests() -> u8 {
    let g = palacios::bundled_guests();
    if g.is_empty() {
        eprintln!(
            "v3: no guests are bundled: gcc, as, ld or objcopy were missing when this v3 was compiled"
        );
        return status::CONFIG_ERROR;
    }
    for (name, data) in g {
        println!("guest:{name:<16} {:>7} bytes", data.len());
    }
    status::OK
}

/// A file given on the command line: a path that must be a file, or a bundled `guest:NAME`.
fn check_file(what: &str, p: &std::path::Path) -> Result<(), LaunchError> {
    if palacios_vmm::host::bundled_file(palacios::bundled_guests(), p)
        .map_err(|e| LaunchError::Config(format!("{what}: {e}")))?
        .is_some()
    {
        return Ok(());
    }
    if p.is_dir() {
        return Err(LaunchError::Config(format!(
            "{what} {} is a directory, not a file",
            p.display()
        )));
    }
    if !p.is_file() {
        return Err(LaunchError::Config(format!(
            "{what} file not found: {}",
            p.display()
        )));
    }
    Ok(())
}

/// One request to a VM's API; prints the answer; status 0, or 2 (usage, refused) or 4.
fn client(vm: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> u8 {
    let sock = palacios_api::resolve(vm);
    let _wait = palacios::progress::Waiting::new("waiting for the VM");
    match palacios_api::request(
        &sock,
        method,
        path,
        body.as_ref(),
        std::time::Duration::from_secs(600),
    ) {
        Ok((200, v)) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            status::OK
        }
        Ok((code, v)) => {
            eprintln!(
                "v3: {vm}: {} (HTTP {code})",
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("request refused")
            );
            status::CONFIG_ERROR
        }
        Err(e) => {
            eprintln!("v3: {e}");
            status::CONFIG_ERROR
        }
    }
}

fn save(vm: &str, path: &std::path::Path, store: &str, stop: bool) -> u8 {
    if let Err(e) = palacios_checkpoint::store(store) {
        eprintln!("v3: {e}");
        return status::CONFIG_ERROR;
    }
    // The VM resolves the path in its own working directory: make it absolute here.
    let abs = match std::path::absolute(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("v3: {}: {e}", path.display());
            return status::CONFIG_ERROR;
        }
    };
    client(
        vm,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({
            "path": abs.display().to_string(),
            "store": store,
            "stop": stop,
        })),
    )
}

/// Start a migration through the VM's API and follow it until it ends.
fn send(vm: &str, dest: &str, downtime: u64, bandwidth: Option<u64>) -> u8 {
    let sock = palacios_api::resolve(vm);
    let t = std::time::Duration::from_secs(30);
    let body =
        serde_json::json!({"dest": dest, "downtime_ms": downtime, "bandwidth_mbps": bandwidth});
    match palacios_api::request(&sock, "PUT", "/migrate", Some(&body), t) {
        Ok((202, _)) => {}
        Ok((code, v)) => {
            eprintln!(
                "v3: {vm}: {} (HTTP {code})",
                v.get("error").and_then(|e| e.as_str()).unwrap_or("refused")
            );
            return status::CONFIG_ERROR;
        }
        Err(e) => {
            eprintln!("v3: {e}");
            return status::CONFIG_ERROR;
        }
    }
    let tty = std::io::stderr().is_terminal();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let v = match palacios_api::request(&sock, "GET", "/migrate", None, t) {
            Ok((200, v)) => v,
            // The VM ended (it migrated) between two polls.
            Err(palacios_api::ClientError::Connect { .. }) => {
                eprintln!("v3: {vm}: the VM is gone (it ended); check {dest}");
                return status::OK;
            }
            Ok((code, v)) => {
                eprintln!("v3: {vm}: HTTP {code}: {v}");
                return status::CONFIG_ERROR;
            }
            Err(e) => {
                eprintln!("v3: {e}");
                return status::CONFIG_ERROR;
            }
        };
        let state = v["state"].as_str().unwrap_or("?").to_string();
        if tty {
            eprint!(
                "\r{state:>13}: round {}, {} pages sent ({:.0} MB), {} dirty ({:.0}/s), {:.0} MB/s, expected downtime {:.1} ms   ",
                v["round"],
                v["pages_sent"],
                v["bytes_sent"].as_f64().unwrap_or(0.0) / 1e6,
                v["dirty_pages"],
                v["dirty_rate"].as_f64().unwrap_or(0.0),
                v["bandwidth"].as_f64().unwrap_or(0.0) / 1e6,
                v["expected_downtime_ms"].as_f64().unwrap_or(0.0)
            );
        }
        match state.as_str() {
            "done" => {
                if tty {
                    eprintln!();
                }
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return status::OK;
            }
            "failed" => {
                if tty {
                    eprintln!();
                }
                eprintln!(
                    "v3: migration of {vm} to {dest} failed: {}",
                    v["error"].as_str().unwrap_or("?")
                );
                return status::CONFIG_ERROR;
            }
            _ => {}
        }
    }
}

fn receive(a: ReceiveArgs) -> u8 {
    match try_receive(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("v3: {e}");
            e.status()
        }
    }
}

fn try_receive(a: ReceiveArgs) -> Result<u8, LaunchError> {
    use palacios_vmm::migrate::wire;
    let listener = std::net::TcpListener::bind(&a.listen)
        .map_err(|e| LaunchError::Config(format!("cannot listen on {}: {e}", a.listen)))?;
    tracing::info!("waiting for a migration on {}", a.listen);
    let (mut conn, peer) = listener
        .accept()
        .map_err(|e| LaunchError::Vm(format!("accept on {}: {e}", a.listen)))?;
    drop(listener);
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let refuse = |conn: &mut std::net::TcpStream, msg: String| {
        let _ = wire::write_frame(conn, wire::Kind::Refuse, &wire::refuse_payload(&msg));
        LaunchError::Config(format!("incoming migration from {peer} refused: {msg}"))
    };
    let f = wire::read_frame(&mut conn)
        .map_err(|e| LaunchError::Config(format!("incoming migration from {peer}: {e}")))?;
    if f.kind != wire::Kind::Hello {
        return Err(refuse(
            &mut conn,
            format!("expected Hello, got {:?}", f.kind),
        ));
    }
    let hello: wire::Hello = match serde_json::from_slice(&f.payload) {
        Ok(h) => h,
        Err(e) => return Err(refuse(&mut conn, format!("malformed Hello: {e}"))),
    };
    let theirs: palacios_vmm::VmConfig = match serde_json::from_value(hello.config.clone()) {
        Ok(c) => c,
        Err(e) => {
            return Err(refuse(
                &mut conn,
                format!("the source's config does not decode: {e}"),
            ));
        }
    };
    if theirs.mem_mib == 0
        || theirs.mem_mib > palacios_vmm::config::vm::MAX_MEM_MIB
        || theirs.cores == 0
        || theirs.cores > palacios_vmm::config::vm::MAX_CORES
    {
        return Err(refuse(
            &mut conn,
            format!(
                "the source's VM ({} MiB, {} cores) is outside what this VMM runs",
                theirs.mem_mib, theirs.cores
            ),
        ));
    }
    let mut cfg = match &a.config {
        None => match untrusted_config(theirs.clone()) {
            Ok(c) => c,
            Err(e) => return Err(refuse(&mut conn, e)),
        },
        Some(p) => {
            let mine = match load_config(p) {
                Ok(c) => c,
                Err(e) => return Err(refuse(&mut conn, e.to_string())),
            };
            let devs = |c: &palacios_vmm::VmConfig| {
                c.devices
                    .iter()
                    .map(|d| format!("{} ({})", d.id, d.class))
                    .collect::<Vec<_>>()
            };
            if devs(&mine) != devs(&theirs) {
                return Err(refuse(
                    &mut conn,
                    format!(
                        "the destination's device set differs: the source has [{}], {} has [{}]",
                        devs(&theirs).join(", "),
                        p.display(),
                        devs(&mine).join(", ")
                    ),
                ));
            }
            if (mine.mem_mib, mine.cores) != (theirs.mem_mib, theirs.cores) {
                return Err(refuse(
                    &mut conn,
                    format!(
                        "the destination's VM has {} MiB and {} cores, the source's {} MiB and {}",
                        mine.mem_mib, mine.cores, theirs.mem_mib, theirs.cores
                    ),
                ));
            }
            mine
        }
    };
    cfg.backend = match a.backend {
        Some(BackendArg::Kvm) => BackendChoice::Kvm,
        Some(BackendArg::Emu) => BackendChoice::Emu,
        Some(BackendArg::Auto) => BackendChoice::Auto,
        None => match hello.backend.as_str() {
            "kvm" => BackendChoice::Kvm,
            "emu" => BackendChoice::Emu,
            _ => cfg.backend,
        },
    };
    tracing::info!(
        "receiving a VM from {peer} ({} backend there)",
        hello.backend
    );
    let api_sock = palacios::session::api_socket(a.api_sock.clone(), a.name.as_deref())?;
    session::execute(
        &cfg,
        session::First::Incoming { conn, hello },
        SessionOpts {
            stats: a.stats,
            name: session_name(a.name.as_deref(), api_sock.as_deref()),
            api_sock,
            paused: false,
        },
    )
}

/// A config that came over the network: it names nothing on this host. Its character streams
/// that reach host files or sockets become `null`, and its files and boot image are dropped
/// (a reboot then has nothing to boot). Devices whose backend is a host resource (a disk
/// image, an NBD server, a TAP or bridge) are refused: the source must not choose which host
/// files or interfaces the guest reaches here. `--config` is how to connect them here.
fn untrusted_config(mut cfg: palacios_vmm::VmConfig) -> Result<palacios_vmm::VmConfig, String> {
    const HOST_BACKENDS: &[&str] = &["FILEDISK", "QCOWDISK", "NETDISK", "TAP", "NIC_BRIDGE"];
    let named: Vec<String> = cfg
        .devices
        .iter()
        .filter(|d| HOST_BACKENDS.contains(&d.class.as_str()))
        .map(|d| format!("{} '{}'", d.class, d.id))
        .collect();
    if !named.is_empty() {
        return Err(format!(
            "the source's VM uses host resources ({}); this host must say which of its own to \
             use: give the receiver this host's config with --config",
            named.join(", ")
        ));
    }
    for d in cfg.devices.iter_mut().filter(|d| d.class == "CHAR_STREAM") {
        let node = &mut d.node;
        let safe = |v: &str| v == "console" || v == "stdio" || v == "null";
        for a in node.attrs.iter_mut().filter(|a| a.name == "name") {
            if !safe(&a.value) {
                tracing::warn!(
                    "stream '{}' of device '{}' from the source becomes null here (use --config to connect it)",
                    a.value,
                    d.id
                );
                a.value = "null".into();
            }
        }
        for c in node.children.iter_mut().filter(|c| c.name == "name") {
            if !safe(c.text.trim()) {
                tracing::warn!(
                    "stream '{}' of device '{}' from the source becomes null here (use --config to connect it)",
                    c.text.trim(),
                    d.id
                );
                c.text = "null".into();
            }
        }
    }
    cfg.files.clear();
    cfg.boot = None;
    cfg.source = None;
    Ok(cfg)
}

fn load(a: LoadArgs) -> u8 {
    match try_load(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("v3: {e}");
            e.status()
        }
    }
}

fn try_load(a: LoadArgs) -> Result<u8, LaunchError> {
    let mut progress = palacios::progress::Progress::new("verifying");
    let opened = palacios_checkpoint::open(&a.checkpoint, &mut |d, t| progress.update(d, t))
        .map_err(|e| LaunchError::Config(format!("{}: {e}", a.checkpoint.display())))?;
    progress.finish();
    let mut cfg = palacios_vmm::snapshot::config_of(&opened)
        .map_err(|e| LaunchError::Config(format!("{}: {e}", a.checkpoint.display())))?;
    cfg.backend = match a.backend {
        Some(BackendArg::Kvm) => BackendChoice::Kvm,
        Some(BackendArg::Emu) => BackendChoice::Emu,
        Some(BackendArg::Auto) => BackendChoice::Auto,
        // The backend the checkpoint was taken on.
        None => match opened.meta.backend.as_str() {
            "kvm" => BackendChoice::Kvm,
            "emu" => BackendChoice::Emu,
            _ => cfg.backend,
        },
    };
    let api_sock = palacios::session::api_socket(a.api_sock.clone(), a.name.as_deref())?;
    session::execute(
        &cfg,
        session::First::Restore(opened),
        SessionOpts {
            stats: a.stats,
            name: session_name(a.name.as_deref(), api_sock.as_deref()),
            api_sock,
            paused: a.paused,
        },
    )
}

fn load_config(path: &std::path::Path) -> Result<VmConfig, LaunchError> {
    VmConfig::load(path).map_err(|e| LaunchError::Config(e.to_string()))
}

fn check(path: &std::path::Path) -> u8 {
    match load_config(path).and_then(|c| launch::check(&c).map(|_| c)) {
        Ok(c) => {
            println!(
                "{}: OK ({} MiB, {} core(s), {} device(s){})",
                path.display(),
                c.mem_mib,
                c.cores,
                c.devices.len(),
                c.boot
                    .as_ref()
                    .map(|b| format!(", kernel {}", b.kernel.display()))
                    .unwrap_or_default()
            );
            status::OK
        }
        Err(e) => {
            eprintln!("v3: {e}");
            e.status()
        }
    }
}

fn run(a: RunArgs) -> u8 {
    match try_run(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("v3: {e}");
            e.status()
        }
    }
}

fn try_run(a: RunArgs) -> Result<u8, LaunchError> {
    let backend_override = a.backend.map(|b| match b {
        BackendArg::Auto => BackendChoice::Auto,
        BackendArg::Kvm => BackendChoice::Kvm,
        BackendArg::Emu => BackendChoice::Emu,
    });
    let demo;
    let (mut cfg, image) = if let Some(path) = &a.config {
        let cfg = load_config(path)?;
        // Every config error is reported before a backend is needed.
        launch::check(&cfg)?;
        (cfg, Image::FromConfig)
    } else if let Some(kernel) = &a.kernel {
        check_file("kernel", kernel)?;
        let mut boot = platform::boot(kernel.clone());
        boot.format = match a.format {
            FormatArg::Auto => BootFormat::Auto,
            FormatArg::Flat => BootFormat::Flat,
            FormatArg::Multiboot => BootFormat::Multiboot,
            FormatArg::Elf64 => BootFormat::Elf64,
            FormatArg::Linux => BootFormat::Linux,
            FormatArg::Pvh => BootFormat::Pvh,
        };
        boot.load_addr = a.load_addr;
        boot.cmdline = a.cmdline.clone();
        for m in a.initrd.iter().chain(&a.modules) {
            check_file("module", m)?;
            let name = m
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            boot.modules.push(ModuleConfig {
                path: m.clone(),
                cmdline: name,
            });
        }
        (
            platform::standard_pc(a.mem, a.cores, BackendChoice::Auto, Some(boot)),
            Image::FromConfig,
        )
    } else {
        demo = palacios::demo_guest().ok_or_else(|| {
            LaunchError::Config("the demo guest was not built into this v3 (gcc, as, ld and objcopy were missing when it was compiled); give a CONFIG or --kernel".into())
        })?;
        let cfg = platform::standard_pc(a.mem, a.cores, BackendChoice::Auto, None);
        (
            cfg,
            Image::Bytes {
                data: demo,
                cmdline: "demo greeting=hello",
                modules: vec![(DEMO_MOTD.as_bytes(), "motd")],
            },
        )
    };
    if let Some(b) = backend_override {
        cfg.backend = b;
    }
    if let Some(c) = a.cpu {
        cfg.cpu_portable = matches!(c, CpuArg::Portable);
    }
    if let Some(c) = a.clock {
        cfg.deterministic = matches!(c, ClockArg::Deterministic);
    }
    if let Some(m) = a.irqchip {
        cfg.irqchip = match m {
            IrqchipArg::User => palacios_vmm::config::IrqchipMode::User,
            IrqchipArg::Kernel => palacios_vmm::config::IrqchipMode::Kernel,
        };
    }
    if cfg.mem_mib == 0 || cfg.mem_mib > palacios_vmm::config::vm::MAX_MEM_MIB {
        return Err(LaunchError::Config(format!(
            "--mem {} is out of range: guest memory must be 1 to {} MiB",
            cfg.mem_mib,
            palacios_vmm::config::vm::MAX_MEM_MIB
        )));
    }
    if cfg.cores == 0 || cfg.cores > palacios_vmm::config::vm::MAX_CORES {
        return Err(LaunchError::Config(format!(
            "--cores {} is out of range: a VM has 1 to {} cores",
            cfg.cores,
            palacios_vmm::config::vm::MAX_CORES
        )));
    }
    let api_sock = palacios::session::api_socket(a.api_sock.clone(), a.name.as_deref())?;
    session::execute(
        &cfg,
        session::First::Boot(image),
        SessionOpts {
            stats: a.stats,
            name: session_name(a.name.as_deref(), api_sock.as_deref()),
            api_sock,
            paused: false,
        },
    )
}

/// The VM's name for the API: `--name`, else the socket's stem, else "vm".
fn session_name(name: Option<&str>, sock: Option<&std::path::Path>) -> String {
    name.map(str::to_string)
        .or_else(|| {
            sock.and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "vm".into())
}

const DEMO_MOTD: &str =
    "Welcome to Palacios-rs.\nThis text is a multiboot module handed to the demo guest.\n";
