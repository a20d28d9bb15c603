//! The content directory: content hash → the entities (VMs) holding it, and each entity's
//! contents. Two implementations: [`crate::embedded`] (a table served on a host-wide Unix
//! socket by whichever VM process started first, nothing to install) and
//! [`crate::redis_dir`] (Redis Cluster, for many hosts). The directory is best effort: it
//! lags the guests by a tracking round, and a part that is down makes answers partial, never
//! wrong about what it does report.

use std::collections::HashMap;
use std::time::Instant;

use crate::wire::{Reply, Request};

/// One entity as the directory knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntityInfo {
    pub name: String,
    pub host: String,
    /// Its control-API socket (collective commands reach it there), or empty.
    pub api: String,
    /// Pages it holds (the sum of its counts).
    pub pages: u64,
    /// Milliseconds since its last update reached the directory.
    pub age_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("the content directory is unreachable: {0}")]
    Unavailable(String),
    #[error("the content directory refused the request: {0}")]
    Refused(String),
    #[error("no entity '{0}' in the content directory")]
    NoEntity(String),
}

/// A content directory, as a client sees it.
pub trait Directory: Send {
    /// Where it is (for messages).
    fn describe(&self) -> String;
    /// Set entity `entity`'s counts of the listed contents (0 removes one); with `full`,
    /// these are all of its contents.
    fn publish(
        &mut self,
        entity: &str,
        host: &str,
        api: &str,
        full: bool,
        updates: &[(u64, u32)],
    ) -> Result<(), DirError>;
    fn entities(&mut self) -> Result<Vec<EntityInfo>, DirError>;
    /// (entity, copies) of a content hash.
    fn holders(&mut self, hash: u64) -> Result<Vec<(String, u32)>, DirError>;
    /// An entity's contents: hash → copies.
    fn contents(&mut self, entity: &str) -> Result<HashMap<u64, u32>, DirError>;
    fn remove(&mut self, entity: &str) -> Result<(), DirError>;
    /// Whether this client's process serves the directory (embedded).
    fn hosting(&self) -> bool {
        false
    }
}

struct Entity {
    host: String,
    api: String,
    contents: HashMap<u64, u32>,
    pages: u64,
    updated: Instant,
}

/// The in-memory directory the embedded server keeps.
#[derive(Default)]
pub struct Table {
    entities: HashMap<String, Entity>,
    holders: HashMap<u64, HashMap<String, u32>>,
}

impl Table {
    fn set(&mut self, entity: &str, hash: u64, count: u32) {
        let Some(e) = self.entities.get_mut(entity) else {
            return;
        };
        let old = if count == 0 {
            e.contents.remove(&hash).unwrap_or(0)
        } else {
            e.contents.insert(hash, count).unwrap_or(0)
        };
        e.pages = e.pages - old as u64 + count as u64;
        if count == 0 {
            if let Some(h) = self.holders.get_mut(&hash) {
                h.remove(entity);
                if h.is_empty() {
                    self.holders.remove(&hash);
                }
            }
        } else {
            self.holders
                .entry(hash)
                .or_default()
                .insert(entity.to_string(), count);
        }
    }

    fn drop_entity(&mut self, entity: &str) -> bool {
        let Some(e) = self.entities.remove(entity) else {
            return false;
        };
        for h in e.contents.keys() {
            if let Some(m) = self.holders.get_mut(h) {
                m.remove(entity);
                if m.is_empty() {
                    self.holders.remove(h);
                }
            }
        }
        true
    }

    /// Carry out one request.
    pub fn apply(&mut self, req: Request) -> Reply {
        match req {
            Request::Publish {
                entity,
                host,
                api,
                full,
                updates,
            } => {
                if entity.is_empty() {
                    return Reply::Error("an update needs an entity name".into());
                }
                if full {
                    self.drop_entity(&entity);
                }
                let e = self.entities.entry(entity.clone()).or_insert(Entity {
                    host: String::new(),
                    api: String::new(),
                    contents: HashMap::new(),
                    pages: 0,
                    updated: Instant::now(),
                });
                e.host = host;
                e.api = api;
                e.updated = Instant::now();
                for (h, c) in updates {
                    self.set(&entity, h, c);
                }
                Reply::Ok
            }
            Request::Entities => {
                let mut v: Vec<EntityInfo> = self
                    .entities
                    .iter()
                    .map(|(n, e)| EntityInfo {
                        name: n.clone(),
                        host: e.host.clone(),
                        api: e.api.clone(),
                        pages: e.pages,
                        age_ms: e.updated.elapsed().as_millis() as u64,
                    })
                    .collect();
                v.sort_by(|a, b| a.name.cmp(&b.name));
                Reply::Json(serde_json::to_value(v).unwrap_or_default())
            }
            Request::Holders(h) => {
                let mut v: Vec<(String, u32)> = self
                    .holders
                    .get(&h)
                    .map(|m| m.iter().map(|(e, c)| (e.clone(), *c)).collect())
                    .unwrap_or_default();
                v.sort();
                Reply::Json(serde_json::to_value(v).unwrap_or_default())
            }
            Request::Contents(e) => match self.entities.get(&e) {
                Some(x) => Reply::Contents(x.contents.iter().map(|(h, c)| (*h, *c)).collect()),
                None => Reply::Error(format!("no entity '{e}'")),
            },
            Request::Remove(e) => {
                self.drop_entity(&e);
                Reply::Ok
            }
        }
    }

