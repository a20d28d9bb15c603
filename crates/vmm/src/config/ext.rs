//! `<extensions>` and `<time>` (with per-core `khz`): Palacios' extension list and time control.

use super::{ConfigError, ConfigNode};

/// One `<extension name="...">`, with its subtree (the extension's own options).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtensionConfig {
    pub name: String,
    pub node: ConfigNode,
}

/// `<time>`: guest time relative to host time, and the guest TSC frequency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimeConfig {
    /// Guest time runs at 1/`dilation` of host time (1: real time).
    pub dilation: u32,
    /// Guest TSC frequency in kHz (`None`: the backend's).
    pub tsc_khz: Option<u64>,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            dilation: 1,
            tsc_khz: None,
        }
    }
}

/// Largest time dilation accepted.
pub const MAX_DILATION: u64 = 1000;

/// Parse `<extensions><extension name="X">...</extension>...</extensions>`.
pub fn parse_extensions(e: &ConfigNode) -> Result<Vec<ExtensionConfig>, ConfigError> {
    let mut out: Vec<ExtensionConfig> = Vec::new();
    for c in &e.children {
        if c.name != "extension" {
            return Err(c.err(format!(
                "unknown element <{}> in <extensions> (expected <extension name=\"...\">)",
                c.name
            )));
        }
        let name = c.req("name")?.trim().to_string();
        if name.is_empty() {
            return Err(c.val_err("name", "<extension name> is empty"));
        }
        if out.iter().any(|x| x.name == name) {
            return Err(c.val_err("name", format!("extension '{name}' is listed twice")));
        }
        out.push(ExtensionConfig {
            name,
            node: c.clone(),
        });
    }
    Ok(out)
}

/// Parse `<time source=".." dilation=".." khz=".."/>` and the `khz` of `<cores><core>`.
pub fn parse_time(
    time: Option<&ConfigNode>,
    cores: Option<&ConfigNode>,
) -> Result<TimeConfig, ConfigError> {
    let mut t = TimeConfig::default();
    if let Some(n) = time {
        n.check_options("<time>", &["source", "dilation", "khz", "follow_host_time"])?;
        if let Some(s) = n.val("source")? {
            if !matches!(s.trim(), "tsc" | "host") {
                return Err(n.val_err(
                    "source",
                    format!("<time source> must be 'tsc' or 'host', not '{s}'"),
                ));
            }
        }
        if let Some(d) = n.num("dilation")? {
            if d == 0 || d > MAX_DILATION {
                return Err(n.val_err(
                    "dilation",
                    format!("<time dilation> must be 1 to {MAX_DILATION}, not {d}"),
                ));
            }
            t.dilation = d as u32;
        }
        t.tsc_khz = khz(n)?;
    }
    if let Some(c) = cores {
        for core in c.children_named("core") {
            let Some(k) = khz(core)? else { continue };
            match t.tsc_khz {
                Some(prev) if prev != k => {
                    return Err(core.val_err(
                        "khz",
                        format!(
                            "cores with different TSC frequencies ({prev} and {k} kHz) are not supported: give every core the same khz"
                        ),
                    ));
                }
                _ => t.tsc_khz = Some(k),
            }
        }
    }
    Ok(t)
}

/// VSched reservations: `<core period=".." slice="..">` in µs (Palacios' EDF scheduler), with
/// `<cores period slice>` as the default for cores that give none. Admission control over
/// the VM's set is part of the check.
pub fn parse_sched(
    cores: Option<&ConfigNode>,
    count: u32,
) -> Result<Vec<Option<crate::sched::Reservation>>, ConfigError> {
    let one = |n: &ConfigNode| -> Result<Option<crate::sched::Reservation>, ConfigError> {
        match (n.num("period")?, n.num("slice")?) {
            (None, None) => Ok(None),
            (Some(period_us), Some(slice_us)) => {
                let r = crate::sched::Reservation {
                    period_us,
                    slice_us,
                };
                r.check().map_err(|e| n.val_err("slice", e))?;
                Ok(Some(r))
            }
            _ => Err(n.err("a reservation needs both period and slice (µs)")),
        }
    };
    let Some(c) = cores else {
        return Ok(Vec::new());
    };
    let default = one(c)?;
    let mut out = vec![default; count as usize];
    for (i, core) in c.children_named("core").enumerate() {
        if let (Some(slot), Some(r)) = (out.get_mut(i), one(core)?) {
            *slot = Some(r);
        }
    }
    if out.iter().all(Option::is_none) {
        return Ok(Vec::new());
    }
    let set: Vec<(u32, crate::sched::Reservation)> = out
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i as u32, r)))
        .collect();
    crate::sched::admit(&set).map_err(|e| c.err(e))?;
    Ok(out)
}

