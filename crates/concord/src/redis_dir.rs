//! The content directory on Redis Cluster (Debian's `redis-server`, three or more masters):
//! the distributed engine ConCORD's own DHT stood for. The VMM processes stay where
//! collective work runs; Redis only keeps the mapping.
//!
//! Keys (hash-slot spread by Redis Cluster):
//! - `concord:c:HASH`: a Redis hash, entity → copies of content `HASH` (16 hex digits);
//! - `concord:e:ENTITY`: a Redis hash, content → copies, the entity's contents;
//! - `concord:r{N}` for N in 0..8: the entity registry (entity → JSON: host, API socket, pages,
//!   time of the last update), written in eight copies whose hash tags spread them over the
//!   cluster's slots, so losing one master leaves the registry readable.
//!
//! Every write sets an absolute count (HSET, or HDEL for zero), so a publish that failed half
//! way can simply be sent again. A master that is down makes the keys in its slots
//! unreachable: publishes report an error (the tracker sends everything again later) and
//! queries report which entities they could not read.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::cluster::{ClusterClient, ClusterConnection, cluster_pipe};

use crate::directory::{DirError, Directory, EntityInfo};

const REGISTRY_COPIES: usize = 8;
/// Commands per pipeline round trip.
const PIPE: usize = 4096;

