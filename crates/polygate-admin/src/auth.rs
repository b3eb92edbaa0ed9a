//! Who may use the Admin API: the `allow_admin` address list, then a key (`X-API-KEY`, the
//! `api_key` query argument or the `x_api_key` cookie) with its role, as APISIX checks them.
//! There is no default key: without configured keys, one is generated on first start and
//! stored in a file only its owner can read (APISIX's fixed default key was CVE-2020-13945).

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use polygate_model::{AdminKey, AdminRole, AdminSettings};

/// Why the Admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("admin key file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// No place to keep a generated key.
    #[error(
        "no admin key is configured and there is no directory for a generated one: set gateway.admin.admin_key or gateway.admin.key_file"
    )]
    NoPlace,
}

/// The keys in force, and the allowed client networks.
#[derive(Debug, Clone)]
pub struct Access {
    keys: Vec<AdminKey>,
    allow: Vec<ipnet::IpNet>,
}

/// What a request's credentials allow.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Allowed,
    /// 401 with this description (`missing apikey`, `wrong apikey`,
    /// `invalid method for role viewer`).
    Refused(&'static str),
}

/// The default place of a generated key: `$XDG_STATE_HOME/polygate/admin_key`, else
/// `$HOME/.local/state/polygate/admin_key`.
pub fn default_key_file() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("polygate/admin_key"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/polygate/admin_key"))
}

fn random_key() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Reads the key stored at `path`, or generates one and stores it there (mode 0600).
/// Returns the key and whether it was generated now.
pub fn stored_key(path: &Path) -> Result<(String, bool), KeyError> {
    let err = |source| KeyError::File {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(k) if k.trim().len() >= 8 => {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(m) = std::fs::metadata(path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    "admin key file {} can be read by others (mode {:o}); chmod 600 it",
                    path.display(),
                    m.permissions().mode() & 0o777
                );
            }
            return Ok((k.trim().to_owned(), false));
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file holds no key (8 characters or more)",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let key = random_key().map_err(err)?;
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt as _;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            // another process generated it meanwhile: use that one
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return stored_key(path);
            }
            Err(e) => return Err(err(e)),
        }
    };
    f.write_all(format!("{key}\n").as_bytes()).map_err(err)?;
    Ok((key, true))
}

impl Access {
    /// The access rules of `settings`; generates and stores a key when none is configured.
    pub fn from_settings(settings: &AdminSettings) -> Result<Access, KeyError> {
        let mut keys = settings.admin_key.clone();
        if keys.is_empty() {
            let path = match &settings.key_file {
                Some(p) => PathBuf::from(p),
                None => default_key_file().ok_or(KeyError::NoPlace)?,
            };
            let (key, generated) = stored_key(&path)?;
            if generated {
                tracing::warn!(
                    "no admin key configured: generated one and stored it in {} (mode 0600); send it as X-API-KEY",
                    path.display()
                );
            } else {
                tracing::info!("admin key: the one stored in {}", path.display());
            }
            keys.push(AdminKey {
                name: "generated".into(),
                key,
                role: AdminRole::Admin,
            });
        }
        let allow = settings
            .allow_admin
            .iter()
            .filter_map(|c| polygate_model::validate::parse_cidr(c))
            .collect();
        Ok(Access { keys, allow })
    }

    /// Rules with these keys and networks (tests, embedders).
    pub fn new(keys: Vec<AdminKey>, allow: Vec<ipnet::IpNet>) -> Access {
        Access { keys, allow }
    }

    /// Whether a client at `ip` may reach the Admin API at all.
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Checks the key a request presents for `method`.
    pub fn check(&self, presented: Option<&str>, method: &http::Method) -> Verdict {
        let Some(token) = presented else {
            return Verdict::Refused("missing apikey");
        };
        let Some(k) = self
            .keys
            .iter()
            .find(|k| ct_eq(k.key.as_bytes(), token.as_bytes()))
        else {
            return Verdict::Refused("wrong apikey");
        };
        if k.role == AdminRole::Viewer && method != http::Method::GET {
            return Verdict::Refused("invalid method for role viewer");
        }
        Verdict::Allowed
    }
}

/// Compares without stopping at the first difference.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key a request presents: `?api_key=`, then `X-API-KEY`, then the `x_api_key` cookie
/// (APISIX's order).
pub fn presented_key<'a>(query: Option<&'a str>, headers: &'a http::HeaderMap) -> Option<String> {
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("api_key=") {
                return Some(
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
            }
        }
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.to_owned());
    }
    for c in headers.get_all(http::header::COOKIE) {
        let Ok(c) = c.to_str() else { continue };
        for part in c.split(';') {
            if let Some(v) = part.trim().strip_prefix("x_api_key=") {
                return Some(v.to_owned());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(
            vec![
                AdminKey {
                    name: "a".into(),
                    key: "edd1c9f034335f136f87ad84b625c8f1".into(),
                    role: AdminRole::Admin,
                },
                AdminKey {
                    name: "v".into(),
                    key: "4054f7cf07e344346cd3f287985e76a2".into(),
                    role: AdminRole::Viewer,
                },
            ],
            vec!["127.0.0.0/24".parse().unwrap()],
        )
    }

    #[test]
    fn keys_and_roles() {
        let a = access();
        assert_eq!(
            a.check(None, &http::Method::GET),
            Verdict::Refused("missing apikey")
        );
        assert_eq!(
            a.check(Some("nope"), &http::Method::GET),
            Verdict::Refused("wrong apikey")
        );
        assert_eq!(
            a.check(Some("4054f7cf07e344346cd3f287985e76a2"), &http::Method::GET),
            Verdict::Allowed
        );
        assert_eq!(
            a.check(Some("4054f7cf07e344346cd3f287985e76a2"), &http::Method::PUT),
            Verdict::Refused("invalid method for role viewer")
        );
        assert_eq!(
            a.check(
                Some("edd1c9f034335f136f87ad84b625c8f1"),
                &http::Method::DELETE
            ),
            Verdict::Allowed
        );
    }

    #[test]
    fn addresses() {
        let a = access();
        assert!(a.address_allowed("127.0.0.1".parse().unwrap()));
        assert!(a.address_allowed("::ffff:127.0.0.9".parse().unwrap()));
        assert!(!a.address_allowed("127.0.1.1".parse().unwrap()));
        assert!(!a.address_allowed("::1".parse().unwrap()));
    }

    #[test]
    fn the_three_places_of_a_key() {
        let mut h = http::HeaderMap::new();
        assert_eq!(
            presented_key(Some("a=1&api_key=k%31"), &h).as_deref(),
            Some("k1")
        );
        h.insert("cookie", "x=1; x_api_key=k2".parse().unwrap());
        assert_eq!(presented_key(None, &h).as_deref(), Some("k2"));
        h.insert("x-api-key", "k3".parse().unwrap());
        assert_eq!(presented_key(None, &h).as_deref(), Some("k3"));
    }

    #[test]
    fn a_generated_key_is_stored_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("polygate-key-{}", std::process::id()));
        let path = dir.join("sub/admin_key");
        let (k, generated) = stored_key(&path).unwrap();
        assert!(generated);
        assert_eq!(k.len(), 32);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, generated) = stored_key(&path).unwrap();
        assert_eq!((again, generated), (k, false));
        let _ = std::fs::remove_dir_all(dir);
    }
}
