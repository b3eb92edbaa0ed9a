//! The configuration file watcher: polls the file, and hands each new complete version to
//! the pipeline. It survives whatever the file holds (errors and panics are logged and
//! counted in [`crate::Status`]) and never stops on its own.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use polygate_model::env::Env;
use polygate_model::load::Format;

use crate::document::Document;
use crate::pipeline::{Pipeline, Target};

/// Reads a configuration file: its document, and its bytes (what a watcher compares).
pub fn read_file(
    path: &Path,
    env: &dyn Env,
) -> Result<(Document, Vec<u8>), polygate_model::ConfigErrors> {
    let bytes = std::fs::read(path).map_err(|e| cannot_read(path, &e))?;
    Ok((parse_bytes(path, &bytes, env)?, bytes))
}

fn cannot_read(path: &Path, e: &std::io::Error) -> polygate_model::ConfigErrors {
    polygate_model::ConfigErrors::one(polygate_model::ConfigError::new(
        "",
        format!("cannot read {}: {e}", path.display()),
    ))
}

/// Parses the bytes of the configuration file `path` (its name gives the format).
pub fn parse_bytes(
    path: &Path,
    bytes: &[u8],
    env: &dyn Env,
) -> Result<Document, polygate_model::ConfigErrors> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        polygate_model::ConfigErrors::one(polygate_model::ConfigError::new(
            "",
            format!("{} is not UTF-8: {e}", path.display()),
        ))
    })?;
    Document::parse(text, Format::from_path(path), env)
}

/// Watches `path` every `interval` for the life of the process, applying each changed
/// version through `pipeline`. `baseline` is the content already applied (so that a change
/// made between the first load and the watcher's start is not missed).
pub async fn watch_file<T: Target>(
    path: PathBuf,
    interval: Duration,
    pipeline: &Pipeline<T>,
    env: &dyn Env,
    baseline: Option<Vec<u8>>,
) {
    let origin = path.display().to_string();
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last_stamp = None;
    let mut last_content = baseline;
    let mut t = tokio::time::interval(interval.max(Duration::from_millis(10)));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let s = stamp(&path);
        if s == last_stamp {
            continue;
        }
        last_stamp = s;
        // the file is read once per change: compared, then parsed from these bytes
        let read = std::fs::read(&path);
        if read.as_ref().ok() == last_content.as_ref() {
            continue;
        }
        let started = std::time::Instant::now();
        let attempt = catch_unwind(AssertUnwindSafe(|| {
            match read
                .as_ref()
                .map_err(|e| cannot_read(&path, e))
                .and_then(|bytes| parse_bytes(&path, bytes, env))
            {
                Ok(doc) => pipeline.apply(&doc, &origin).map_err(|_| ()),
                Err(errs) => {
                    pipeline.reject(&origin, &errs);
                    Err(())
                }
            }
        }));
        last_content = read.ok();
        match attempt {
            Ok(Ok(a)) => tracing::info!(
                "configuration reloaded from {origin} ({} resources, {} skipped, {:?})",
                a.resources,
                a.skipped.0.len(),
                started.elapsed()
            ),
            Ok(Err(())) => {
                tracing::error!("{origin}: keeping the configuration served before this change");
            }
            Err(_) => {
                pipeline.source_failed(&origin, "the configuration watcher panicked; it goes on")
            }
        }
    }
}
