//! Content-aware service commands, run in ConCORD's two phases:
//!
//! 1. **collective**: every distinct content of the chosen entities, as the directory knows
//!    them, is handed to exactly one entity that holds it (spread evenly);
//! 2. **local**: every entity then handles whatever the collective phase did not cover for it
//!    (contents the directory did not know yet, pages changed meanwhile, entities the
//!    directory could not read).
//!
//! The directory may lag, so only the local phase makes the result complete; the collective
//! phase makes it cheap. A service implements [`ContentService`]; [`run`] drives it, with the
//! entities of each phase served in parallel.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::directory::{DirError, Directory};

/// One entity taking part.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Participant {
    pub name: String,
    pub host: String,
    /// Its control-API socket.
    pub api: String,
    /// Whether the directory could give its contents.
    pub known: bool,
}

/// Who handles which content in the collective phase.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Plan {
    pub participants: Vec<Participant>,
    /// Entity name → the contents it handles.
    #[serde(skip)]
    pub assignment: BTreeMap<String, Vec<u64>>,
    /// Distinct contents assigned.
    pub distinct: u64,
    /// Pages the directory lists for the participants (all copies).
    pub pages: u64,
}

/// What one entity did in one phase.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PhaseResult {
    pub handled: u64,
    /// Assigned but not handled (left to the local phase).
    pub missed: u64,
    pub ms: u64,
    /// Whatever else the service reports.
    pub detail: serde_json::Value,
}

/// A content-aware service.
pub trait ContentService: Sync {
    type Output;
    /// Before anything runs.
    fn init(&self, plan: &Plan) -> Result<(), String>;
    /// Collective phase: `entity` handles these contents (no other entity gets them).
    fn per_content(&self, entity: &Participant, contents: &[u64]) -> Result<PhaseResult, String>;
    /// Local phase: `entity` handles what is left of its own content.
    fn local(&self, entity: &Participant, plan: &Plan) -> Result<PhaseResult, String>;
    /// After both phases.
    fn finalize(&self, report: &RunReport) -> Result<Self::Output, String>;
}

/// How a run went.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub plan: Plan,
    pub collective: BTreeMap<String, PhaseResult>,
    pub local: BTreeMap<String, PhaseResult>,
    pub collective_ms: u64,
    pub local_ms: u64,
    pub total_ms: u64,
}

/// Make the plan: each distinct content goes to the holder with the fewest so far.
pub fn plan(
    dir: &mut dyn Directory,
    names: &[String],
    api_of: &dyn Fn(&str) -> String,
) -> Result<Plan, DirError> {
    let known: HashMap<String, crate::EntityInfo> = dir
        .entities()
        .map(|v| v.into_iter().map(|e| (e.name.clone(), e)).collect())
        .unwrap_or_default();
    let mut p = Plan::default();
    let mut holders: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for name in names {
        let info = known.get(name);
        let contents = dir.contents(name).ok();
        let i = p.participants.len();
        p.participants.push(Participant {
            name: name.clone(),
            host: info.map(|e| e.host.clone()).unwrap_or_default(),
            api: info
                .map(|e| e.api.clone())
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| api_of(name)),
            known: contents.is_some(),
        });
        for (h, c) in contents.unwrap_or_default() {
            p.pages += c as u64;
            holders.entry(h).or_default().push(i);
        }
        p.assignment.insert(name.clone(), Vec::new());
    }
    let mut load = vec![0u64; p.participants.len()];
    for (h, hs) in holders {
        let Some(&best) = hs.iter().min_by_key(|&&i| (load[i], i)) else {
            continue;
        };
        load[best] += 1;
        let name = &p.participants[best].name;
        if let Some(v) = p.assignment.get_mut(name) {
            v.push(h);
        }
        p.distinct += 1;
    }
    Ok(p)
}

fn timed(f: impl FnOnce() -> Result<PhaseResult, String>) -> Result<PhaseResult, String> {
    let t = Instant::now();
    let mut r = f()?;
    r.ms = t.elapsed().as_millis() as u64;
    Ok(r)
}