    /// Distinct contents known.
    pub fn distinct(&self) -> usize {
        self.holders.len()
    }
}

/// A directory over an in-process [`Table`] for unit tests; entities named in `down` cannot
/// be read (as behind a Redis master that is down).
#[cfg(test)]
pub(crate) struct LocalDir(pub Table, pub Vec<String>);

#[cfg(test)]
impl Directory for LocalDir {
    fn describe(&self) -> String {
        "local".into()
    }
    fn publish(
        &mut self,
        entity: &str,
        host: &str,
        api: &str,
        full: bool,
        updates: &[(u64, u32)],
    ) -> Result<(), DirError> {
        self.0.apply(Request::Publish {
            entity: entity.into(),
            host: host.into(),
            api: api.into(),
            full,
            updates: updates.to_vec(),
        });
        Ok(())
    }
    fn entities(&mut self) -> Result<Vec<EntityInfo>, DirError> {
        match self.0.apply(Request::Entities) {
            Reply::Json(v) => {
                serde_json::from_value(v).map_err(|e| DirError::Refused(e.to_string()))
            }
            r => Err(DirError::Refused(format!("{r:?}"))),
        }
    }
    fn holders(&mut self, hash: u64) -> Result<Vec<(String, u32)>, DirError> {
        match self.0.apply(Request::Holders(hash)) {
            Reply::Json(v) => {
                serde_json::from_value(v).map_err(|e| DirError::Refused(e.to_string()))
            }
            r => Err(DirError::Refused(format!("{r:?}"))),
        }
    }
    fn contents(&mut self, entity: &str) -> Result<HashMap<u64, u32>, DirError> {
        if self.1.iter().any(|d| d == entity) {
            return Err(DirError::Unavailable("down".into()));
        }
        match self.0.apply(Request::Contents(entity.into())) {
            Reply::Contents(v) => Ok(v.into_iter().collect()),
            _ => Err(DirError::NoEntity(entity.into())),
        }
    }
    fn remove(&mut self, entity: &str) -> Result<(), DirError> {
        self.0.apply(Request::Remove(entity.into()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(t: &mut Table, e: &str, full: bool, u: &[(u64, u32)]) {
        assert_eq!(
            t.apply(Request::Publish {
                entity: e.into(),
                host: "h".into(),
                api: String::new(),
                full,
                updates: u.to_vec(),
            }),
            Reply::Ok
        );
    }

    #[test]
    fn counts_are_absolute_and_full_publish_replaces() {
        let mut t = Table::default();
        publish(&mut t, "a", true, &[(1, 3), (2, 1)]);
        publish(&mut t, "b", true, &[(1, 1)]);
        // Applying the same update twice changes nothing.
        publish(&mut t, "a", false, &[(2, 0), (3, 2)]);
        publish(&mut t, "a", false, &[(2, 0), (3, 2)]);
        let Reply::Json(h) = t.apply(Request::Holders(1)) else {
            panic!()
        };
        assert_eq!(h, serde_json::json!([["a", 3], ["b", 1]]));
        assert_eq!(t.distinct(), 2);
        publish(&mut t, "a", true, &[(9, 1)]);
        let Reply::Json(h) = t.apply(Request::Holders(1)) else {
            panic!()
        };
        assert_eq!(h, serde_json::json!([["b", 1]]));
        let Reply::Contents(c) = t.apply(Request::Contents("a".into())) else {
            panic!()
        };
        assert_eq!(c, vec![(9, 1)]);
        let Reply::Json(e) = t.apply(Request::Entities) else {
            panic!()
        };
        assert_eq!(e[0]["pages"], 1);
        t.apply(Request::Remove("b".into()));
        assert_eq!(t.distinct(), 1);
    }
}
