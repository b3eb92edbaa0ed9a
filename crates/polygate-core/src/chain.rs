//! Plugin instances, `_meta` handling, the merge precedence and the phase runner.
//!
//! Each configuration object (service, plugin config, route, consumer group, consumer, global
//! rule) has its plugins built once, into an [`InstanceMap`], with errors reported at that
//! object's key path. A route's chain is the merge of its layers by name, with APISIX's
//! precedence **consumer > consumer group > route > plugin config > service**, ordered by
//! descending priority (`_meta.priority` overrides the plugin's default).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use polygate_model::{ConfigErrors, PluginMap};
use polygate_router::Expr;

use crate::ctx::{RequestCtx, ResponseHead};
use crate::plugin::{
    BodyWait, Flow, Phase, PhaseResult, Plugin, PluginError, PluginKind, PluginRegistry,
    PluginResponse,
};

/// One configured plugin with its `_meta`.
pub struct PluginInstance {
    /// Plugin name.
    pub name: Arc<str>,
    /// Effective priority.
    pub priority: i32,
    /// Normal or auth.
    pub kind: PluginKind,
    /// `_meta.disable`: present in the merge (it overrides lower layers) but never run.
    pub disabled: bool,
    /// `_meta.filter`: run only when it holds.
    pub filter: Option<Expr>,
    /// `_meta.error_response`: body replacing the plugin's own when it short-circuits.
    pub error_response: Option<Bytes>,
    /// The instance.
    pub plugin: Arc<dyn Plugin>,
}

/// Plugin instances of one configuration object, by name.
pub type InstanceMap = BTreeMap<String, Arc<PluginInstance>>;

/// Builds the instances of one object's `plugins`, collecting errors at `path` (the path of
/// the `plugins` key, e.g. `routes[2].plugins`).
pub fn build_instances(
    registry: &PluginRegistry,
    plugins: &PluginMap,
    path: &str,
    errs: &mut ConfigErrors,
) -> InstanceMap {
    let mut out = InstanceMap::new();
    for (name, conf) in plugins {
        let ppath = format!("{path}.{name}");
        let Some(factory) = registry.get(name) else {
            errs.push(ppath, format!("unknown plugin {name:?}"));
            continue;
        };
        let mut conf = conf.clone();
        // `key-auth:` with no value (YAML null) means `{}`, as in APISIX
        if conf.is_null() {
            conf = serde_json::Value::Object(serde_json::Map::new());
        }
        let meta = match conf.as_object_mut() {
            Some(obj) => obj.remove("_meta"),
            None => {
                errs.push(ppath, "plugin configuration must be an object");
                continue;
            }
        };
        let mut priority = factory.priority();
        let mut disabled = false;
        let mut filter = None;
        let mut error_response = None;
        if let Some(meta) = meta {
            let Some(m) = meta.as_object() else {
                errs.push(format!("{ppath}._meta"), "must be an object");
                continue;
            };
            for (k, v) in m {
                let kp = format!("{ppath}._meta.{k}");
                match k.as_str() {
                    "disable" => match v.as_bool() {
                        Some(b) => disabled = b,
                        None => errs.push(kp, "must be a boolean"),
                    },
                    "priority" => match v.as_i64() {
                        Some(p) => priority = p as i32,
                        None => errs.push(kp, "must be an integer"),
                    },
                    "filter" => match Expr::compile_vars(v) {
                        Ok(e) => filter = Some(e),
                        Err(e) => errs.push(format!("{kp}{}", e.path), e.message),
                    },
                    "error_response" => match v {
                        serde_json::Value::String(s) => {
                            error_response = Some(Bytes::from(s.clone()))
                        }
                        serde_json::Value::Object(_) => {
                            error_response = Some(Bytes::from(v.to_string()))
                        }
                        _ => errs.push(kp, "must be a string or an object"),
                    },
                    _ => errs.push(kp, format!("unknown field {k:?}")),
                }
            }
        }
        let built = if registry.is_check_only() {
            factory
                .check(&conf)
                .map(|()| Arc::new(Disabled(name.clone())) as Arc<dyn Plugin>)
        } else {
            factory.build(&conf)
        };
        let plugin: Arc<dyn Plugin> = match built {
            Ok(p) => p,
            // a disabled entry may be a bare `{"_meta": {"disable": true}}`
            Err(_) if disabled => Arc::new(Disabled(name.clone())),
            Err(e) => {
                errs.push(e.path_under(&ppath), e.message);
                continue;
            }
        };
        out.insert(
            name.clone(),
            Arc::new(PluginInstance {
                name: Arc::from(name.as_str()),
                priority,
                kind: factory.kind(),
                disabled,
                filter,
                error_response,
                plugin,
            }),
        );
    }
    out
}

