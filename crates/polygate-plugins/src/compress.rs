//! Response compression: `gzip` (priority 995) and `brotli` (priority 996), with APISIX's
//! fields: `types` (`["text/html"]` by default, or `"*"`), `min_length` (20, against a known
//! `Content-Length`), `comp_level` (gzip 1–9, default 1; brotli 0–11, default 6),
//! `http_version` (1.1: HTTP/1.0 requests are not compressed), `vary`, and brotli's `mode`,
//! `lgwin`, `lgblock`; gzip's `buffers` is accepted. A response is compressed when the client
//! accepts the encoding (`q=0` refuses it), it is not encoded already and its type matches;
//! `Content-Length` is dropped and a strong `ETag` becomes weak.

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Version};
use parking_lot::Mutex;
use polygate_core::{ConfError, Plugin, PluginFactory, RequestCtx, ResponseHead};
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gzip,
    Brotli,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    types: Option<Value>,
    #[serde(default = "d20")]
    min_length: u64,
    comp_level: Option<u32>,
    http_version: Option<f64>,
    vary: Option<bool>,
    buffers: Option<Value>,
    mode: Option<u32>,
    lgwin: Option<u32>,
    lgblock: Option<u32>,
}

fn d20() -> u64 {
    20
}

struct Compress {
    kind: Kind,
    /// `None`: every type.
    types: Option<Vec<String>>,
    min_length: u64,
    level: u32,
    http10: bool,
    vary: bool,
    lgwin: u32,
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

/// This response's encoder, between `header_filter` and the last `body_filter`.
#[derive(Clone)]
struct Active(Kind, Arc<Mutex<Option<Encoder>>>);

/// Factory of `gzip` or `brotli`.
pub struct CompressFactory {
    kind: Kind,
}

impl CompressFactory {
    /// The `gzip` plugin.
    pub fn gzip() -> CompressFactory {
        CompressFactory { kind: Kind::Gzip }
    }

