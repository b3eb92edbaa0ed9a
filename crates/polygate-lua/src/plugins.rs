//! The Lua plugins: `serverless-pre-function`, `serverless-post-function` (APISIX's
//! configuration) and `lua` (OpenResty-style `*_by_lua_block` bodies per phase).

use std::sync::Arc;

use bytes::Bytes;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, RequestCtx, ResponseHead, parse_conf};
use serde::Deserialize;

use crate::current::LuaPhase;
use crate::run;
use crate::vm::{Source, SourceKind, check_source, compile_only};

/// Default body limit when a script reads the request body.
const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Calls (in a script's text) that need the request body buffered.
const BODY_CALLS: &[&str] = &[
    "read_body",
    "get_body_data",
    "set_body_data",
    "get_post_args",
    "request_body",
];

fn needs_body(sources: &[&Arc<Source>]) -> bool {
    sources
        .iter()
        .any(|s| BODY_CALLS.iter().any(|c| s.code.contains(c)))
}

fn body_limit(
    read_body: Option<bool>,
    max_body: Option<usize>,
    srcs: &[&Arc<Source>],
) -> Option<usize> {
    let on = read_body.unwrap_or_else(|| needs_body(srcs));
    on.then(|| max_body.unwrap_or(DEFAULT_MAX_BODY))
}

fn parse_phase(p: &str) -> Option<LuaPhase> {
    Some(match p {
        "rewrite" => LuaPhase::Rewrite,
        "access" => LuaPhase::Access,
        "before_proxy" => LuaPhase::BeforeProxy,
        "header_filter" => LuaPhase::HeaderFilter,
        "body_filter" => LuaPhase::BodyFilter,
        "log" => LuaPhase::Log,
        _ => return None,
    })
}

/// Runs several handlers of one yieldable phase in order.
fn run_all<'a>(
    plugin: &'a str,
    phase: LuaPhase,
    ctx: &'a mut RequestCtx,
    srcs: &'a [Arc<Source>],
) -> Flow<'a> {
    match srcs {
        [] => Flow::Continue,
        [one] => run::run_request(plugin, phase, ctx, one),
        many => Flow::Pending(Box::pin(async move {
            for s in many {
                match run::run_request(plugin, phase, ctx, s) {
                    Flow::Continue => {}
                    Flow::Respond(r) => return Ok(Some(r)),
                    Flow::Fail(e) => return Err(e),
                    Flow::Pending(f) => {
                        if let Some(r) = f.await? {
                            return Ok(Some(r));
                        }
                    }
                }
            }
            Ok(None)
        })),
    }
}

// ---------------------------------------------------------------- serverless

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerlessConf {
    #[serde(default = "access")]
    phase: String,
    functions: Vec<String>,
    /// polygate extension: buffer the request body for `ngx.req.get_body_data` (default:
    /// when a function mentions the body calls).
    #[serde(default)]
    read_body: Option<bool>,
    /// polygate extension: the body limit (413 above), default 1 MiB.
    #[serde(default)]
    max_body: Option<usize>,
}

fn access() -> String {
    "access".into()
}

/// Factory of `serverless-pre-function` / `serverless-post-function`.
pub struct ServerlessFactory {
    name: &'static str,
    priority: i32,
}

impl ServerlessFactory {
    /// `serverless-pre-function` (priority 10000: before everything else).
    pub fn pre() -> Self {
        ServerlessFactory {
            name: "serverless-pre-function",
            priority: 10000,
        }
    }

    /// `serverless-post-function` (priority -2000: after everything else).
    pub fn post() -> Self {
        ServerlessFactory {
            name: "serverless-post-function",
            priority: -2000,
        }
    }
}

struct Serverless {
    name: &'static str,
    phase: LuaPhase,
    funcs: Vec<Arc<Source>>,
    wants_body: Option<usize>,
}

impl PluginFactory for ServerlessFactory {
    fn name(&self) -> &str {
        self.name
    }