/// `<schedule_hz>N</schedule_hz>` (Palacios' scheduling rate): 1 to 10000.
pub fn parse_schedule_hz(n: Option<&ConfigNode>) -> Result<Option<u32>, ConfigError> {
    let Some(n) = n else { return Ok(None) };
    let hz: u32 = n
        .text
        .trim()
        .parse()
        .map_err(|_| n.err(format!("<schedule_hz> must be a number, not '{}'", n.text)))?;
    if !(1..=10_000).contains(&hz) {
        return Err(n.err(format!("<schedule_hz> must be 1 to 10000, not {hz}")));
    }
    Ok(Some(hz))
}

/// `<perftune><group name="yield"><strategy>friendly|greedy|adaptive</strategy>
/// <threshold>µs</threshold><time>µs</time></group></perftune>`; other groups are ignored.
pub fn parse_perftune(n: Option<&ConfigNode>) -> Result<crate::sched::YieldPolicy, ConfigError> {
    use crate::sched::{YieldPolicy, YieldStrategy};
    let mut p = YieldPolicy {
        strategy: YieldStrategy::Friendly,
        threshold_us: 1000,
        time_us: 1000,
    };
    let Some(n) = n else { return Ok(p) };
    for g in n.children_named("group") {
        if g.attr("name").map(|a| a.value.as_str()) != Some("yield") {
            tracing::warn!(
                "<perftune>: group {:?} is not used",
                g.attr("name").map(|a| &a.value)
            );
            continue;
        }
        g.check_options(
            "<perftune> yield group",
            &["name", "strategy", "threshold", "time"],
        )?;
        p.strategy = match g.val("strategy")?.map(str::trim) {
            None | Some("friendly") => YieldStrategy::Friendly,
            Some("greedy") => YieldStrategy::Greedy,
            Some("adaptive") => YieldStrategy::Adaptive,
            Some(o) => {
                return Err(g.val_err(
                    "strategy",
                    format!("the yield strategy is friendly, greedy or adaptive, not '{o}'"),
                ));
            }
        };
        for (key, slot) in [("threshold", &mut p.threshold_us), ("time", &mut p.time_us)] {
            if let Some(v) = g.num(key)? {
                if !(1..=10_000_000).contains(&v) {
                    return Err(g.val_err(key, format!("{key} is 1 to 10000000 µs, not {v}")));
                }
                *slot = v;
            }
        }
    }
    Ok(p)
}