pub struct RedisDirectory {
    nodes: Vec<String>,
    client: Option<ClusterClient>,
    conn: Option<ClusterConnection>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unavailable(e: redis::RedisError) -> DirError {
    DirError::Unavailable(format!("Redis Cluster: {e}"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Reg {
    host: String,
    api: String,
    pages: u64,
    at_ms: u64,
}

impl RedisDirectory {
    /// `nodes`: `host:port` of one or more cluster nodes (the rest are discovered).
    pub fn new(nodes: Vec<String>) -> Self {
        RedisDirectory {
            nodes,
            client: None,
            conn: None,
        }
    }

    fn conn(&mut self) -> Result<&mut ClusterConnection, DirError> {
        if self.conn.is_none() {
            if self.client.is_none() {
                let urls: Vec<String> =
                    self.nodes.iter().map(|n| format!("redis://{n}/")).collect();
                let c = ClusterClient::builder(urls)
                    .retries(1)
                    .connection_timeout(Duration::from_millis(800))
                    .response_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(unavailable)?;
                self.client = Some(c);
            }
            let c = self
                .client
                .as_ref()
                .ok_or_else(|| DirError::Unavailable("no client".into()))?
                .get_connection()
                .map_err(unavailable)?;
            self.conn = Some(c);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| DirError::Unavailable("not connected".into()))
    }

    /// Run pipelines of commands built by `add` for each item; every chunk is tried, and the
    /// first error is returned at the end.
    fn run_chunks<T>(
        &mut self,
        items: &[T],
        add: impl Fn(&mut redis::cluster::ClusterPipeline, &T),
    ) -> Result<(), DirError> {
        let mut first_err = None;
        for chunk in items.chunks(PIPE) {
            let mut p = cluster_pipe();
            for it in chunk {
                add(&mut p, it);
            }
            let conn = self.conn()?;
            if let Err(e) = p.exec(conn) {
                if e.is_io_error() || e.is_connection_dropped() {
                    self.conn = None;
                }
                first_err.get_or_insert(unavailable(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn registry(&mut self) -> Result<HashMap<String, Reg>, DirError> {
        let mut out: HashMap<String, Reg> = HashMap::new();
        let mut last_err = None;
        let mut answered = 0;
        for n in 0..REGISTRY_COPIES {
            let conn = self.conn()?;
            let r: redis::RedisResult<HashMap<String, String>> = redis::cmd("HGETALL")
                .arg(format!("concord:r{{{n}}}"))
                .query(conn);
            match r {
                Ok(m) => {
                    answered += 1;
                    for (k, v) in m {
                        let Ok(reg) = serde_json::from_str::<Reg>(&v) else {
                            continue;
                        };
                        if out.get(&k).is_none_or(|o| o.at_ms < reg.at_ms) {
                            out.insert(k, reg);
                        }
                    }
                }
                Err(e) => last_err = Some(e),
            }
        }
        match (answered, last_err) {
            (0, Some(e)) => Err(unavailable(e)),
            _ => Ok(out),
        }
    }
}

impl Directory for RedisDirectory {
    fn describe(&self) -> String {
        format!("redis://{}", self.nodes.join(","))
    }

    fn publish(
        &mut self,
        entity: &str,
        host: &str,
        api: &str,
        full: bool,
        updates: &[(u64, u32)],
    ) -> Result<(), DirError> {
        let ekey = format!("concord:e:{entity}");
        let mut updates = updates.to_vec();
        if full {
            // Contents the directory still lists but the entity no longer has.
            let old: HashMap<String, String> = {
                let conn = self.conn()?;
                redis::cmd("HGETALL")
                    .arg(&ekey)
                    .query(conn)
                    .map_err(unavailable)?
            };
            let have: std::collections::HashSet<u64> = updates.iter().map(|u| u.0).collect();
            for k in old.keys() {
                if let Some(h) = crate::parse_hash(k)
                    && !have.contains(&h)
                {
                    updates.push((h, 0));
                }
            }
        }
        let e = entity.to_string();
        self.run_chunks(&updates, |p, &(h, c)| {
            let ck = format!("concord:c:{}", crate::hex(h));
            if c == 0 {
                p.hdel(ck, &e).ignore();
            } else {
                p.hset(ck, &e, c).ignore();
            }
        })?;
        // The entity's own hash, in chunks of fields.
        let (sets, dels): (Vec<_>, Vec<_>) = updates.iter().partition(|u| u.1 > 0);
        let sets: Vec<(String, u32)> = sets.iter().map(|&&(h, c)| (crate::hex(h), c)).collect();
        let dels: Vec<String> = dels.iter().map(|&&(h, _)| crate::hex(h)).collect();
        let chunks: Vec<&[(String, u32)]> = sets.chunks(1024).collect();
        self.run_chunks(&chunks, |p, c| {
            p.hset_multiple(&ekey, c).ignore();
        })?;
        let dchunks: Vec<&[String]> = dels.chunks(1024).collect();
        self.run_chunks(&dchunks, |p, c| {
            p.hdel(&ekey, *c).ignore();
        })?;
        let pages: u64 = {
            let conn = self.conn()?;
            let vals: Vec<u32> = redis::cmd("HVALS")
                .arg(&ekey)
                .query(conn)
                .map_err(unavailable)?;
            vals.iter().map(|&v| v as u64).sum()
        };
        let reg = serde_json::to_string(&Reg {
            host: host.into(),
            api: api.into(),
            pages,
            at_ms: now_ms(),
        })
        .unwrap_or_default();
        // Every copy of the registry that can be reached is written.
        let copies: Vec<usize> = (0..REGISTRY_COPIES).collect();
        let mut ok = 0;
        for n in copies {
            let conn = self.conn()?;
            let r: redis::RedisResult<()> = redis::cmd("HSET")
                .arg(format!("concord:r{{{n}}}"))
                .arg(entity)
                .arg(&reg)
                .query(conn);
            ok += r.is_ok() as usize;
        }
        if ok == 0 {
            return Err(DirError::Unavailable(
                "no copy of the entity registry is reachable".into(),
            ));
        }
        Ok(())
    }

    fn entities(&mut self) -> Result<Vec<EntityInfo>, DirError> {
        let now = now_ms();
        let mut v: Vec<EntityInfo> = self
            .registry()?
            .into_iter()
            .map(|(name, r)| EntityInfo {
                name,
                host: r.host,
                api: r.api,
                pages: r.pages,
                age_ms: now.saturating_sub(r.at_ms),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    fn holders(&mut self, hash: u64) -> Result<Vec<(String, u32)>, DirError> {
        let conn = self.conn()?;
        let m: HashMap<String, u32> = redis::cmd("HGETALL")
            .arg(format!("concord:c:{}", crate::hex(hash)))
            .query(conn)
            .map_err(unavailable)?;
        let mut v: Vec<(String, u32)> = m.into_iter().collect();
        v.sort();
        Ok(v)
    }

    fn contents(&mut self, entity: &str) -> Result<HashMap<u64, u32>, DirError> {
        let conn = self.conn()?;
        let m: HashMap<String, u32> = redis::cmd("HGETALL")
            .arg(format!("concord:e:{entity}"))
            .query(conn)
            .map_err(unavailable)?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| crate::parse_hash(&k).map(|h| (h, v)))
            .collect())
    }

    fn remove(&mut self, entity: &str) -> Result<(), DirError> {
        let old = self.contents(entity)?;
        let dels: Vec<u64> = old.into_keys().collect();
        let e = entity.to_string();
        self.run_chunks(&dels, |p, h| {
            p.hdel(format!("concord:c:{}", crate::hex(*h)), &e).ignore();
        })?;
        let ekey = format!("concord:e:{entity}");
        let conn = self.conn()?;
        let _: () = redis::cmd("DEL")
            .arg(&ekey)
            .query(conn)
            .map_err(unavailable)?;
        for n in 0..REGISTRY_COPIES {
            let conn = self.conn()?;
            let _: redis::RedisResult<()> = redis::cmd("HDEL")
                .arg(format!("concord:r{{{n}}}"))
                .arg(entity)
                .query(conn);
        }
        Ok(())
    }
}
