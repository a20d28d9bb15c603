//! `v3 concord`: ConCORD's queries and collective commands (docs/concord.md).
//!
//! ```text
//! v3 concord [--directory D] entities                     entities the directory knows
//! v3 concord [--directory D] copies HASH                  copies of a content, and where
//! v3 concord [--directory D] sharing [ENTITY..] [-k K]    degree of sharing, intra/inter host
//! v3 concord [--directory D] checkpoint --store DIR VM..  collective checkpoint
//! v3 concord [--directory D] serve                        run an embedded directory alone
//! v3 concord status VM | sync VM.. | page VM GPA          one VM's tracker
//! ```
//! D is `embedded` (default), `unix:PATH` or `redis://HOST:PORT[,..]`.

use std::time::Duration;

use palacios_concord::spec::DirSpec;
use serde_json::Value;

use crate::status;

#[derive(clap::Args, Debug)]
pub struct ConcordArgs {
    /// The content directory: embedded (this host's), unix:PATH or redis://HOST:PORT[,..].
    #[arg(long, default_value = "embedded")]
    pub directory: String,
    #[command(subcommand)]
    pub cmd: ConcordCmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum ConcordCmd {
    /// The entities (VMs) the directory knows, with their hosts and page counts.
    Entities,
    /// How many copies of a content exist, and which entities hold them.
    Copies {
        hash: String,
        /// Ask this many times on one connection and add the latency (µs) to the answer.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Degree of sharing among ENTITIES (all if none): total and distinct pages, sharing
    /// within and across hosts, and the contents with at least K copies.
    Sharing {
        entities: Vec<String>,
        #[arg(short, long, default_value_t = 2)]
        k: u32,
        /// List this many of the most copied contents.
        #[arg(long, default_value_t = 10)]
        list: usize,
        /// Ask this many times on one connection and add the latency (µs) to the answer.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Checkpoint VMs together into one store (each distinct page once); each restores
    /// alone with `v3 load STORE/NAME.vm`.
    Checkpoint {
        #[arg(long)]
        store: std::path::PathBuf,
        /// Stop the VMs after the save.
        #[arg(long)]
        stop: bool,
        vms: Vec<String>,
    },
    /// Serve an embedded directory from this process (until killed).
    Serve,
    /// A VM's tracker: rounds, pages, directory connection.
    Status { vm: String },
    /// Finish a tracking round that starts now, in each VM.
    Sync { vms: Vec<String> },
    /// The content hash of one guest page.
    Page { vm: String, gpa: String },
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn vm_api(vm: &str, method: &str, path: &str) -> Result<Value, String> {
    let sock = palacios_api::resolve(vm);
    match palacios_api::request(&sock, method, path, None, Duration::from_secs(60)) {
        Ok((200, v)) => Ok(v),
        Ok((code, v)) => Err(format!(
            "{vm}: {} (HTTP {code})",
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("request refused")
        )),
        Err(e) => Err(format!("{vm}: {e}")),
    }
}

/// Run `q` `repeat` times (at least once); with more than one, the answer gets
/// `latency_us`: min, median and max over the runs.
fn timed(
    repeat: u32,
    mut q: impl FnMut() -> Result<Value, String>,
) -> Result<Option<Value>, String> {
    let mut lat = Vec::new();
    let mut last = Value::Null;
    for _ in 0..repeat.max(1) {
        let t = std::time::Instant::now();
        last = q()?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    if repeat > 1 {
        lat.sort_by(f64::total_cmp);
        last["latency_us"] = serde_json::json!({
            "runs": lat.len(),
            "min": lat[0],
            "median": lat[lat.len() / 2],
            "max": lat[lat.len() - 1],
        });
    }
    Ok(Some(last))
}

/// Run the verb; returns the exit status.
pub fn run(a: &ConcordArgs) -> u8 {
    match run_inner(a) {
        Ok(v) => {
            if let Some(v) = v {
                print(&v);
            }
            status::OK
        }
        Err(e) => {
            eprintln!("v3 concord: {e}");
            status::CONFIG_ERROR
        }
    }
}

fn run_inner(a: &ConcordArgs) -> Result<Option<Value>, String> {
    let spec = DirSpec::parse(&a.directory)?;
    let dir = || spec.open(false);
    use palacios_concord::query;
    match &a.cmd {
        ConcordCmd::Entities => {
            let v = dir().entities().map_err(|e| e.to_string())?;
            Ok(Some(serde_json::to_value(v).unwrap_or_default()))
        }
        ConcordCmd::Copies { hash, repeat } => {
            let h = palacios_concord::parse_hash(hash)
                .ok_or_else(|| format!("'{hash}' is not a content hash (16 hex digits)"))?;
            let mut d = dir();
            timed(*repeat, || {
                query::copies(d.as_mut(), h).map_err(|e| e.to_string())
            })
        }
        ConcordCmd::Sharing {
            entities,
            k,
            list,
            repeat,
        } => {
            let mut d = dir();
            timed(*repeat, || {
                query::sharing(d.as_mut(), entities, *k, *list)
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .map_err(|e| e.to_string())
            })
        }
        ConcordCmd::Checkpoint { store, stop, vms } => {
            let store = std::path::absolute(store).map_err(|e| e.to_string())?;
            let svc = palacios_concord::collective::CollectiveCheckpoint { store, stop: *stop };
            let api_of = |n: &str| palacios_api::socket_for_name(n).display().to_string();
            let (out, rep) = palacios_concord::service::run(dir().as_mut(), vms, &api_of, &svc)?;
            let mut out = out;
            out["plan"] = serde_json::to_value(&rep.plan).unwrap_or_default();
            Ok(Some(out))
        }
        ConcordCmd::Serve => {
            let DirSpec::Unix(p) = &spec else {
                return Err(
                    "serve runs an embedded directory: give --directory unix:PATH or embedded"
                        .into(),
                );
            };
            let s = palacios_concord::embedded::Server::try_start(p)
                .map_err(|e| format!("cannot serve at {}: {e}", p.display()))?
                .ok_or_else(|| format!("another process serves {} already", p.display()))?;
            println!("ConCORD directory serving at {}", s.path.display());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        ConcordCmd::Status { vm } => vm_api(vm, "GET", "/vm/concord").map(Some),
        ConcordCmd::Sync { vms } => {
            let mut out = serde_json::Map::new();
            for vm in vms {
                out.insert(vm.clone(), vm_api(vm, "PUT", "/vm/concord/sync")?);
            }
            Ok(Some(Value::Object(out)))
        }
        ConcordCmd::Page { vm, gpa } => {
            vm_api(vm, "GET", &format!("/vm/concord/page?gpa={gpa}")).map(Some)
        }
    }
}