fn khz(n: &ConfigNode) -> Result<Option<u64>, ConfigError> {
    match n.num("khz")? {
        Some(k) if !(1_000..=100_000_000).contains(&k) => Err(n.val_err(
            "khz",
            format!("khz must be 1000 to 100000000 (1 MHz to 100 GHz), not {k}"),
        )),
        k => Ok(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> ConfigNode {
        ConfigNode::parse_xml(s).unwrap()
    }

    #[test]
    fn extensions_keep_their_subtree_and_refuse_duplicates() {
        let e = parse_extensions(&node(
            r#"<extensions><extension name="MTRRS"/><extension name="inspector"><x a="1"/></extension></extensions>"#,
        ))
        .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].node.child("x").unwrap().attr("a").unwrap().value, "1");
        let err = parse_extensions(&node(
            r#"<extensions><extension name="A"/><extension name="A"/></extensions>"#,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        let err =
            parse_extensions(&node(r#"<extensions><ext name="A"/></extensions>"#)).unwrap_err();
        assert!(err.to_string().contains("expected <extension"), "{err}");
    }

    #[test]
    fn sched_reservations_default_override_and_admission() {
        let c = node(
            r#"<cores count="3" period="20000" slice="5000"><core period="10000" slice="3000"/><core/><core/></cores>"#,
        );
        let r = parse_sched(Some(&c), 3).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].unwrap().slice_us, 3000);
        assert_eq!(r[1].unwrap().period_us, 20000);
        assert!(parse_sched(None, 2).unwrap().is_empty());
        assert!(
            parse_sched(Some(&node(r#"<cores count="1"><core/></cores>"#)), 1)
                .unwrap()
                .is_empty()
        );
        let e =
            parse_sched(Some(&node(r#"<cores><core period="10000"/></cores>"#)), 1).unwrap_err();
        assert!(e.to_string().contains("both period and slice"), "{e}");
        let e = parse_sched(
            Some(&node(
                r#"<cores><core period="10000" slice="20000"/></cores>"#,
            )),
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("slice"), "{e}");
        // More full-time cores than the host can give real-time work.
        let (limit, _) = crate::sched::host_limit();
        let n = limit.ceil() as u32 + 1;
        let many = node(&format!(
            r#"<cores count="{n}" period="10000" slice="10000"/>"#
        ));
        let e = parse_sched(Some(&many), n).unwrap_err();
        assert!(e.to_string().contains("the reservations need"), "{e}");
    }

    #[test]
    fn schedule_hz_and_perftune() {
        use crate::sched::YieldStrategy;
        assert_eq!(parse_schedule_hz(None).unwrap(), None);
        assert_eq!(
            parse_schedule_hz(Some(&node("<schedule_hz>100</schedule_hz>"))).unwrap(),
            Some(100)
        );
        assert!(parse_schedule_hz(Some(&node("<schedule_hz>0</schedule_hz>"))).is_err());
        assert!(parse_schedule_hz(Some(&node("<schedule_hz>x</schedule_hz>"))).is_err());
        let p = parse_perftune(Some(&node(
            r#"<perftune><group name="yield"><strategy>adaptive</strategy><threshold>500</threshold><time>200</time></group><group name="other"/></perftune>"#,
        )))
        .unwrap();
        assert_eq!(
            (p.strategy, p.threshold_us, p.time_us),
            (YieldStrategy::Adaptive, 500, 200)
        );
        assert_eq!(
            parse_perftune(None).unwrap().strategy,
            YieldStrategy::Friendly
        );
        let e = parse_perftune(Some(&node(
            r#"<perftune><group name="yield"><strategy>lazy</strategy></group></perftune>"#,
        )))
        .unwrap_err();
        assert!(
            e.to_string().contains("friendly, greedy or adaptive"),
            "{e}"
        );
    }

    #[test]
    fn time_dilation_and_khz() {
        let t = parse_time(Some(&node(r#"<time source="tsc" dilation="2"/>"#)), None).unwrap();
        assert_eq!((t.dilation, t.tsc_khz), (2, None));
        let cores = node(r#"<cores count="2"><core khz="1500000"/><core khz="1500000"/></cores>"#);
        assert_eq!(
            parse_time(None, Some(&cores)).unwrap().tsc_khz,
            Some(1_500_000)
        );
        let bad = node(r#"<cores count="2"><core khz="1500000"/><core khz="1000000"/></cores>"#);
        assert!(
            parse_time(None, Some(&bad))
                .unwrap_err()
                .to_string()
                .contains("same khz")
        );
        for bad in [
            r#"<time dilation="0"/>"#,
            r#"<time dilation="5000"/>"#,
            r#"<time source="x"/>"#,
            r#"<time khz="5"/>"#,
        ] {
            assert!(parse_time(Some(&node(bad)), None).is_err(), "{bad}");
        }
    }
}
