//! `traffic-split` (priority 966, access phase): sends a share of the traffic to other
//! upstreams. The first rule whose `match` holds (any of its `vars` expressions; a rule
//! without `match` always holds) picks among its `weighted_upstreams` by smooth weighted
//! round robin: an `upstream_id`, an inline `upstream`, or an entry with only a `weight`,
//! which means the route's own upstream. No rule holding: the route's upstream.

use std::sync::Arc;

use parking_lot::Mutex;
use polygate_core::ctx::UpstreamOverride;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, RequestCtx};
use polygate_router::Expr;
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchConf {
    #[serde(default)]
    vars: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedConf {
    upstream_id: Option<Value>,
    upstream: Option<Value>,
    #[serde(default = "one")]
    weight: i64,
}

fn one() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConf {
    #[serde(rename = "match")]
    matches: Option<Vec<MatchConf>>,
    weighted_upstreams: Option<Vec<WeightedConf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default)]
    rules: Vec<RuleConf>,
}

/// Where a weighted entry sends the request.
#[derive(Clone)]
enum Dest {
    Route,
    Choice(UpstreamOverride),
}

/// Smooth weighted round robin (nginx's): each pick adds every weight to its current value
/// and takes the largest, which then loses the total.
struct Wrr {
    current: Vec<i64>,
}

struct Rule {
    matches: Option<Vec<Expr>>,
    dests: Vec<(Dest, i64)>,
    total: i64,
    wrr: Mutex<Wrr>,
}

impl Rule {
    fn pick(&self) -> Option<&Dest> {
        if self.total <= 0 {
            return None;
        }
        let mut w = self.wrr.lock();
        let mut best = 0;
        for (i, (_, weight)) in self.dests.iter().enumerate() {
            w.current[i] += weight;
            if w.current[i] > w.current[best] {
                best = i;
            }
        }
        w.current[best] -= self.total;
        Some(&self.dests[best].0)
    }
}

struct TrafficSplit {
    rules: Vec<Rule>,
}

/// Factory of `traffic-split`.
pub struct TrafficSplitFactory;

impl PluginFactory for TrafficSplitFactory {
    fn name(&self) -> &str {
        "traffic-split"
    }
    fn priority(&self) -> i32 {
        966
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "rules": {"type": "array", "items": {"type": "object", "properties": {
                "match": {"type": "array", "items": {"type": "object",
                          "properties": {"vars": {"type": "array"}}}},
                "weighted_upstreams": {"type": "array", "minItems": 1, "maxItems": 20,
                    "default": [{"weight": 1}],
                    "items": {"type": "object", "properties": {
                        "upstream_id": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                        "upstream": {"type": "object"},
                        "weight": {"type": "integer", "default": 1, "minimum": 0}}}}}}},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let scope = crate::limit::scope(None, conf);
        let mut rules = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            let matches = match &r.matches {
                None => None,
                Some(list) => {
                    let mut out = Vec::new();
                    for (j, m) in list.iter().enumerate() {
                        let v = m.vars.clone().unwrap_or(Value::Array(Vec::new()));
                        let e = Expr::compile_vars(&v).map_err(|e| {
                            ConfError::at(
                                format!("rules[{i}].match[{j}].vars{}", e.path),
                                format!("failed to validate the 'vars' expression: {}", e.message),
                            )
                        })?;
                        out.push(e);
                    }
                    Some(out)
                }
            };
            let ups = r.weighted_upstreams.as_deref().unwrap_or(&[]);
            if r.weighted_upstreams.is_some() && ups.is_empty() {
                return Err(ConfError::at(
                    format!("rules[{i}].weighted_upstreams"),
                    "expect array to have at least 1 items",
                ));
            }
            if ups.len() > 20 {
                return Err(ConfError::at(
                    format!("rules[{i}].weighted_upstreams"),
                    "expect array to have at most 20 items",
                ));
            }
            let mut dests = Vec::new();
            for (j, w) in ups.iter().enumerate() {
                let path = format!("rules[{i}].weighted_upstreams[{j}]");
                if w.weight < 0 {
                    return Err(ConfError::at(
                        format!("{path}.weight"),
                        "must be at least 0",
                    ));
                }
                let dest = if let Some(id) = &w.upstream_id {
                    let id = match id {
                        Value::String(s) if !s.is_empty() => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => {
                            return Err(ConfError::at(format!("{path}.upstream_id"), "invalid id"));
                        }
                    };
                    Dest::Choice(UpstreamOverride::Id(Arc::from(id.as_str())))
                } else if let Some(u) = &w.upstream {
                    let parsed: polygate_model::Upstream = parse_conf(u).map_err(|e| {
                        ConfError::at(e.path_under(&format!("{path}.upstream")), e.message)
                    })?;
                    let mut errs = polygate_model::ConfigErrors::default();
                    polygate_model::validate::validate_upstream(&parsed, "", &mut errs);
                    if let Some(e) = errs.0.first() {
                        let sub = e.path.trim_start_matches('.');
                        return Err(ConfError::at(
                            if sub.is_empty() {
                                format!("{path}.upstream")
                            } else {
                                format!("{path}.upstream.{sub}")
                            },
                            e.message.clone(),
                        ));
                    }
                    Dest::Choice(UpstreamOverride::Inline {
                        key: Arc::from(format!("traffic-split:{scope}:{i}:{j}")),
                        conf: Arc::new(parsed),
                    })
                } else {
                    Dest::Route
                };
                if w.weight > 0 {
                    dests.push((dest, w.weight));
                }
            }
            if r.weighted_upstreams.is_none() {
                dests.push((Dest::Route, 1));
            }
            let total = dests.iter().map(|(_, w)| w).sum();
            rules.push(Rule {
                matches,
                wrr: Mutex::new(Wrr {
                    current: vec![0; dests.len()],
                }),
                dests,
                total,
            });
        }
        Ok(Arc::new(TrafficSplit { rules }))
    }
}

impl Plugin for TrafficSplit {
    fn name(&self) -> &str {
        "traffic-split"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let Some(rule) = self.rules.iter().find(|r| match &r.matches {
            None => true,
            Some(list) => list.iter().any(|e| e.eval(ctx)),
        }) else {
            return Flow::Continue;
        };
        match rule.pick() {
            // an `upstream_id` that does not exist is answered by the proxy (500)
            Some(Dest::Choice(o)) => {
                ctx.extensions.insert(o.clone());
            }
            Some(Dest::Route) | None => {}
        }
        Flow::Continue
    }
}
