//! Reading a configuration file: format detection, APISIX's `#END` marker, `${{ENV}}`
//! substitution, and parsing with key paths in every error.

use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;

use crate::env::Env;
use crate::error::{ConfigError, ConfigErrors};
use crate::types::ConfigFile;

/// The file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML (`.yaml`, `.yml`, anything not `.json`). Must end with `#END`.
    Yaml,
    /// JSON (`.json`). No end marker.
    Json,
}

impl Format {
    /// Picks the format from a file name: `.json` is JSON, everything else YAML.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// APISIX loads a YAML file only if its last 10 bytes match `#END\s*$`, which guards
/// against half-written files.
pub fn has_end_marker(text: &str) -> bool {
    let bytes = text.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(10)..];
    let tail = String::from_utf8_lossy(tail);
    let trimmed = tail.trim_end();
    trimmed.ends_with("#END")
}

/// Parses configuration text (after `${{ENV}}` substitution).
pub fn parse_str(text: &str, format: Format, env: &dyn Env) -> Result<ConfigFile, ConfigErrors> {
    let text = substitute_env(text, env).map_err(ConfigErrors::one)?;
    match format {
        Format::Yaml => {
            let de = serde_yaml::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                ConfigErrors::one(ConfigError::new(
                    display_path(e.path()),
                    e.inner().to_string(),
                ))
            })
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(&mut de).map_err(|e| {
                ConfigErrors::one(ConfigError::new(
                    display_path(e.path()),
                    e.inner().to_string(),
                ))
            })
        }
    }
}

fn display_path(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." { String::new() } else { s }
}

fn env_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        #[allow(clippy::unwrap_used, reason = "constant pattern")]
        Regex::new(r"\$\{\{\s*([A-Za-z0-9_.\-]+)\s*(?::=\s*([^}]*?)\s*)?\}\}").unwrap()
    })
}

/// Replaces `${{NAME}}` and `${{NAME:=default}}` with the environment's values, as APISIX does
/// (on the raw text, so YAML quoting decides the resulting type).
pub fn substitute_env(text: &str, env: &dyn Env) -> Result<String, ConfigError> {
    let re = env_regex();
    if !text.contains("${{") {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for cap in re.captures_iter(text) {
        let Some(m) = cap.get(0) else { continue };
        out.push_str(&text[last..m.start()]);
        let name = cap.get(1).map(|m| m.as_str()).unwrap_or_default();
        match env.get(name) {
            Some(v) => out.push_str(&v),
            None => match cap.get(2) {
                Some(d) => out.push_str(d.as_str()),
                None => {
                    return Err(ConfigError::new(
                        "",
                        format!("can't find environment variable {name}"),
                    ));
                }
            },
        }
        last = m.end();
    }
    out.push_str(&text[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    #[test]
    fn end_marker() {
        assert!(has_end_marker("routes: []\n#END\n"));
        assert!(has_end_marker("routes: []\n#END"));
        assert!(!has_end_marker("routes: []\n"));
        assert!(!has_end_marker("#END\nroutes: []\n"));
    }

    #[test]
    fn env_substitution() {
        let env = MapEnv::from([("PORT", "1980")]);
        assert_eq!(
            substitute_env("a: ${{PORT}} b: ${{ HOST:=127.0.0.1 }}", &env).unwrap(),
            "a: 1980 b: 127.0.0.1"
        );
        let err = substitute_env("a: ${{NOPE}}", &env).unwrap_err();
        assert!(err.message.contains("NOPE"));
    }

    #[test]
    fn unknown_field_names_key_path() {
        let text = "routes:\n  - uri: /a\n    upstream:\n      nodez: {}\n#END\n";
        let err = parse_str(text, Format::Yaml, &MapEnv::default()).unwrap_err();
        let s = err.to_string();
        assert!(s.contains("routes[0].upstream"), "{s}");
        assert!(s.contains("nodez"), "{s}");
    }

    #[test]
    fn nodes_map_and_array() {
        let text = r#"{"upstreams":[{"id":1,"nodes":{"127.0.0.1:80":2}},{"id":"u2","nodes":[{"host":"a","port":81,"weight":3,"priority":-1}]}]}"#;
        let cfg = parse_str(text, Format::Json, &MapEnv::default()).unwrap();
        let n0 = &cfg.upstreams[0].nodes.as_ref().unwrap().0[0];
        assert_eq!(
            (n0.host.as_str(), n0.port, n0.weight),
            ("127.0.0.1", Some(80), 2)
        );
        let n1 = &cfg.upstreams[1].nodes.as_ref().unwrap().0[0];
        assert_eq!(n1.priority, -1);
        assert_eq!(cfg.upstreams[0].id.as_ref().unwrap().0, "1");
    }
}
