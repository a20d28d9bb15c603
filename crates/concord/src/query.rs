//! ConCORD's queries, over any [`Directory`]: how many copies of a content exist and where;
//! over a set of entities, the degree of sharing (all pages against distinct contents), how
//! much of it is within a host and how much across hosts, and the contents with at least k
//! copies. An entity the directory cannot read (a Redis master that is down) is left out and
//! named in `unreachable`; an entity whose last update is older than `stale_ms` is named in
//! `stale`. Answers are as current as the directory (a tracking round behind the guests).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

use crate::directory::{DirError, Directory, EntityInfo};

/// An entity counts as stale when its last update is older than this (trackers publish at
/// least every second).
pub const STALE_MS: u64 = 5_000;

/// Copies of content `hash` and who holds them.
pub fn copies(dir: &mut dyn Directory, hash: u64) -> Result<Value, DirError> {
    let holders = dir.holders(hash)?;
    let hosts: HashMap<String, String> = dir
        .entities()
        .map(|v| v.into_iter().map(|e| (e.name, e.host)).collect())
        .unwrap_or_default();
    let total: u64 = holders.iter().map(|h| h.1 as u64).sum();
    Ok(json!({
        "hash": crate::hex(hash),
        "copies": total,
        "entities": holders.iter().map(|(e, c)| json!({
            "entity": e,
            "host": hosts.get(e).cloned().unwrap_or_default(),
            "copies": c,
        })).collect::<Vec<_>>(),
        "directory": dir.describe(),
    }))
}

/// The answer of [`sharing`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sharing {
    pub entities: Vec<EntityInfo>,
    /// Asked for, but not in the directory.
    pub missing: Vec<String>,
    /// In the directory, but their contents could not be read.
    pub unreachable: Vec<String>,
    /// Entities whose last update is older than [`STALE_MS`].
    pub stale: Vec<String>,
    /// Pages of all entities read.
    pub total: u64,
    /// Distinct contents among them.
    pub distinct: u64,
    /// total / distinct.
    pub degree: f64,
    /// Pages whose content is all zero (they are in `total`; the zero page is one of `distinct`).
    pub zero_pages: u64,
    pub nonzero_total: u64,
    pub nonzero_distinct: u64,
    /// Pages that duplicate another page of the same host (total - distinct, host by host).
    pub intra_host: u64,
    /// Pages that duplicate only a page of another host. intra_host + inter_host =
    /// total - distinct.
    pub inter_host: u64,
    /// Distinct contents held by two entities or more.
    pub shared_contents: u64,
    /// The k asked for, and the distinct contents with at least k copies.
    pub k: u32,
    pub at_least_k: u64,
    /// Up to `list` of them, most copies first: (hash, copies, entities holding it).
    pub top: Vec<(String, u64, u32)>,
}

/// Sharing among `names` (every entity if empty).
pub fn sharing(
    dir: &mut dyn Directory,
    names: &[String],
    k: u32,
    list: usize,
) -> Result<Sharing, DirError> {
    let all = dir.entities()?;
    let mut s = Sharing {
        k,
        ..Default::default()
    };
    let chosen: Vec<EntityInfo> = if names.is_empty() {
        all
    } else {
        let by: HashMap<&str, &EntityInfo> = all.iter().map(|e| (e.name.as_str(), e)).collect();
        names
            .iter()
            .filter_map(|n| {
                let e = by.get(n.as_str()).map(|e| (*e).clone());
                if e.is_none() {
                    s.missing.push(n.clone());
                }
                e
            })
            .collect()
    };
    let zero = crate::zero_hash();
    // hash → (copies, entities, hosts)
    let mut per: HashMap<u64, (u64, u32, HashSet<String>)> = HashMap::new();
    let mut per_host: BTreeMap<String, (u64, HashSet<u64>)> = BTreeMap::new();
    for e in chosen {
        let c = match dir.contents(&e.name) {
            Ok(c) => c,
            Err(DirError::NoEntity(_)) => {
                s.missing.push(e.name.clone());
                continue;
            }
            Err(_) => {
                s.unreachable.push(e.name.clone());
                continue;
            }
        };
        if e.age_ms > STALE_MS {
            s.stale.push(e.name.clone());
        }
        let hs = per_host.entry(e.host.clone()).or_default();
        for (&h, &n) in &c {
            let x = per.entry(h).or_default();
            x.0 += n as u64;
            x.1 += 1;
            x.2.insert(e.host.clone());
            hs.0 += n as u64;
            hs.1.insert(h);
            s.total += n as u64;
            if h == zero {
                s.zero_pages += n as u64;
            }
        }
        s.entities.push(e);
    }
    s.distinct = per.len() as u64;
    s.degree = if s.distinct == 0 {
        0.0
    } else {
        s.total as f64 / s.distinct as f64
    };
    s.nonzero_total = s.total - s.zero_pages;
    s.nonzero_distinct = s.distinct - per.contains_key(&zero) as u64;
    s.intra_host = per_host
        .values()
        .map(|(t, d)| t - d.len() as u64)
        .sum::<u64>();
    s.inter_host = (s.total - s.distinct) - s.intra_host;
    s.shared_contents = per.values().filter(|x| x.1 >= 2).count() as u64;
    let mut top: Vec<(u64, u64, u32)> = per
        .iter()
        .filter(|(_, x)| x.0 >= k as u64)
        .map(|(h, x)| (*h, x.0, x.1))
        .collect();
    s.at_least_k = top.len() as u64;
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    s.top = top
        .into_iter()
        .take(list)
        .map(|(h, c, e)| (crate::hex(h), c, e))
        .collect();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Table;

    use crate::directory::LocalDir as Local;

    #[test]
    fn sharing_splits_redundancy_by_host() {
        let z = crate::zero_hash();
        let mut d = Local(Table::default(), vec![]);
        // a, b on h1; c on h2. Content 1 everywhere, 2 twice in a, 3 in b and c, zeros.
        d.publish("a", "h1", "", true, &[(1, 1), (2, 2), (z, 5)])
            .unwrap();
        d.publish("b", "h1", "", true, &[(1, 1), (3, 1)]).unwrap();
        d.publish("c", "h2", "", true, &[(1, 1), (3, 1), (z, 1)])
            .unwrap();
        let s = sharing(&mut d, &[], 2, 10).unwrap();
        assert_eq!((s.total, s.distinct), (13, 4));
        assert_eq!(
            (s.zero_pages, s.nonzero_total, s.nonzero_distinct),
            (6, 7, 3)
        );
        // h1: 10 pages, 4 distinct → 6 within h1; h2: 3 pages, 3 distinct. 13 - 4 = 9 in all.
        assert_eq!((s.intra_host, s.inter_host), (6, 3));
        assert_eq!(s.shared_contents, 3); // 1, 3 and zero
        assert_eq!(s.at_least_k, 4);
        assert_eq!(s.top[0], (crate::hex(z), 6, 2));
        let c = copies(&mut d, 1).unwrap();
        assert_eq!(c["copies"], 3);
        assert_eq!(c["entities"][2]["host"], "h2");
        // One entity unreadable, one unknown: answered over the rest, and both named.
        d.1.push("c".into());
        let s = sharing(&mut d, &["a".into(), "c".into(), "x".into()], 1, 0).unwrap();
        assert_eq!(s.unreachable, vec!["c"]);
        assert_eq!(s.missing, vec!["x"]);
        assert_eq!(s.total, 8);
    }
}