/// Run `svc` over the entities `names` in the two phases.
pub fn run<S: ContentService>(
    dir: &mut dyn Directory,
    names: &[String],
    api_of: &dyn Fn(&str) -> String,
    svc: &S,
) -> Result<(S::Output, RunReport), String> {
    let t0 = Instant::now();
    if names.is_empty() {
        return Err("name at least one entity".into());
    }
    let plan = plan(dir, names, api_of).map_err(|e| e.to_string())?;
    svc.init(&plan)?;
    let mut rep = RunReport {
        plan: plan.clone(),
        ..Default::default()
    };
    let t1 = Instant::now();
    let results: Vec<(String, Result<PhaseResult, String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = plan
            .participants
            .iter()
            .map(|p| {
                let contents = plan.assignment.get(&p.name).cloned().unwrap_or_default();
                (
                    p.name.clone(),
                    s.spawn(move || timed(|| svc.per_content(p, &contents))),
                )
            })
            .collect();
        hs.into_iter()
            .map(|(n, h)| (n, h.join().unwrap_or_else(|_| Err("panicked".into()))))
            .collect()
    });
    for (n, r) in results {
        // A failed collective share is not fatal: the local phase covers it.
        let r = r.unwrap_or_else(|e| PhaseResult {
            missed: plan.assignment.get(&n).map_or(0, |v| v.len() as u64),
            detail: serde_json::json!({ "error": e }),
            ..Default::default()
        });
        rep.collective.insert(n, r);
    }
    rep.collective_ms = t1.elapsed().as_millis() as u64;
    let t2 = Instant::now();
    let results: Vec<(String, Result<PhaseResult, String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = plan
            .participants
            .iter()
            .map(|p| (p.name.clone(), s.spawn(|| timed(|| svc.local(p, &plan)))))
            .collect();
        hs.into_iter()
            .map(|(n, h)| (n, h.join().unwrap_or_else(|_| Err("panicked".into()))))
            .collect()
    });
    let mut errors = Vec::new();
    for (n, r) in results {
        match r {
            Ok(r) => {
                rep.local.insert(n, r);
            }
            Err(e) => errors.push(format!("{n}: {e}")),
        }
    }
    rep.local_ms = t2.elapsed().as_millis() as u64;
    rep.total_ms = t0.elapsed().as_millis() as u64;
    if !errors.is_empty() {
        return Err(format!("the local phase failed: {}", errors.join("; ")));
    }
    let out = svc.finalize(&rep)?;
    Ok((out, rep))
}

/// Poll `f` until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Table;
    use std::sync::Mutex;

    use crate::directory::LocalDir;

    /// A "collect every distinct content once" service over entities whose real contents
    /// differ from what the directory says (stale tracking).
    struct Collect {
        real: HashMap<String, Vec<u64>>,
        got: Mutex<Vec<(String, u64)>>,
    }
    impl ContentService for Collect {
        type Output = Vec<u64>;
        fn init(&self, _: &Plan) -> Result<(), String> {
            Ok(())
        }
        fn per_content(&self, e: &Participant, c: &[u64]) -> Result<PhaseResult, String> {
            let mut r = PhaseResult::default();
            for h in c {
                if self.real[&e.name].contains(h) {
                    self.got.lock().unwrap().push((e.name.clone(), *h));
                    r.handled += 1;
                } else {
                    r.missed += 1;
                }
            }
            Ok(r)
        }
        fn local(&self, e: &Participant, _: &Plan) -> Result<PhaseResult, String> {
            let mut r = PhaseResult::default();
            let mut g = self.got.lock().unwrap();
            for h in &self.real[&e.name] {
                if !g.iter().any(|x| x.1 == *h) {
                    g.push((e.name.clone(), *h));
                    r.handled += 1;
                }
            }
            Ok(r)
        }
        fn finalize(&self, _: &RunReport) -> Result<Vec<u64>, String> {
            let mut v: Vec<u64> = self.got.lock().unwrap().iter().map(|x| x.1).collect();
            v.sort();
            Ok(v)
        }
    }

    #[test]
    fn each_content_once_and_the_local_phase_catches_what_tracking_missed() {
        let mut d = LocalDir(Table::default(), vec![]);
        // The directory's (stale) view: a has 1,2,3; b has 2,3,4; c is unknown.
        d.publish("a", "h", "", true, &[(1, 1), (2, 1), (3, 1)])
            .unwrap();
        d.publish("b", "h", "", true, &[(2, 1), (3, 1), (4, 1)])
            .unwrap();
        // Reality: a changed 3 into 5; c holds 6 and 2.
        let real: HashMap<String, Vec<u64>> = [
            ("a".to_string(), vec![1, 2, 5]),
            ("b".to_string(), vec![2, 3, 4]),
            ("c".to_string(), vec![6, 2]),
        ]
        .into_iter()
        .collect();
        let svc = Collect {
            real,
            got: Mutex::new(vec![]),
        };
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let (out, rep) = run(&mut d, &names, &|n| format!("/{n}"), &svc).unwrap();
        assert_eq!(out, vec![1, 2, 3, 4, 5, 6], "every content exactly once");
        assert_eq!(rep.plan.distinct, 4);
        // Spread: a and b share 2 and 3, so each got two of 1..4.
        assert_eq!(rep.plan.assignment["a"].len(), 2);
        assert_eq!(rep.plan.assignment["b"].len(), 2);
        assert!(!rep.plan.participants[2].known);
        assert_eq!(rep.plan.participants[2].api, "/c");
        let local: u64 = rep.local.values().map(|r| r.handled).sum();
        assert!(local >= 2, "5 and 6 come from the local phase: {rep:?}");
    }
}