struct Disabled(String);
impl Plugin for Disabled {
    fn name(&self) -> &str {
        &self.0
    }
}

/// An ordered plugin chain.
#[derive(Clone, Default)]
pub struct PluginChain {
    /// Instances by descending priority (disabled ones removed).
    pub instances: Vec<Arc<PluginInstance>>,
    /// Names of every merged plugin, disabled ones included (for consumer merges).
    pub names: Vec<Arc<str>>,
    /// Whether any instance has a body filter.
    pub has_body_filter: bool,
    /// Largest request body any instance wants buffered ([`Plugin::wants_body`]).
    pub wants_body: Option<usize>,
    /// Whether any instance's `header_filter` may wait ([`Plugin::has_async_header_filter`]).
    pub async_header_filter: bool,
    /// Whether any instance filters streamed request bodies
    /// ([`Plugin::has_request_body_filter`]).
    pub request_body_filter: bool,
}

impl PluginChain {
    /// Merges layers, lowest precedence first (e.g. `[service, plugin_config, route]`).
    pub fn merge(layers: &[&InstanceMap]) -> PluginChain {
        let mut merged: BTreeMap<&str, &Arc<PluginInstance>> = BTreeMap::new();
        for layer in layers {
            for (name, inst) in layer.iter() {
                merged.insert(name.as_str(), inst);
            }
        }
        let names = merged.values().map(|i| i.name.clone()).collect();
        let mut instances: Vec<Arc<PluginInstance>> = merged
            .into_values()
            .filter(|i| !i.disabled)
            .cloned()
            .collect();
        instances.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        PluginChain::with_flags(instances, names)
    }

    /// A chain from instances (e.g. all global rules' plugins, where duplicates all run).
    pub fn from_instances(mut instances: Vec<Arc<PluginInstance>>) -> PluginChain {
        instances.retain(|i| !i.disabled);
        instances.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        let names = instances.iter().map(|i| i.name.clone()).collect();
        PluginChain::with_flags(instances, names)
    }

    /// A chain of sorted instances, with the flags computed from them.
    fn with_flags(instances: Vec<Arc<PluginInstance>>, names: Vec<Arc<str>>) -> PluginChain {
        let has_body_filter = instances.iter().any(|i| i.plugin.has_body_filter());
        let async_header_filter = instances.iter().any(|i| i.plugin.has_async_header_filter());
        let wants_body = instances.iter().filter_map(|i| i.plugin.wants_body()).max();
        let request_body_filter = instances.iter().any(|i| i.plugin.has_request_body_filter());
        PluginChain {
            instances,
            names,
            has_body_filter,
            wants_body,
            async_header_filter,
            request_body_filter,
        }
    }

    /// True when there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// This chain with a consumer's plugins merged on top (consumer wins; auth plugins of the
    /// consumer are credentials, not instances to run). Returns the merged chain and the
    /// instances the consumer added or replaced (they get a `rewrite` of their own, as
    /// APISIX's `rewrite_in_consumer`).
    pub fn merge_consumer(
        &self,
        consumer: &InstanceMap,
    ) -> (PluginChain, Vec<Arc<PluginInstance>>) {
        let mut added = Vec::new();
        let mut instances: Vec<Arc<PluginInstance>> = self
            .instances
            .iter()
            .filter(|i| !consumer.contains_key(&*i.name))
            .cloned()
            .collect();
        for inst in consumer.values() {
            if inst.kind == PluginKind::Auth || inst.disabled {
                continue;
            }
            instances.push(inst.clone());
            added.push(inst.clone());
        }
        instances.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        added.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        let names = instances.iter().map(|i| i.name.clone()).collect();
        (PluginChain::with_flags(instances, names), added)
    }
}

