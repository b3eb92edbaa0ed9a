//! Plugins that answer or shape a request without an upstream decision, with APISIX's
//! fields, priorities and answers:
//!
//! | plugin | priority | phases |
//! |---|---|---|
//! | `request-id` | 12015 | rewrite, header_filter |
//! | `fault-injection` | 11000 | rewrite |
//! | `mocking` | 10900 | access |
//! | `redirect` | 900 | rewrite |
//! | `echo` | 412 | header_filter, body_filter |

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use polygate_core::{
    ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx, ResponseHead,
};
use polygate_router::{Expr, VarSource};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::util::{Template, nginx_replacement, parse_conf};

fn header_pairs(
    v: &Option<serde_json::Map<String, Value>>,
    path: &str,
) -> Result<Vec<(HeaderName, Template)>, ConfError> {
    let mut out = Vec::new();
    if let Some(m) = v {
        if m.is_empty() {
            return Err(ConfError::at(
                path,
                "expect object to have at least 1 properties",
            ));
        }
        for (k, val) in m {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ConfError::at(format!("{path}.{k}"), "invalid header name"))?;
            let text = match val {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => {
                    return Err(ConfError::at(
                        format!("{path}.{k}"),
                        "must be a string or a number",
                    ));
                }
            };
            out.push((name, Template::parse(&text)));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------- request-id

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeConf {
    #[serde(default = "d16")]
    length: usize,
    #[serde(default = "charset")]
    char_set: String,
}

fn d16() -> usize {
    16
}
fn charset() -> String {
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIGKLMNOPQRSTUVWXYZ0123456789".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestIdConf {
    #[serde(default = "x_request_id")]
    header_name: String,
    #[serde(default = "yes")]
    include_in_response: bool,
    #[serde(default = "uuid")]
    algorithm: String,
    range_id: Option<RangeConf>,
}

fn x_request_id() -> String {
    "X-Request-Id".into()
}
fn yes() -> bool {
    true
}
fn uuid() -> String {
    "uuid".into()
}

#[derive(Clone, Copy)]
enum Algo {
    Uuid,
    UuidV7,
    Nanoid,
    RangeId,
    Ksuid,
}

struct RequestId {
    header: HeaderName,
    include: bool,
    algo: Algo,
    range_len: usize,
    range_set: Vec<u8>,
}

#[derive(Clone)]
struct IdSent(HeaderValue);

/// Factory of `request-id`.
pub struct RequestIdFactory;

impl PluginFactory for RequestIdFactory {
    fn name(&self) -> &str {
        "request-id"
    }
    fn priority(&self) -> i32 {
        12015
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "header_name": {"type": "string", "default": "X-Request-Id"},
            "include_in_response": {"type": "boolean", "default": true},
            "algorithm": {"type": "string", "default": "uuid",
                          "enum": ["uuid", "nanoid", "range_id", "ksuid", "uuidv7"]},
            "range_id": {"type": "object", "properties": {
                "length": {"type": "integer", "minimum": 6, "default": 16},
                "char_set": {"type": "string", "minLength": 6, "default": charset()}}},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: RequestIdConf = parse_conf(conf)?;
        let header = HeaderName::from_bytes(c.header_name.as_bytes())
            .map_err(|_| ConfError::at("header_name", "invalid header name"))?;
        let algo = match c.algorithm.as_str() {
            "uuid" => Algo::Uuid,
            "uuidv7" => Algo::UuidV7,
            "nanoid" => Algo::Nanoid,
            "range_id" => Algo::RangeId,
            "ksuid" => Algo::Ksuid,
            other => {
                return Err(ConfError::at(
                    "algorithm",
                    format!("matches none of the enum values: {other:?}"),
                ));
            }
        };
        let range = c.range_id.unwrap_or(RangeConf {
            length: 16,
            char_set: charset(),
        });
        if range.length < 6 {
            return Err(ConfError::at("range_id.length", "must be at least 6"));
        }
        if range.char_set.len() < 6 || !range.char_set.is_ascii() {
            return Err(ConfError::at(
                "range_id.char_set",
                "must be at least 6 ASCII characters",
            ));
        }
        if range.char_set.bytes().any(|b| b.is_ascii_control()) {
            return Err(ConfError::at(
                "range_id.char_set",
                "must not hold control characters",
            ));
        }
        Ok(Arc::new(RequestId {
            header,
            include: c.include_in_response,
            algo,
            range_len: range.length.min(4096),
            range_set: range.char_set.into_bytes(),
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn random16() -> [u8; 16] {
    fastrand::u128(..).to_le_bytes()
}

/// A version 4 UUID.
pub fn uuid_v4() -> String {
    let mut b = random16();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&b)
}

fn uuid_v7() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut b = random16();
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&b)
}

fn nanoid() -> String {
    const A: &[u8] = b"-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..21).map(|_| A[fastrand::usize(..64)] as char).collect()
}

/// A KSUID: 4 bytes of seconds since 2014-05-13 and 16 random bytes, in base62 (27 chars).
fn ksuid() -> String {
    const A: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(1_400_000_000) as u32;
    let mut n = [0u8; 20];
    n[..4].copy_from_slice(&secs.to_be_bytes());
    n[4..].copy_from_slice(&random16());
    let mut digits = Vec::with_capacity(27);
    let mut num: Vec<u32> = n.iter().map(|&b| u32::from(b)).collect();
    while digits.len() < 27 {
        let mut rem = 0u32;
        for d in num.iter_mut() {
            let cur = rem * 256 + *d;
            *d = cur / 62;
            rem = cur % 62;
        }
        digits.push(A[rem as usize]);
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

impl RequestId {
    fn generate(&self) -> String {
        match self.algo {
            Algo::Uuid => uuid_v4(),
            Algo::UuidV7 => uuid_v7(),
            Algo::Nanoid => nanoid(),
            Algo::Ksuid => ksuid(),
            Algo::RangeId => (0..self.range_len)
                .map(|_| self.range_set[fastrand::usize(..self.range_set.len())] as char)
                .collect(),
        }
    }
}

impl Plugin for RequestId {
    fn name(&self) -> &str {
        "request-id"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let given = ctx
            .headers
            .get(&self.header)
            .filter(|v| !v.is_empty())
            .cloned();
        let id = match given {
            Some(v) => v,
            None => {
                let v = HeaderValue::from_str(&self.generate())
                    .unwrap_or(HeaderValue::from_static("-"));
                ctx.headers.insert(self.header.clone(), v.clone());
                v
            }
        };
        if let Ok(s) = id.to_str() {
            ctx.set_var("apisix_request_id", s.to_owned());
        }
        if self.include {
            ctx.extensions.insert(IdSent(id));
        }
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        if !self.include {
            return;
        }
        let present = resp
            .headers
            .get(&self.header)
            .is_some_and(|v| !v.is_empty());
        if !present && let Some(IdSent(v)) = ctx.extensions.get::<IdSent>() {
            resp.headers.insert(self.header.clone(), v.clone());
        }
    }
}

// ----------------------------------------------------------------------------- fault-injection

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortConf {
    http_status: u16,
    body: Option<String>,
    headers: Option<serde_json::Map<String, Value>>,
    percentage: Option<u8>,
    vars: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayConf {
    duration: f64,
    percentage: Option<u8>,
    vars: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultConf {
    abort: Option<AbortConf>,
    delay: Option<DelayConf>,
}

struct Abort {
    status: StatusCode,
    body: Template,
    headers: Vec<(HeaderName, Template)>,
    percentage: Option<u8>,
    vars: Option<Vec<Expr>>,
}

struct Delay {
    duration: Duration,
    percentage: Option<u8>,
    vars: Option<Vec<Expr>>,
}

struct FaultInjection {
    abort: Option<Abort>,
    delay: Option<Delay>,
}

fn exprs(v: &Option<Vec<Value>>, path: &str) -> Result<Option<Vec<Expr>>, ConfError> {
    let Some(list) = v else { return Ok(None) };
    if list.len() > 20 {
        return Err(ConfError::at(path, "expect array to have at most 20 items"));
    }
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            Expr::compile_vars(e)
                .map_err(|err| ConfError::at(format!("{path}[{i}]{}", err.path), err.message))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn percentage(p: Option<u8>, path: &str) -> Result<Option<u8>, ConfError> {
    match p {
        Some(p) if p > 100 => Err(ConfError::at(path, "must be 0 to 100")),
        p => Ok(p),
    }
}

/// Factory of `fault-injection`.
pub struct FaultInjectionFactory;

impl PluginFactory for FaultInjectionFactory {
    fn name(&self) -> &str {
        "fault-injection"
    }
    fn priority(&self) -> i32 {
        11000
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "minProperties": 1, "properties": {
            "abort": {"type": "object", "required": ["http_status"], "properties": {
                "http_status": {"type": "integer", "minimum": 200},
                "body": {"type": "string", "minLength": 0},
                "headers": {"type": "object", "minProperties": 1},
                "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "vars": {"type": "array", "maxItems": 20, "items": {"type": "array"}}}},
            "delay": {"type": "object", "required": ["duration"], "properties": {
                "duration": {"type": "number", "minimum": 0},
                "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "vars": {"type": "array", "maxItems": 20, "items": {"type": "array"}}}},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: FaultConf = parse_conf(conf)?;
        if c.abort.is_none() && c.delay.is_none() {
            return Err(ConfError::whole(
                "expect object to have at least 1 properties",
            ));
        }
        let abort = match c.abort {
            None => None,
            Some(a) => {
                let abort_status = crate::util::status(a.http_status, "abort.http_status")?;
                Some(Abort {
                    status: abort_status,
                    body: Template::parse(a.body.as_deref().unwrap_or("")),
                    headers: header_pairs(&a.headers, "abort.headers")?,
                    percentage: percentage(a.percentage, "abort.percentage")?,
                    vars: exprs(&a.vars, "abort.vars")?,
                })
            }
        };
        let delay = match c.delay {
            None => None,
            Some(d) => {
                if !(0.0..=86_400.0).contains(&d.duration) {
                    return Err(ConfError::at(
                        "delay.duration",
                        "must be 0 to 86400 seconds",
                    ));
                }
                Some(Delay {
                    duration: Duration::from_secs_f64(d.duration),
                    percentage: percentage(d.percentage, "delay.percentage")?,
                    vars: exprs(&d.vars, "delay.vars")?,
                })
            }
        };
        Ok(Arc::new(FaultInjection { abort, delay }))
    }
}

fn hit(p: Option<u8>) -> bool {
    p.is_none_or(|p| fastrand::u8(1..=100) <= p)
}

fn vars_hold(v: &Option<Vec<Expr>>, ctx: &RequestCtx) -> bool {
    v.as_ref()
        .is_none_or(|list| list.iter().any(|e| e.eval(ctx)))
}

impl FaultInjection {
    fn abort_response(&self, ctx: &RequestCtx) -> Option<PluginResponse> {
        let a = self.abort.as_ref()?;
        if !(vars_hold(&a.vars, ctx) && hit(a.percentage)) {
            return None;
        }
        let mut r = PluginResponse::new(a.status, a.body.render(ctx));
        for (n, t) in &a.headers {
            if let Ok(v) = HeaderValue::from_str(&t.render(ctx)) {
                r.headers.insert(n.clone(), v);
            }
        }
        Some(r)
    }
}

impl Plugin for FaultInjection {
    fn name(&self) -> &str {
        "fault-injection"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let delay = self
            .delay
            .as_ref()
            .filter(|d| vars_hold(&d.vars, ctx) && hit(d.percentage))
            .map(|d| d.duration)
            .filter(|d| !d.is_zero());
        match delay {
            None => match self.abort_response(ctx) {
                Some(r) => Flow::Respond(r),
                None => Flow::Continue,
            },
            Some(d) => Flow::Pending(Box::pin(async move {
                tokio::time::sleep(d).await;
                Ok(self.abort_response(ctx))
            })),
        }
    }
}

// ------------------------------------------------------------------------------------- mocking

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MockConf {
    #[serde(default)]
    delay: u64,
    #[serde(default = "d200")]
    response_status: u16,
    #[serde(default = "json_ct")]
    content_type: String,
    response_example: Option<String>,
    response_schema: Option<Value>,
    #[serde(default = "yes")]
    with_mock_header: bool,
    response_headers: Option<serde_json::Map<String, Value>>,
}

fn d200() -> u16 {
    200
}
fn json_ct() -> String {
    "application/json;charset=utf8".into()
}

struct Mocking {
    delay: Duration,
    status: StatusCode,
    content_type: HeaderValue,
    example: Option<Template>,
    schema: Option<Value>,
    xml: bool,
    mock_header: bool,
    headers: Vec<(HeaderName, Template)>,
}

/// Factory of `mocking`.
pub struct MockingFactory;

impl PluginFactory for MockingFactory {
    fn name(&self) -> &str {
        "mocking"
    }
    fn priority(&self) -> i32 {
        10900
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "delay": {"type": "integer", "default": 0},
            "response_status": {"type": "integer", "default": 200, "minimum": 100},
            "content_type": {"type": "string", "default": "application/json;charset=utf8"},
            "response_example": {"type": "string"},
            "response_schema": {"type": "object"},
            "with_mock_header": {"type": "boolean", "default": true},
            "response_headers": {"type": "object", "minProperties": 1},
            "_meta": {"type": "object"}
        }, "anyOf": [{"required": ["response_example"]}, {"required": ["response_schema"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: MockConf = parse_conf(conf)?;
        if c.response_example.is_none() && c.response_schema.is_none() {
            return Err(ConfError::whole(
                "value should match any of: response_example or response_schema",
            ));
        }
        let typ = c.content_type.split(';').next().unwrap_or("").trim();
        if !matches!(
            typ,
            "application/xml" | "application/json" | "text/plain" | "text/html" | "text/xml"
        ) {
            return Err(ConfError::at("content_type", "unsupported content type!"));
        }
        if !(100..=599).contains(&c.response_status) {
            return Err(ConfError::at("response_status", "must be 100 to 599"));
        }
        if let Some(s) = &c.response_schema
            && !s.is_object()
        {
            return Err(ConfError::at("response_schema", "must be an object"));
        }
        Ok(Arc::new(Mocking {
            delay: Duration::from_secs(c.delay.min(3600)),
            status: StatusCode::from_u16(c.response_status)
                .map_err(|_| ConfError::at("response_status", "invalid status"))?,
            content_type: HeaderValue::from_str(&c.content_type)
                .map_err(|_| ConfError::at("content_type", "invalid header value"))?,
            example: c.response_example.as_deref().map(Template::parse),
            schema: c.response_schema,
            xml: typ.ends_with("xml"),
            mock_header: c.with_mock_header,
            headers: header_pairs(&c.response_headers, "response_headers")?,
        }))
    }
}

/// A value shaped by a JSON Schema (its `example`s where given, random values otherwise).
fn gen_value(schema: &Value, depth: usize) -> Value {
    let typ = schema
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let example = schema.get("example");
    match typ.as_str() {
        "object" => gen_object(schema, depth),
        "array" if depth < 8 => match schema.get("items") {
            Some(items) => Value::Array(
                (0..fastrand::usize(1..=3))
                    .map(|_| gen_value(items, depth + 1))
                    .collect(),
            ),
            None => Value::Null,
        },
        "string" => match example {
            Some(Value::String(s)) => Value::String(s.clone()),
            _ => Value::String(
                (0..fastrand::usize(1..=10))
                    .map(|_| fastrand::char('a'..='z'))
                    .collect(),
            ),
        },
        "number" => match example.and_then(Value::as_f64) {
            Some(n) => serde_json::json!(n),
            None => serde_json::json!(fastrand::f64() * 10000.0),
        },
        "integer" => match example.and_then(Value::as_f64) {
            Some(n) => serde_json::json!(n.floor() as i64),
            None => serde_json::json!(fastrand::i64(1..=10000)),
        },
        "boolean" => match example.and_then(Value::as_bool) {
            Some(b) => Value::Bool(b),
            None => Value::Bool(fastrand::bool()),
        },
        _ => Value::Null,
    }
}

fn gen_object(schema: &Value, depth: usize) -> Value {
    let mut out = serde_json::Map::new();
    if depth < 8
        && let Some(Value::Object(props)) = schema.get("properties")
    {
        for (k, v) in props {
            out.insert(k.clone(), gen_value(v, depth + 1));
        }
    }
    Value::Object(out)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn to_xml(name: &str, v: &Value, out: &mut String) {
    match v {
        Value::Array(items) => {
            for i in items {
                to_xml(name, i, out);
            }
        }
        Value::Object(m) => {
            out.push_str(&format!("<{name}>"));
            for (k, x) in m {
                to_xml(k, x, out);
            }
            out.push_str(&format!("</{name}>"));
        }
        Value::Null => {}
        Value::String(s) => out.push_str(&format!("<{name}>{}</{name}>", xml_escape(s))),
        other => out.push_str(&format!("<{name}>{other}</{name}>")),
    }
}

impl Mocking {
    fn response(&self, ctx: &RequestCtx) -> PluginResponse {
        let body = match (&self.example, &self.schema) {
            (Some(t), _) => t.render(ctx),
            (None, Some(s)) => {
                let v = gen_object(s, 0);
                if self.xml {
                    let mut out = String::new();
                    to_xml("data", &v, &mut out);
                    out
                } else {
                    v.to_string()
                }
            }
            (None, None) => String::new(),
        };
        let mut r = PluginResponse::new(self.status, body);
        r.headers
            .insert(http::header::CONTENT_TYPE, self.content_type.clone());
        if self.mock_header {
            r.headers.insert(
                HeaderName::from_static("x-mock-by"),
                HeaderValue::from_static(concat!("polygate/", env!("CARGO_PKG_VERSION"))),
            );
        }
        for (n, t) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(&t.render(ctx)) {
                r.headers.append(n.clone(), v);
            }
        }
        r
    }
}

impl Plugin for Mocking {
    fn name(&self) -> &str {
        "mocking"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.delay.is_zero() {
            return Flow::Respond(self.response(ctx));
        }
        Flow::Pending(Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            Ok(Some(self.response(ctx)))
        }))
    }
}

// ------------------------------------------------------------------------------------ redirect

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedirectConf {
    #[serde(default = "d302")]
    ret_code: u16,
    uri: Option<String>,
    regex_uri: Option<Vec<String>>,
    http_to_https: Option<bool>,
    #[serde(default)]
    encode_uri: bool,
    #[serde(default)]
    append_query_string: bool,
}

fn d302() -> u16 {
    302
}

enum Target {
    Uri(Vec<UriPart>),
    Regex(Regex, String),
    /// `http_to_https`, with the port of the first TLS listener (none for 443).
    Https(Option<u16>),
}

/// A piece of redirect's `uri` template: APISIX splits it into `\$name` (kept as written),
/// `${name}` and `$name` (the variable), and literal text (a lone `$` included).
enum UriPart {
    Lit(String),
    Var(String),
}

fn parse_redirect_uri(s: &str) -> Vec<UriPart> {
    let b = s.as_bytes();
    let name_len = |from: usize| {
        b[from..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
            .count()
    };
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if b.get(i + 1) == Some(&b'$') && name_len(i + 2) > 0 => {
                let n = name_len(i + 2);
                lit.push_str(&s[i..i + 2 + n]);
                i += 2 + n;
            }
            b'\\' => i += 1,
            b'$' if b.get(i + 1) == Some(&b'{') => {
                let n = name_len(i + 2);
                if n > 0 && b.get(i + 2 + n) == Some(&b'}') {
                    if !lit.is_empty() {
                        out.push(UriPart::Lit(std::mem::take(&mut lit)));
                    }
                    out.push(UriPart::Var(s[i + 2..i + 2 + n].to_owned()));
                    i += 3 + n;
                } else {
                    lit.push('$');
                    i += 1;
                }
            }
            b'$' => {
                let n = name_len(i + 1);
                if n > 0 {
                    if !lit.is_empty() {
                        out.push(UriPart::Lit(std::mem::take(&mut lit)));
                    }
                    out.push(UriPart::Var(s[i + 1..i + 1 + n].to_owned()));
                    i += 1 + n;
                } else {
                    lit.push('$');
                    i += 1;
                }
            }
            _ => {
                let start = i;
                while i < b.len() && b[i] != b'$' && b[i] != b'\\' {
                    i += 1;
                }
                lit.push_str(&s[start..i]);
            }
        }
    }
    if !lit.is_empty() {
        out.push(UriPart::Lit(lit));
    }
    out
}

fn render_parts(parts: &[UriPart], ctx: &RequestCtx) -> String {
    let mut out = String::new();
    for p in parts {
        match p {
            UriPart::Lit(l) => out.push_str(l),
            UriPart::Var(v) => {
                if let Some(x) = ctx.var(v) {
                    out.push_str(&x);
                }
            }
        }
    }
    out
}

struct Redirect {
    status: StatusCode,
    target: Target,
    encode: bool,
    append_query: bool,
}

/// Factory of `redirect`.
pub struct RedirectFactory;

impl PluginFactory for RedirectFactory {
    fn name(&self) -> &str {
        "redirect"
    }
    fn priority(&self) -> i32 {
        900
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "ret_code": {"type": "integer", "minimum": 200, "default": 302},
            "uri": {"type": "string", "minLength": 2},
            "regex_uri": {"type": "array", "minItems": 2, "maxItems": 2,
                          "items": {"type": "string"}},
            "http_to_https": {"type": "boolean"},
            "encode_uri": {"type": "boolean", "default": false},
            "append_query_string": {"type": "boolean", "default": false},
            "_meta": {"type": "object"}
        }, "oneOf": [{"required": ["uri"]}, {"required": ["regex_uri"]},
                     {"required": ["http_to_https"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: RedirectConf = parse_conf(conf)?;
        let n = usize::from(c.uri.is_some())
            + usize::from(c.regex_uri.is_some())
            + usize::from(c.http_to_https.is_some());
        if n != 1 {
            return Err(ConfError::whole(
                "value should match only one schema: set one of \"uri\", \"regex_uri\" or \"http_to_https\"",
            ));
        }
        if c.http_to_https.is_some() && c.append_query_string {
            return Err(ConfError::whole(
                "only one of `http_to_https` and `append_query_string` can be configured.",
            ));
        }
        let ret_status = crate::util::status(c.ret_code, "ret_code")?;
        let target = if let Some(u) = c.uri {
            if u.len() < 2 {
                return Err(ConfError::at("uri", "must be at least 2 characters"));
            }
            Target::Uri(parse_redirect_uri(&u))
        } else if let Some(r) = c.regex_uri {
            if r.len() != 2 {
                return Err(ConfError::at("regex_uri", "must have 2 items"));
            }
            let re = Regex::new(&r[0]).map_err(|e| {
                ConfError::at(
                    "regex_uri",
                    format!("invalid regex_uri ({}, {}), err:{e}", r[0], r[1]),
                )
            })?;
            Target::Regex(re, nginx_replacement(&r[1]))
        } else {
            let port = polygate_core::plugin::preparing().and_then(|gw| {
                gw.listeners
                    .iter()
                    .find(|l| l.tls)
                    .and_then(|l| l.addr.rsplit(':').next()?.parse::<u16>().ok())
            });
            Target::Https(port.filter(|p| *p != 443 && *p != 0))
        };
        Ok(Arc::new(Redirect {
            status: ret_status,
            target,
            encode: c.encode_uri,
            append_query: c.append_query_string,
        }))
    }
}

/// APISIX's `uri_safe_encode`: percent-encodes what is not unreserved or a path delimiter.
fn uri_safe_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@%".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Plugin for Redirect {
    fn name(&self) -> &str {
        "redirect"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let mut status = self.status;
        let mut uri = match &self.target {
            Target::Uri(parts) => render_parts(parts, ctx),
            Target::Regex(re, rep) => {
                if !re.is_match(&ctx.path) {
                    return Flow::Continue;
                }
                re.replacen(&ctx.path, 1, rep.as_str()).into_owned()
            }
            Target::Https(port) => {
                let scheme = ctx
                    .header("x-forwarded-proto")
                    .map(str::to_owned)
                    .unwrap_or_else(|| ctx.scheme.to_owned());
                if scheme == "https" {
                    return Flow::Continue;
                }
                status = if ctx.method == http::Method::GET || ctx.method == http::Method::HEAD {
                    StatusCode::MOVED_PERMANENTLY
                } else {
                    StatusCode::PERMANENT_REDIRECT
                };
                let host = ctx.host.clone().unwrap_or_default();
                let target = ctx.var("request_uri").unwrap_or_default().into_owned();
                match port {
                    Some(p) => format!("https://{host}:{p}{target}"),
                    None => format!("https://{host}{target}"),
                }
            }
        };
        let q = uri.find('?');
        if self.encode {
            uri = match q {
                Some(i) => format!("{}{}", uri_safe_encode(&uri[..i]), &uri[i..]),
                None => uri_safe_encode(&uri),
            };
        }
        if self.append_query
            && let Some(args) = &ctx.query
        {
            uri.push(if q.is_some() { '&' } else { '?' });
            uri.push_str(args);
        }
        let mut r = PluginResponse::status_page(status);
        match HeaderValue::from_str(&uri) {
            Ok(v) => {
                r.headers.insert(http::header::LOCATION, v);
            }
            Err(_) => {
                tracing::error!("redirect: the new uri {uri:?} is not a valid header value");
                return Flow::Respond(PluginResponse::status_page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                ));
            }
        }
        Flow::Respond(r)
    }
}

// ---------------------------------------------------------------------------------------- echo

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoConf {
    before_body: Option<String>,
    body: Option<String>,
    after_body: Option<String>,
    headers: Option<serde_json::Map<String, Value>>,
}

struct Echo {
    before: Option<Bytes>,
    body: Option<Bytes>,
    after: Option<Bytes>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Clone)]
struct EchoState {
    started: bool,
    done: bool,
}

/// Factory of `echo`.
pub struct EchoFactory;

impl PluginFactory for EchoFactory {
    fn name(&self) -> &str {
        "echo"
    }
    fn priority(&self) -> i32 {
        412
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "minProperties": 1, "properties": {
            "before_body": {"type": "string"},
            "body": {"type": "string"},
            "after_body": {"type": "string"},
            "headers": {"type": "object", "minProperties": 1},
            "_meta": {"type": "object"}
        }, "anyOf": [{"required": ["before_body"]}, {"required": ["body"]},
                     {"required": ["after_body"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: EchoConf = parse_conf(conf)?;
        if c.before_body.is_none() && c.body.is_none() && c.after_body.is_none() {
            return Err(ConfError::whole(
                "value should match any of: before_body, body or after_body",
            ));
        }
        let mut headers = Vec::new();
        for (n, t) in header_pairs(&c.headers, "headers")? {
            let v = HeaderValue::from_str(&t.render(&NoVars))
                .map_err(|_| ConfError::at(format!("headers.{n}"), "invalid header value"))?;
            headers.push((n, v));
        }
        Ok(Arc::new(Echo {
            before: c.before_body.map(Bytes::from),
            body: c.body.map(Bytes::from),
            after: c.after_body.map(Bytes::from),
            headers,
        }))
    }
}

/// Variables for templates that take none (echo's static headers).
struct NoVars;

impl VarSource for NoVars {
    fn var(&self, _: &str) -> Option<std::borrow::Cow<'_, str>> {
        None
    }
}

impl Plugin for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn header_filter(&self, _ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        if self.body.is_some() || self.before.is_some() || self.after.is_some() {
            resp.headers.remove(http::header::CONTENT_LENGTH);
            resp.headers.remove(http::header::ETAG);
            resp.headers.remove(http::header::LAST_MODIFIED);
        }
        for (n, v) in &self.headers {
            resp.headers.insert(n.clone(), v.clone());
        }
    }

    fn has_body_filter(&self) -> bool {
        true
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        let mut st = ctx
            .extensions
            .get::<EchoState>()
            .cloned()
            .unwrap_or(EchoState {
                started: false,
                done: false,
            });
        if st.done {
            *chunk = Bytes::new();
            return;
        }
        let mut out = Vec::new();
        if let Some(b) = &self.before
            && !st.started
        {
            out.extend_from_slice(b);
        }
        match &self.body {
            Some(b) => {
                out.extend_from_slice(b);
                st.done = true;
            }
            None => out.extend_from_slice(chunk),
        }
        st.started = true;
        if (eof || st.done)
            && let Some(a) = &self.after
        {
            out.extend_from_slice(a);
            st.done = true;
        }
        *chunk = Bytes::from(out);
        ctx.extensions.insert(st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(&uuid_v7()[14..15], "7");
        assert_eq!(nanoid().len(), 21);
        let k = ksuid();
        assert_eq!(k.len(), 27);
        assert!(k.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(uuid_v4(), uuid_v4());
    }

    #[test]
    fn encodes_like_uri_safe_encode() {
        assert_eq!(uri_safe_encode("/a b/ü"), "/a%20b/%C3%BC");
    }

    #[test]
    fn redirect_templates() {
        let show = |s: &str| {
            parse_redirect_uri(s)
                .iter()
                .map(|p| match p {
                    UriPart::Lit(l) => format!("L({l})"),
                    UriPart::Var(v) => format!("V({v})"),
                })
                .collect::<String>()
        };
        // t/plugin/redirect.t TEST 9-12
        assert_eq!(show("/foo$$uri"), "L(/foo$)V(uri)");
        assert_eq!(
            show("\\$uri/foo$uri\\$uri/bar"),
            "L(\\$uri/foo)V(uri)L(\\$uri/bar)"
        );
        assert_eq!(
            show("$uri/test/a${arg_name}c"),
            "V(uri)L(/test/a)V(arg_name)L(c)"
        );
    }
}
