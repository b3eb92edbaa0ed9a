//! Configuration errors, each tagged with the key path it concerns.

use std::fmt;

/// One problem in a configuration, e.g. `routes[3].upstream.nodes: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Key path in the file (`routes[3].upstream.nodes`); empty for whole-file problems.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// A reference to a resource that does not exist (`upstream_id` naming no upstream). In
    /// APISIX's standalone mode such a resource is still loaded and fails at request time, so
    /// the gateway serves it; `polygate validate` and `--strict` report it.
    pub dangling: bool,
}

impl ConfigError {
    /// Creates an error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
            dangling: false,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All problems found in one configuration (validation collects them rather than stopping at
/// the first).
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// A list with one error.
    pub fn one(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }

    /// Adds an error.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(path, message));
    }

    /// Adds a dangling-reference error ([`ConfigError::dangling`]).
    pub fn push_dangling(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let mut e = ConfigError::new(path, message);
        e.dangling = true;
        self.0.push(e);
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when empty, the errors otherwise.
    pub fn into_result(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
