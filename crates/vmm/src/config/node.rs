//! An owned configuration tree with source positions, and Palacios' value rule: a value is
//! either an attribute or the text of a child element of the same name, never both.

use super::{ConfigError, parse_number};

/// A 1-based line and column in the config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attr {
    pub name: String,
    pub value: String,
    pub pos: Option<Pos>,
}

/// One element of the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigNode {
    pub name: String,
    pub pos: Option<Pos>,
    pub attrs: Vec<Attr>,
    pub children: Vec<ConfigNode>,
    /// Concatenated text content, trimmed.
    pub text: String,
}

/// Elements nested deeper than this are refused (a config is shallow; this bounds recursion).
const MAX_DEPTH: usize = 64;

impl ConfigNode {
    /// A node built in code (no position).
    pub fn new(name: &str) -> Self {
        ConfigNode {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn with_attr(mut self, name: &str, value: impl Into<String>) -> Self {
        self.attrs.push(Attr {
            name: name.into(),
            value: value.into(),
            pos: None,
        });
        self
    }

    pub fn with_child(mut self, child: ConfigNode) -> Self {
        self.children.push(child);
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = text.into();
        self
    }

    /// Parse an XML document into its root node.
    pub fn parse_xml(text: &str) -> Result<ConfigNode, ConfigError> {
        let opts = roxmltree::ParsingOptions {
            allow_dtd: false,
            ..Default::default()
        };
        let doc = roxmltree::Document::parse_with_options(text, opts).map_err(|e| {
            let p = e.pos();
            ConfigError::new(
                Some(Pos {
                    line: p.row,
                    col: p.col,
                }),
                format!("malformed XML: {e}"),
            )
        })?;
        Self::from_xml(&doc, doc.root_element(), 0)
    }

    fn from_xml(
        doc: &roxmltree::Document,
        n: roxmltree::Node,
        depth: usize,
    ) -> Result<ConfigNode, ConfigError> {
        let pos_of = |off: usize| {
            let p = doc.text_pos_at(off);
            Some(Pos {
                line: p.row,
                col: p.col,
            })
        };
        if depth > MAX_DEPTH {
            return Err(ConfigError::new(
                pos_of(n.range().start),
                "elements nested too deeply",
            ));
        }
        let mut node = ConfigNode {
            name: n.tag_name().name().to_string(),
            pos: pos_of(n.range().start),
            ..Default::default()
        };
        for a in n.attributes() {
            if node.attrs.iter().any(|x| x.name == a.name()) {
                return Err(ConfigError::new(
                    pos_of(a.range().start),
                    format!("attribute '{}' given twice", a.name()),
                ));
            }
            node.attrs.push(Attr {
                name: a.name().into(),
                value: a.value().into(),
                pos: pos_of(a.range().start),
            });
        }
        let mut text = String::new();
        for c in n.children() {
            if c.is_element() {
                node.children.push(Self::from_xml(doc, c, depth + 1)?);
            } else if c.is_text() {
                text.push_str(c.text().unwrap_or(""));
            }
        }
        node.text = text.trim().to_string();
        Ok(node)
    }

    /// An error located at this node.
    pub fn err(&self, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(self.pos, msg)
    }

    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.name == name)
    }

