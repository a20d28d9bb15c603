//! The collective checkpoint: N VMs checkpointed together into one `shared` store
//! ([`palacios_checkpoint::shared`]), each distinct page written once.
//!
//! - init: the store directory is made (it must be new, empty, or an earlier shared store);
//! - collective phase: each VM writes the contents assigned to it into its own segment while
//!   it keeps running (`PUT /vm/concord/collect`); a page that changed since it was hashed is
//!   skipped;
//! - local phase: each VM is saved to `STORE/NAME.vm` through the `shared` store
//!   (`PUT /snapshot/create`): it is paused, every page is looked up by content, and only
//!   pages the store does not hold yet are written. This is what makes the checkpoint exact
//!   whatever the directory knew;
//! - finalize: `STORE/manifest.json` lists the VMs and the figures.
//!
//! Each VM restores alone with `v3 load STORE/NAME.vm`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::service::{ContentService, Participant, PhaseResult, Plan, RunReport};

pub struct CollectiveCheckpoint {
    pub store: PathBuf,
    /// Stop each VM after its save (else it goes on running).
    pub stop: bool,
}

fn api(
    sock: &str,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let (st, v) = palacios_api::request(
        Path::new(sock),
        method,
        path,
        Some(&body),
        Duration::from_secs(600),
    )
    .map_err(|e| format!("{sock}: {e}"))?;
    if st != 200 {
        return Err(format!(
            "{path}: {}",
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or(&v.to_string())
        ));
    }
    Ok(v)
}

/// Whether `dir` holds only what a shared store holds.
fn is_store_or_empty(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return true;
    };
    rd.flatten().all(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n.starts_with("seg-")
            || n.ends_with(".vm")
            || n.starts_with(".assign-")
            || n == "manifest.json"
            || n.starts_with('.')
    })
}

impl ContentService for CollectiveCheckpoint {
    type Output = serde_json::Value;

    fn init(&self, _plan: &Plan) -> Result<(), String> {
        if !self.store.is_absolute() {
            return Err("the store path must be absolute".into());
        }
        if !is_store_or_empty(&self.store) {
            return Err(format!(
                "{} holds other files: name a new directory (or an earlier shared store)",
                self.store.display()
            ));
        }
        std::fs::create_dir_all(&self.store)
            .map_err(|e| format!("create {}: {e}", self.store.display()))
    }

    fn per_content(&self, e: &Participant, contents: &[u64]) -> Result<PhaseResult, String> {
        let zero = crate::zero_hash();
        let list: Vec<u8> = contents
            .iter()
            .filter(|&&h| h != zero)
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let f = self.store.join(format!(".assign-{}", e.name));
        std::fs::write(&f, &list).map_err(|e| format!("write {}: {e}", f.display()))?;
        let v = api(
            &e.api,
            "PUT",
            "/vm/concord/collect",
            json!({ "store": self.store, "list": f }),
        );
        let _ = std::fs::remove_file(&f);
        let v = v?;
        Ok(PhaseResult {
            handled: v["written"].as_u64().unwrap_or(0),
            missed: v["missing"].as_u64().unwrap_or(0) + v["changed"].as_u64().unwrap_or(0),
            ms: 0,
            detail: v,
        })
    }

    fn local(&self, e: &Participant, _plan: &Plan) -> Result<PhaseResult, String> {
        let path = self.store.join(format!("{}.vm", e.name));
        let v = api(
            &e.api,
            "PUT",
            "/snapshot/create",
            json!({ "path": path, "store": "shared", "stop": self.stop }),
        )?;
        Ok(PhaseResult {
            handled: v["stored_bytes"].as_u64().unwrap_or(0) / 4096,
            missed: 0,
            ms: 0,
            detail: v,
        })
    }

    fn finalize(&self, rep: &RunReport) -> Result<serde_json::Value, String> {
        let usage = palacios_checkpoint::shared::store_usage(&self.store)
            .map_err(|e| format!("measure the store: {e}"))?;
        let ix =
            palacios_checkpoint::shared::PageIndex::load(&self.store).map_err(|e| e.to_string())?;
        let guest_pages: u64 = rep.local.values().map(|r| r.handled).sum();
        let m = json!({
            "store": self.store,
            "vms": rep.plan.participants.iter().map(|p| json!({
                "entity": p.name,
                "checkpoint": self.store.join(format!("{}.vm", p.name)),
                "collective": rep.collective.get(&p.name),
                "local": rep.local.get(&p.name),
            })).collect::<Vec<_>>(),
            "nonzero_guest_pages": guest_pages,
            "stored_pages": ix.pages(),
            "store_bytes": usage,
            "directory_distinct": rep.plan.distinct,
            "collective_ms": rep.collective_ms,
            "local_ms": rep.local_ms,
            "total_ms": rep.total_ms,
        });
        let p = self.store.join("manifest.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&m).unwrap_or_default())
            .map_err(|e| format!("write {}: {e}", p.display()))?;
        Ok(m)
    }
}
