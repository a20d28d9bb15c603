//! Running a VM from the command line: the console in raw mode, signals and the console's
//! stop key, reboots, the per-VM API socket, and the exit status. Shared by `v3 run` and
//! `v3 load`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use palacios_vmm::config::VmConfig;
use palacios_vmm::host::restore_terminal;
use palacios_vmm::{LinuxHost, Outcome, VmHandle};

use crate::control_api::ApiState;
use crate::launch::{self, Image, LaunchError};
use crate::status;

/// 1 while the console is in raw mode (log lines then end in CR LF).
pub static RAW: AtomicI32 = AtomicI32::new(0);

/// `got_signal` value for the console's stop key (signals are positive).
const STOP_KEY: i32 = -1;

/// How a session runs its VM.
pub struct SessionOpts {
    pub stats: bool,
    /// Serve the control API on this socket.
    pub api_sock: Option<PathBuf>,
    /// The VM's name (for the API; the socket path's stem, or "vm").
    pub name: String,
    /// Start paused (a restored VM waits for `v3 continue`).
    pub paused: bool,
}

/// The API socket a `--api-sock` / `--name` pair asks for.
pub fn api_socket(
    api_sock: Option<PathBuf>,
    name: Option<&str>,
) -> Result<Option<PathBuf>, LaunchError> {
    match (api_sock, name) {
        (Some(p), _) => Ok(Some(p)),
        (None, Some(n)) => {
            if !palacios_api::valid_name(n) {
                return Err(LaunchError::Config(format!(
                    "'{n}' is not a usable VM name (letters, digits, '-', '_' and '.', at most 64, not starting with '.' nor ending in '.sock')"
                )));
            }
            Ok(Some(palacios_api::socket_for_name(n)))
        }
        (None, None) => Ok(None),
    }
}

/// How the VM begins (reboots always boot the config's guest).
pub enum First<'a> {
    /// Boot this image.
    Boot(Image<'a>),
    /// Restore a checkpoint.
    Restore(palacios_checkpoint::Opened),
    /// Receive a live migration on this connection (its Hello already read).
    Incoming {
        conn: std::net::TcpStream,
        hello: palacios_vmm::migrate::wire::Hello,
    },
}

/// Run the VM of `cfg` from `first` until it ends; the exit status.
pub fn execute(cfg: &VmConfig, first: First, opts: SessionOpts) -> Result<u8, LaunchError> {
    let cfg = &with_session_names(cfg, &opts);
    let (image, mut first) = match first {
        First::Boot(i) => (i, None),
        other => (Image::FromConfig, Some(other)),
    };
    let raw = std::io::stdin().is_terminal();
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
            .map_err(|e| LaunchError::Vm(format!("cannot install signal handlers: {e}")))?;
    let sig_handle = signals.handle();
    let got_signal = Arc::new(AtomicI32::new(0));
    // The VM a signal stops (it changes when the guest reboots).
    let current: Arc<std::sync::Mutex<Option<VmHandle>>> = Arc::default();
    let (got2, cur2) = (got_signal.clone(), current.clone());
    let watcher = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            got2.store(sig, Ordering::Release);
            if let Some(h) = cur2.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                h.stop(Outcome::Stopped);
            }
        }
    });
    let api_state = ApiState::new(
        &opts.name,
        match cfg.backend {
            palacios_vmm::config::BackendChoice::Kvm => "kvm",
            palacios_vmm::config::BackendChoice::Emu => "emu",
            palacios_vmm::config::BackendChoice::Auto => "auto",
        },
    );
    // The socket first: a receiver that cannot serve its API must fail before it tells the
    // source it has the VM.
    let api = match &opts.api_sock {
        Some(p) => {
            let server =
                palacios_api::Server::start(p, crate::control_api::handler(api_state.clone()))
                    .map_err(|e| {
                        LaunchError::Config(format!("cannot serve the API on {}: {e}", p.display()))
                    });
            match server {
                Ok(s) => {
                    tracing::info!("API socket: {}", p.display());
                    Some(s)
                }
                Err(e) => {
                    sig_handle.close();
                    let _ = watcher.join();
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let result = (|| -> Result<palacios_vmm::vm::RunReport, LaunchError> {
        let mut boots = 0u64;
        loop {
            let backend = launch::backend(cfg.backend)?;
            let (got3, cur3) = (got_signal.clone(), current.clone());
            let host = Arc::new(
                LinuxHost::new(raw)
                    .with_bundled(crate::bundled_guests())
                    .on_console_stop(Arc::new(move || {
                        got3.store(STOP_KEY, Ordering::Release);
                        if let Some(h) = cur3.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                            h.stop(Outcome::Stopped);
                        }
                    })),
            );
            let prepared = match first.take() {
                Some(First::Restore(ck)) => launch::prepare_restore(cfg, &ck, backend, host)?,
                Some(First::Incoming { mut conn, hello }) => {
                    launch::prepare_incoming(cfg, &mut conn, &hello, backend, host)?
                }
                _ => launch::prepare(cfg, image.clone(), backend, host)?,
            };
            api_state.set_handle(prepared.vm.handle());
            if opts.paused && boots == 0 {
                // No core runs before the API says so.
                let _ = prepared
                    .vm
                    .handle()
                    .pause(std::time::Duration::from_secs(1));
            }
            RAW.store(i32::from(raw), Ordering::Relaxed);
            let report = launch::run(prepared, opts.stats, |h| {
                if got_signal.load(Ordering::Acquire) != 0 {
                    h.stop(Outcome::Stopped);
                }
                *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
            });
            if report.outcome != Outcome::Reboot || got_signal.load(Ordering::Acquire) != 0 {
                return Ok(report);
            }
            boots += 1;
            if report.print_telemetry {
                eprint!("{}", report.telemetry.render());
            }
            tracing::info!("the guest reset the machine: rebooting (reboot {boots})");
        }
    })();
    if let Ok(r) = &result {
        api_state.set_ended(r.outcome.clone());
        // A `v3 send` follows the migration through this socket: let it see the end.
        if api.is_some() && matches!(r.outcome, Outcome::Migrated(_)) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    drop(api);
    sig_handle.close();
    let _ = watcher.join();
    restore_terminal();
    RAW.store(0, Ordering::Relaxed);
    let report = result?;
    if report.print_telemetry {
        eprint!("{}", report.telemetry.render());
    }
    match got_signal.load(Ordering::Acquire) {
        0 => {}
        STOP_KEY => tracing::info!("stopped from the console (Ctrl-A x)"),
        sig => tracing::info!("stopped by signal {sig}"),
    }
    let code = status::for_outcome(&report.outcome);
    match &report.outcome {
        o if o.is_failure() => eprintln!("v3: {o}"),
        o => tracing::info!("VM ended: {o} (exit status {code})"),
    }
    Ok(code)
}

/// ConCORD's tracker learns this session's VM name (its entity, unless the config names one)
/// and API socket.
fn with_session_names(cfg: &VmConfig, opts: &SessionOpts) -> VmConfig {
    let mut cfg = cfg.clone();
    for e in cfg.extensions.iter_mut().filter(|e| e.name == "concord") {
        let n = &mut e.node;
        n.attrs.retain(|a| a.name != "session_name");
        n.attrs.push(palacios_vmm::config::node::Attr {
            name: "session_name".into(),
            value: opts.name.clone(),
            pos: None,
        });
        n.attrs.retain(|a| a.name != "api");
        if let Some(s) = &opts.api_sock {
            n.attrs.push(palacios_vmm::config::node::Attr {
                name: "api".into(),
                value: s.display().to_string(),
                pos: None,
            });
        }
    }
    cfg
}