    fn priority(&self) -> i32 {
        self.priority
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        Ok(Arc::new(self.parse(conf, check_source)?))
    }

    fn check(&self, conf: &serde_json::Value) -> Result<(), ConfError> {
        self.parse(conf, compile_only).map(drop)
    }
}

impl ServerlessFactory {
    fn parse(
        &self,
        conf: &serde_json::Value,
        check: fn(&Arc<Source>) -> Result<(), String>,
    ) -> Result<Serverless, ConfError> {
        let c: ServerlessConf = parse_conf(conf)?;
        let phase = parse_phase(&c.phase).ok_or_else(|| {
            ConfError::at(
                "phase",
                format!(
                    "{:?} must be one of rewrite, access, before_proxy, header_filter, body_filter, log",
                    c.phase
                ),
            )
        })?;
        if c.functions.is_empty() {
            return Err(ConfError::at(
                "functions",
                "at least one function is required",
            ));
        }
        // the functions see the configuration with its defaults, as in APISIX (`conf.phase`)
        let mut seen = conf.clone();
        if let Some(o) = seen.as_object_mut() {
            o.entry("phase")
                .or_insert_with(|| serde_json::Value::String(c.phase.clone()));
        }
        let mut funcs = Vec::new();
        for (i, f) in c.functions.iter().enumerate() {
            let src = Source::new(
                format!("{}[{i}]", self.name),
                f.clone(),
                SourceKind::Factory,
                Some(seen.clone()),
            );
            check(&src).map_err(|e| ConfError::at(format!("functions[{i}]"), e))?;
            funcs.push(src);
        }
        let refs: Vec<&Arc<Source>> = funcs.iter().collect();
        Ok(Serverless {
            name: self.name,
            phase,
            wants_body: body_limit(c.read_body, c.max_body, &refs),
            funcs,
        })
    }
}

impl Serverless {
    /// Runs the functions when `phase` is the configured one.
    fn run_in<'a>(&'a self, phase: LuaPhase, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.phase != phase {
            return Flow::Continue;
        }
        run_all(self.name, phase, ctx, &self.funcs)
    }
}

impl Plugin for Serverless {
    fn name(&self) -> &str {
        self.name
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        self.run_in(LuaPhase::Rewrite, ctx)
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        self.run_in(LuaPhase::Access, ctx)
    }

    fn before_proxy<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        self.run_in(LuaPhase::BeforeProxy, ctx)
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        run::apply_pending_headers(ctx, resp);
        if self.phase == LuaPhase::HeaderFilter {
            for f in &self.funcs {
                run::run_header_filter(self.name, f, ctx, resp);
            }
        }
    }

    fn wants_body(&self) -> Option<usize> {
        self.wants_body
    }

    fn has_body_filter(&self) -> bool {
        self.phase == LuaPhase::BodyFilter
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        for f in &self.funcs {
            run::run_body_filter(self.name, f, ctx, chunk, eof);
        }
    }

    fn log(&self, ctx: &RequestCtx) {
        if self.phase == LuaPhase::Log {
            for f in &self.funcs {
                run::run_log(self.name, f, ctx);
            }
        }
    }
}

// ---------------------------------------------------------------- lua

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LuaConf {
    #[serde(default)]
    rewrite: Option<String>,
    #[serde(default)]
    access: Option<String>,
    #[serde(default)]
    header_filter: Option<String>,
    #[serde(default)]
    body_filter: Option<String>,
    #[serde(default)]
    log: Option<String>,
    #[serde(default)]
    rewrite_file: Option<String>,
    #[serde(default)]
    access_file: Option<String>,
    #[serde(default)]
    header_filter_file: Option<String>,
    #[serde(default)]
    body_filter_file: Option<String>,
    #[serde(default)]
    log_file: Option<String>,
    #[serde(default)]
    read_body: Option<bool>,
    #[serde(default)]
    max_body: Option<usize>,
}