/// Runs one request phase (`rewrite`, `access` or `before_proxy`) over `instances`.
/// Returns `Ok(Some(response))` when a plugin short-circuits.
pub async fn run_phase(
    instances: &[Arc<PluginInstance>],
    phase: Phase,
    ctx: &mut RequestCtx,
) -> PhaseResult {
    for inst in instances {
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        let flow = match phase {
            Phase::Rewrite => inst.plugin.rewrite(ctx),
            Phase::Access => inst.plugin.access(ctx),
            Phase::BeforeProxy => inst.plugin.before_proxy(ctx),
            _ => Flow::Continue,
        };
        let resp = match flow {
            Flow::Continue => None,
            Flow::Respond(r) => Some(r),
            Flow::Fail(e) => return Err(e),
            Flow::Pending(fut) => fut.await?,
        };
        if let Some(mut r) = resp {
            if let Some(body) = &inst.error_response {
                r.body = body.clone();
                r.headers.remove(http::header::CONTENT_LENGTH);
                if body.first() == Some(&b'{') {
                    r.headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
            }
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Runs `header_filter` over `instances`.
pub fn run_header_filter(
    instances: &[Arc<PluginInstance>],
    ctx: &mut RequestCtx,
    resp: &mut ResponseHead,
) {
    for inst in instances {
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        inst.plugin.header_filter(ctx, resp);
    }
}

/// Runs `header_filter` over `instances`, awaiting the plugins whose filter may wait
/// ([`Plugin::header_filter_async`]). A plugin answering with a response replaces the one
/// being sent (its status, headers and body); the plugins after it still see the new head.
pub async fn run_header_filter_async(
    instances: &[Arc<PluginInstance>],
    ctx: &mut RequestCtx,
    resp: &mut ResponseHead,
) -> Result<(), PluginError> {
    for inst in instances {
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        if !inst.plugin.has_async_header_filter() {
            inst.plugin.header_filter(ctx, resp);
            continue;
        }
        let replaced = match inst.plugin.header_filter_async(ctx, resp) {
            Flow::Continue => None,
            Flow::Respond(r) => Some(r),
            Flow::Fail(e) => return Err(e),
            Flow::Pending(fut) => fut.await?,
        };
        if let Some(r) = replaced {
            resp.status = r.status;
            resp.headers = r.headers;
            resp.headers.remove(http::header::CONTENT_LENGTH);
            ctx.body_override = Some(r.body);
        }
    }
    Ok(())
}

/// Runs `body_filter` over `instances` for one chunk.
pub fn run_body_filter(
    instances: &[Arc<PluginInstance>],
    ctx: &mut RequestCtx,
    chunk: &mut Bytes,
    eof: bool,
) {
    for inst in instances {
        if !inst.plugin.has_body_filter() {
            continue;
        }
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        inst.plugin.body_filter(ctx, chunk, eof);
    }
}

/// Runs `body_filter` over `instances[start..]` for one chunk, stopping at the first plugin
/// that waits ([`Plugin::body_filter_async`]): returns the index to resume at and what to
/// wait for.
pub fn run_body_filter_from(
    instances: &[Arc<PluginInstance>],
    start: usize,
    ctx: &mut RequestCtx,
    chunk: &mut Bytes,
    eof: bool,
) -> Option<(usize, BodyWait)> {
    for (i, inst) in instances.iter().enumerate().skip(start) {
        if !inst.plugin.has_body_filter() {
            continue;
        }
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        if !inst.plugin.has_async_body_filter() {
            inst.plugin.body_filter(ctx, chunk, eof);
            continue;
        }
        if let Some(w) = inst.plugin.body_filter_async(ctx, chunk, eof) {
            return Some((i + 1, w));
        }
    }
    None
}

/// The request body filters of `instances` for this request ([`Plugin::request_body_filter`]),
/// in chain order, appended to `out`.
pub fn request_body_filters(
    instances: &[Arc<PluginInstance>],
    ctx: &mut RequestCtx,
    out: &mut Vec<Box<dyn crate::plugin::ChunkFilter>>,
) {
    for inst in instances {
        if !inst.plugin.has_request_body_filter() {
            continue;
        }
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        if let Some(f) = inst.plugin.request_body_filter(ctx) {
            out.push(f);
        }
    }
}

/// Runs `response_trailers` over `instances`.
pub fn run_trailers_filter(
    instances: &[Arc<PluginInstance>],
    ctx: &mut RequestCtx,
    trailers: &mut http::HeaderMap,
) {
    for inst in instances {
        if !inst.plugin.has_trailers_filter() {
            continue;
        }
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        inst.plugin.response_trailers(ctx, trailers);
    }
}

/// Runs `log` over `instances` (`_meta.filter` applies here too).
pub fn run_log(instances: &[Arc<PluginInstance>], ctx: &RequestCtx) {
    for inst in instances {
        if let Some(f) = &inst.filter
            && !f.eval(ctx)
        {
            continue;
        }
        inst.plugin.log(ctx);
    }
}

/// Builds an ad-hoc response (helper for plugins).
pub fn respond(status: http::StatusCode, body: impl Into<Bytes>) -> PluginResponse {
    PluginResponse::new(status, body)
}