    /// The `brotli` plugin.
    pub fn brotli() -> CompressFactory {
        CompressFactory { kind: Kind::Brotli }
    }
}

impl PluginFactory for CompressFactory {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Gzip => "gzip",
            Kind::Brotli => "brotli",
        }
    }
    fn priority(&self) -> i32 {
        match self.kind {
            Kind::Gzip => 995,
            Kind::Brotli => 996,
        }
    }
    fn schema(&self) -> Value {
        let types = serde_json::json!({"anyOf": [
            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            {"enum": ["*"]}], "default": ["text/html"]});
        match self.kind {
            Kind::Gzip => serde_json::json!({"type": "object", "properties": {
                "types": types,
                "min_length": {"type": "integer", "minimum": 1, "default": 20},
                "comp_level": {"type": "integer", "minimum": 1, "maximum": 9, "default": 1},
                "http_version": {"enum": [1.1, 1.0], "default": 1.1},
                "buffers": {"type": "object"},
                "vary": {"type": "boolean"},
                "_meta": {"type": "object"}
            }, "additionalProperties": false}),
            Kind::Brotli => serde_json::json!({"type": "object", "properties": {
                "types": types,
                "min_length": {"type": "integer", "minimum": 1, "default": 20},
                "mode": {"type": "integer", "minimum": 0, "maximum": 2, "default": 0},
                "comp_level": {"type": "integer", "minimum": 0, "maximum": 11, "default": 6},
                "lgwin": {"type": "integer", "default": 19},
                "lgblock": {"type": "integer", "default": 0},
                "http_version": {"enum": [1.1, 1.0], "default": 1.1},
                "vary": {"type": "boolean"},
                "_meta": {"type": "object"}
            }, "additionalProperties": false}),
        }
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let types = match &c.types {
            None => Some(vec!["text/html".to_owned()]),
            Some(Value::String(s)) if s == "*" => None,
            Some(Value::Array(a)) if !a.is_empty() => Some(
                a.iter()
                    .map(|t| match t.as_str() {
                        Some(s) if !s.is_empty() => Ok(s.to_ascii_lowercase()),
                        _ => Err(ConfError::at("types", "must list non-empty strings")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(ConfError::at("types", "must be \"*\" or a list of types")),
        };
        if c.min_length < 1 {
            return Err(ConfError::at("min_length", "must be at least 1"));
        }
        let (level, range) = match self.kind {
            Kind::Gzip => (c.comp_level.unwrap_or(1), 1..=9),
            Kind::Brotli => (c.comp_level.unwrap_or(6), 0..=11),
        };
        if !range.contains(&level) {
            return Err(ConfError::at(
                "comp_level",
                format!("must be {} to {}", range.start(), range.end()),
            ));
        }
        let http10 = match c.http_version {
            None => false,
            Some(1.1) => false,
            Some(1.0) => true,
            Some(_) => return Err(ConfError::at("http_version", "must be 1.1 or 1.0")),
        };
        if self.kind == Kind::Gzip && (c.mode.is_some() || c.lgwin.is_some() || c.lgblock.is_some())
        {
            return Err(ConfError::whole(
                "mode, lgwin and lgblock are brotli's fields",
            ));
        }
        if self.kind == Kind::Brotli && c.buffers.is_some() {
            return Err(ConfError::at("buffers", "is gzip's field"));
        }
        if c.mode.is_some_and(|m| m > 2) {
            return Err(ConfError::at("mode", "must be 0 to 2"));
        }
        let lgwin = c.lgwin.unwrap_or(19);
        if lgwin != 0 && !(10..=24).contains(&lgwin) {
            return Err(ConfError::at("lgwin", "must be 0 or 10 to 24"));
        }
        if let Some(b) = c.lgblock
            && b != 0
            && !(16..=24).contains(&b)
        {
            return Err(ConfError::at("lgblock", "must be 0 or 16 to 24"));
        }
        Ok(Arc::new(Compress {
            kind: self.kind,
            types,
            min_length: c.min_length,
            level,
            http10,
            vary: c.vary.unwrap_or(false),
            lgwin: if lgwin == 0 { 22 } else { lgwin },
        }))
    }
}

/// Whether `Accept-Encoding` accepts `coding` (or `*`) with a non-zero weight.
fn accepts(header: &str, coding: &str) -> bool {
    header.split(',').any(|part| {
        let mut it = part.split(';');
        let name = it.next().unwrap_or("").trim();
        if !(name.eq_ignore_ascii_case(coding) || name == "*") {
            return false;
        }
        !it.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        })
    })
}

impl Plugin for Compress {
    fn name(&self) -> &str {
        match self.kind {
            Kind::Gzip => "gzip",
            Kind::Brotli => "brotli",
        }
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        let coding = match self.kind {
            Kind::Gzip => "gzip",
            Kind::Brotli => "br",
        };
        if !ctx
            .header("accept-encoding")
            .is_some_and(|h| accepts(h, coding))
        {
            return;
        }
        // another compression plugin (or the upstream) encoded it already
        if resp.headers.contains_key(http::header::CONTENT_ENCODING)
            || ctx.extensions.get::<Active>().is_some()
        {
            return;
        }
        if resp.status == http::StatusCode::NO_CONTENT
            || resp.status == http::StatusCode::NOT_MODIFIED
            || ctx.method == http::Method::HEAD
        {
            return;
        }
        let Some(ct) = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Some(types) = &self.types {
            let ct = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !types.contains(&ct) {
                return;
            }
        }
        let len = resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if len.is_some_and(|l| l < self.min_length) {
            return;
        }
        if ctx.version == Version::HTTP_10 && !self.http10 {
            return;
        }
        if self.vary {
            resp.headers.append(
                http::header::VARY,
                HeaderValue::from_static("Accept-Encoding"),
            );
        }
        let enc = match self.kind {
            Kind::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(self.level),
            )),
            Kind::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                self.level,
                self.lgwin,
            ))),
        };
        ctx.extensions
            .insert(Active(self.kind, Arc::new(Mutex::new(Some(enc)))));
        resp.headers.remove(http::header::CONTENT_LENGTH);
        resp.headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static(coding),
        );
        // the bytes change: a strong validator becomes weak
        if let Some(tag) = resp
            .headers
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        {
            if let Some(strong) = tag.strip_prefix('"').filter(|t| t.ends_with('"')) {
                if let Ok(v) = HeaderValue::from_str(&format!("W/\"{strong}")) {
                    resp.headers.insert(http::header::ETAG, v);
                }
            } else if !tag.starts_with("W/\"") {
                resp.headers.remove(http::header::ETAG);
            }
        }
    }

    fn has_body_filter(&self) -> bool {
        true
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        let state = match ctx.extensions.get::<Active>() {
            Some(Active(kind, state)) if *kind == self.kind => state.clone(),
            _ => return,
        };
        let mut guard = state.lock();
        let Some(enc) = guard.as_mut() else {
            *chunk = Bytes::new();
            return;
        };
        let written = match enc {
            Encoder::Gzip(g) => g.write_all(chunk),
            Encoder::Brotli(b) => b.write_all(chunk),
        };
        if let Err(e) = written {
            tracing::error!("{}: compression failed: {e}", self.name());
        }
        if eof {
            let out = match guard.take() {
                Some(Encoder::Gzip(g)) => g.finish().unwrap_or_default(),
                Some(Encoder::Brotli(b)) => b.into_inner(),
                None => Vec::new(),
            };
            *chunk = Bytes::from(out);
        } else {
            let out = match enc {
                Encoder::Gzip(g) => std::mem::take(g.get_mut()),
                Encoder::Brotli(b) => std::mem::take(b.get_mut()),
            };
            *chunk = Bytes::from(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding() {
        assert!(accepts("gzip, deflate, br", "br"));
        assert!(accepts("*", "gzip"));
        assert!(!accepts("gzip;q=0, br", "gzip"));
        assert!(accepts("gzip;q=0.5", "gzip"));
        assert!(!accepts("deflate", "gzip"));
    }
}