/// Factory of the `lua` plugin.
pub struct LuaFactory;

struct LuaPlugin {
    rewrite: Option<Arc<Source>>,
    access: Option<Arc<Source>>,
    header_filter: Option<Arc<Source>>,
    body_filter: Option<Arc<Source>>,
    log: Option<Arc<Source>>,
    wants_body: Option<usize>,
}

fn block(
    phase: &str,
    inline: &Option<String>,
    file: &Option<String>,
    check: fn(&Arc<Source>) -> Result<(), String>,
) -> Result<Option<Arc<Source>>, ConfError> {
    let (name, code, key) = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(ConfError::at(
                format!("{phase}_file"),
                format!("give either {phase} or {phase}_file, not both"),
            ));
        }
        (Some(code), None) => (format!("lua[{phase}]"), code.clone(), phase.to_owned()),
        (None, Some(path)) => {
            let code = std::fs::read_to_string(path).map_err(|e| {
                ConfError::at(format!("{phase}_file"), format!("cannot read {path}: {e}"))
            })?;
            (path.clone(), code, format!("{phase}_file"))
        }
        (None, None) => return Ok(None),
    };
    let src = Source::new(name, code, SourceKind::Block, None);
    check(&src).map_err(|e| ConfError::at(key, e))?;
    Ok(Some(src))
}

impl PluginFactory for LuaFactory {
    fn name(&self) -> &str {
        "lua"
    }

    fn priority(&self) -> i32 {
        0
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        Ok(Arc::new(parse_lua(conf, check_source)?))
    }

    fn check(&self, conf: &serde_json::Value) -> Result<(), ConfError> {
        parse_lua(conf, compile_only).map(drop)
    }
}

fn parse_lua(
    conf: &serde_json::Value,
    check: fn(&Arc<Source>) -> Result<(), String>,
) -> Result<LuaPlugin, ConfError> {
    let c: LuaConf = parse_conf(conf)?;
    let p = LuaPlugin {
        rewrite: block("rewrite", &c.rewrite, &c.rewrite_file, check)?,
        access: block("access", &c.access, &c.access_file, check)?,
        header_filter: block(
            "header_filter",
            &c.header_filter,
            &c.header_filter_file,
            check,
        )?,
        body_filter: block("body_filter", &c.body_filter, &c.body_filter_file, check)?,
        log: block("log", &c.log, &c.log_file, check)?,
        wants_body: None,
    };
    let all: Vec<&Arc<Source>> = [
        &p.rewrite,
        &p.access,
        &p.header_filter,
        &p.body_filter,
        &p.log,
    ]
    .into_iter()
    .flatten()
    .collect();
    if all.is_empty() {
        return Err(ConfError::whole(
            "no handler: give at least one of rewrite, access, header_filter, body_filter, log (or *_file)",
        ));
    }
    let wants_body = body_limit(c.read_body, c.max_body, &all);
    Ok(LuaPlugin { wants_body, ..p })
}

impl Plugin for LuaPlugin {
    fn name(&self) -> &str {
        "lua"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        match &self.rewrite {
            Some(s) => run::run_request("lua", LuaPhase::Rewrite, ctx, s),
            None => Flow::Continue,
        }
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        match &self.access {
            Some(s) => run::run_request("lua", LuaPhase::Access, ctx, s),
            None => Flow::Continue,
        }
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        run::apply_pending_headers(ctx, resp);
        if let Some(s) = &self.header_filter {
            run::run_header_filter("lua", s, ctx, resp);
        }
    }

    fn wants_body(&self) -> Option<usize> {
        self.wants_body
    }

    fn has_body_filter(&self) -> bool {
        self.body_filter.is_some()
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        if let Some(s) = &self.body_filter {
            run::run_body_filter("lua", s, ctx, chunk, eof);
        }
    }

    fn log(&self, ctx: &RequestCtx) {
        if let Some(s) = &self.log {
            run::run_log("lua", s, ctx);
        }
    }
}