    pub fn child(&self, name: &str) -> Option<&ConfigNode> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a, 'b>(
        &'a self,
        name: &'b str,
    ) -> impl Iterator<Item = &'a ConfigNode> + use<'a, 'b> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Palacios' rule: the value of `key` is the attribute `key` or the text of the child
    /// element `<key>`; both at once (or two such children) is an error.
    pub fn val<'a>(&'a self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        let attr = self.attr(key);
        let mut kids = self.children_named(key);
        let kid = kids.next();
        if let Some(second) = kids.next() {
            return Err(second.err(format!("<{key}> given more than once in <{}>", self.name)));
        }
        match (attr, kid) {
            (Some(a), Some(k)) => Err(ConfigError::new(
                k.pos.or(a.pos),
                format!(
                    "'{key}' of <{}> is given both as an attribute and as a child element; use one",
                    self.name
                ),
            )),
            (Some(a), None) => Ok(Some(a.value.as_str())),
            (None, Some(k)) => Ok(Some(k.text.as_str())),
            (None, None) => Ok(None),
        }
    }

    /// Where `key` was given (the attribute or the child), else this node.
    pub fn val_pos(&self, key: &str) -> Option<Pos> {
        self.attr(key)
            .and_then(|a| a.pos)
            .or_else(|| self.child(key).and_then(|c| c.pos))
            .or(self.pos)
    }

    /// An error located at `key`'s value.
    pub fn val_err(&self, key: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(self.val_pos(key), msg)
    }

    /// A required value.
    pub fn req(&self, key: &str) -> Result<&str, ConfigError> {
        self.val(key)?
            .ok_or_else(|| self.err(format!("<{}> needs '{key}'", self.name)))
    }

    /// A numeric value (decimal or 0x hex).
    pub fn num(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.val(key)? {
            None => Ok(None),
            Some(s) => parse_number(s).map(Some).ok_or_else(|| {
                self.val_err(
                    key,
                    format!("'{key}' of <{}> must be a number, not '{s}'", self.name),
                )
            }),
        }
    }

    /// Warn (and otherwise ignore) attributes not in `allowed`: for elements whose options
    /// are this project's own, where an unknown name is more likely a typo than an option
    /// from a newer Palacios. Returns the names warned about.
    pub fn warn_unknown_attrs(&self, allowed: &[&str]) -> Vec<String> {
        let mut warned = Vec::new();
        for a in &self.attrs {
            if !allowed.contains(&a.name.as_str()) {
                let e = ConfigError::new(
                    a.pos.or(self.pos),
                    format!(
                        "unknown attribute '{}' of <{}> is ignored{}",
                        a.name,
                        self.name,
                        if allowed.is_empty() {
                            String::new()
                        } else {
                            format!(" (known: {})", allowed.join(", "))
                        }
                    ),
                );
                tracing::warn!("config: {e}");
                warned.push(a.name.clone());
            }
        }
        warned
    }

    /// Refuse attributes and child elements not in `allowed` (`what` names the owner in the
    /// message, for example "device class SERIAL").
    pub fn check_options(&self, what: &str, allowed: &[&str]) -> Result<(), ConfigError> {
        let known = |n: &str| allowed.contains(&n);
        for a in &self.attrs {
            if !known(&a.name) {
                return Err(ConfigError::new(
                    a.pos.or(self.pos),
                    format!(
                        "unknown option '{}' for {what} (known: {})",
                        a.name,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        for c in &self.children {
            if !known(&c.name) {
                return Err(c.err(format!(
                    "unknown option '{}' for {what} (known: {})",
                    c.name,
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_from_attribute_or_child_but_not_both() {
        let n = ConfigNode::parse_xml("<d a=\"1\"><b> 2 </b><c x=\"1\">3</c></d>").unwrap();
        assert_eq!(n.val("a").unwrap(), Some("1"));
        assert_eq!(n.val("b").unwrap(), Some("2"));
        assert_eq!(n.val("z").unwrap(), None);
        let both = ConfigNode::parse_xml("<d a=\"1\">\n  <a>2</a></d>").unwrap();
        let e = both.val("a").unwrap_err();
        assert!(e.msg.contains("both"), "{e}");
        assert_eq!(e.pos, Some(Pos { line: 2, col: 3 }));
        let twice = ConfigNode::parse_xml("<d><a>1</a><a>2</a></d>").unwrap();
        assert!(twice.val("a").unwrap_err().msg.contains("more than once"));
    }

    #[test]
    fn malformed_xml_reports_position() {
        let e = ConfigNode::parse_xml("<vm>\n  <memory>1</mem>\n</vm>").unwrap_err();
        assert_eq!(e.pos.unwrap().line, 2);
        assert!(e.msg.contains("malformed XML"));
        assert!(ConfigNode::parse_xml("").is_err());
        assert!(ConfigNode::parse_xml("<!DOCTYPE x [<!ENTITY a \"b\">]><x>&a;</x>").is_err());
    }

    #[test]
    fn unknown_options_are_named() {
        let n = ConfigNode::parse_xml("<device class=\"X\" id=\"x\" speed=\"3\"/>").unwrap();
        let e = n
            .check_options("device class X", &["class", "id"])
            .unwrap_err();
        assert!(
            e.msg.contains("'speed'") && e.msg.contains("device class X"),
            "{e}"
        );
        assert_eq!(e.pos, Some(Pos { line: 1, col: 26 }));
    }

    #[test]
    fn numbers_are_checked() {
        let n = ConfigNode::parse_xml("<p start=\"0x3f8\" end=\"ten\"/>").unwrap();
        assert_eq!(n.num("start").unwrap(), Some(0x3f8));
        assert!(n.num("end").unwrap_err().msg.contains("must be a number"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let s = "<a>".repeat(200) + &"</a>".repeat(200);
        assert!(
            ConfigNode::parse_xml(&s)
                .unwrap_err()
                .msg
                .contains("deeply")
        );
    }
}
