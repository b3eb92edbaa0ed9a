//! A JSON Schema validator (the draft 4–7 keywords APISIX's plugin schemas and users'
//! `request-validation` schemas use), compiled once, with error messages worded as
//! lua-resty-jsonschema's (`property "id" is required`, `property "age" validation failed:
//! wrong type: expected integer, got string`).
//!
//! Keywords: `type` (one or a list), `enum`, `const`, `properties`, `required`,
//! `additionalProperties` (boolean or schema), `patternProperties`, `minProperties`,
//! `maxProperties`, `dependencies` (lists), `items` (schema or tuple), `minItems`, `maxItems`,
//! `uniqueItems`, `minLength`, `maxLength`, `pattern`, `minimum`, `maximum`,
//! `exclusiveMinimum`/`exclusiveMaximum` (draft 4 booleans and draft 6 numbers),
//! `multipleOf`, `allOf`, `anyOf`, `oneOf`, `not`, `if`/`then`/`else`. Unknown keywords
//! (`default`, `description`, `format`, ...) are ignored.

use regex::Regex;
use serde_json::Value;

/// A compiled schema.
pub struct Schema {
    root: Node,
}

enum Node {
    Any,
    Never,
    Rules(Box<Rules>),
}

#[derive(Default)]
struct Rules {
    types: Option<Vec<String>>,
    enumeration: Option<Vec<Value>>,
    constant: Option<Value>,
    properties: Vec<(String, Node)>,
    required: Vec<String>,
    additional: Option<Node>,
    pattern_props: Vec<(Regex, Node)>,
    min_props: Option<usize>,
    max_props: Option<usize>,
    dependencies: Vec<(String, Vec<String>)>,
    items: Option<Node>,
    tuple: Vec<Node>,
    min_items: Option<usize>,
    max_items: Option<usize>,
    unique: bool,
    min_len: Option<usize>,
    max_len: Option<usize>,
    pattern: Option<(Regex, String)>,
    minimum: Option<(f64, bool)>,
    maximum: Option<(f64, bool)>,
    multiple_of: Option<f64>,
    all_of: Vec<Node>,
    any_of: Vec<Node>,
    one_of: Vec<Node>,
    not: Option<Node>,
    cond: Option<(Node, Option<Node>, Option<Node>)>,
}

fn usize_of(v: &Value, k: &str) -> Result<Option<usize>, String> {
    match v.get(k) {
        None => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| format!("{k} must be a non-negative integer")),
    }
}

fn compile(v: &Value, depth: usize) -> Result<Node, String> {
    if depth > 32 {
        return Err("schema nested too deep".into());
    }
    let obj = match v {
        Value::Bool(true) => return Ok(Node::Any),
        Value::Bool(false) => return Ok(Node::Never),
        Value::Object(o) => o,
        _ => return Err("a schema must be an object or a boolean".into()),
    };
    let sub = |x: &Value| compile(x, depth + 1);
    let list = |k: &str| -> Result<Vec<Node>, String> {
        match obj.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) if !a.is_empty() => a.iter().map(sub).collect(),
            Some(_) => Err(format!("{k} must be a non-empty array of schemas")),
        }
    };
    let mut r = Rules {
        types: match obj.get("type") {
            None => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|t| t.as_str().map(str::to_owned).ok_or("type must be strings"))
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err("type must be a string or a list".into()),
        },
        enumeration: match obj.get("enum") {
            None => None,
            Some(Value::Array(a)) => Some(a.clone()),
            Some(_) => return Err("enum must be an array".into()),
        },
        constant: obj.get("const").cloned(),
        min_props: usize_of(v, "minProperties")?,
        max_props: usize_of(v, "maxProperties")?,
        min_items: usize_of(v, "minItems")?,
        max_items: usize_of(v, "maxItems")?,
        unique: obj
            .get("uniqueItems")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        min_len: usize_of(v, "minLength")?,
        max_len: usize_of(v, "maxLength")?,
        multiple_of: obj.get("multipleOf").and_then(Value::as_f64),
        all_of: list("allOf")?,
        any_of: list("anyOf")?,
        one_of: list("oneOf")?,
        not: obj.get("not").map(sub).transpose()?,
        ..Default::default()
    };
    if let Some(t) = &r.types {
        for x in t {
            if !matches!(
                x.as_str(),
                "object" | "array" | "string" | "number" | "integer" | "boolean" | "null"
            ) {
                return Err(format!("unknown type {x:?}"));
            }
        }
    }
    if let Some(p) = obj.get("properties") {
        let Some(p) = p.as_object() else {
            return Err("properties must be an object".into());
        };
        for (k, s) in p {
            r.properties.push((k.clone(), sub(s)?));
        }
    }
    if let Some(req) = obj.get("required") {
        let Some(a) = req.as_array() else {
            return Err("required must be an array".into());
        };
        for x in a {
            r.required
                .push(x.as_str().ok_or("required must list strings")?.to_owned());
        }
    }
    r.additional = obj.get("additionalProperties").map(sub).transpose()?;
    if let Some(pp) = obj.get("patternProperties").and_then(Value::as_object) {
        for (k, s) in pp {
            let re = Regex::new(k).map_err(|e| format!("patternProperties {k:?}: {e}"))?;
            r.pattern_props.push((re, sub(s)?));
        }
    }
    if let Some(d) = obj.get("dependencies").and_then(Value::as_object) {
        for (k, x) in d {
            if let Some(a) = x.as_array() {
                let names = a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect();
                r.dependencies.push((k.clone(), names));
            }
        }
    }
    match obj.get("items") {
        None => {}
        Some(Value::Array(a)) => {
            for x in a {
                r.tuple.push(sub(x)?);
            }
        }
        Some(x) => r.items = Some(sub(x)?),
    }
    if let Some(p) = obj.get("pattern") {
        let p = p.as_str().ok_or("pattern must be a string")?;
        r.pattern = Some((
            Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}"))?,
            p.to_owned(),
        ));
    }
    let bound = |k: &str, ex: &str| -> Option<(f64, bool)> {
        match (obj.get(k).and_then(Value::as_f64), obj.get(ex)) {
            (Some(n), Some(Value::Bool(b))) => Some((n, *b)),
            (Some(n), _) => Some((n, false)),
            (None, Some(e)) => e.as_f64().map(|n| (n, true)),
            (None, None) => None,
        }
    };
    r.minimum = bound("minimum", "exclusiveMinimum");
    r.maximum = bound("maximum", "exclusiveMaximum");
    if let Some(i) = obj.get("if") {
        r.cond = Some((
            sub(i)?,
            obj.get("then").map(sub).transpose()?,
            obj.get("else").map(sub).transpose()?,
        ));
    }
    Ok(Node::Rules(Box::new(r)))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        "number" => v.is_number(),
        other => type_name(v) == other,
    }
}

fn num_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

impl Node {
    fn check(&self, v: &Value) -> Result<(), String> {
        let r = match self {
            Node::Any => return Ok(()),
            Node::Never => return Err("value not allowed".into()),
            Node::Rules(r) => r,
        };
        if let Some(types) = &r.types
            && !types.iter().any(|t| has_type(v, t))
        {
            return Err(format!(
                "wrong type: expected {}, got {}",
                types.join(" or "),
                type_name(v)
            ));
        }
        if let Some(e) = &r.enumeration
            && !e.contains(v)
        {
            return Err("matches none of the enum values".into());
        }
        if let Some(c) = &r.constant
            && c != v
        {
            return Err(format!("value should match constant {c}"));
        }
        match v {
            Value::Object(o) => {
                for k in &r.required {
                    if !o.contains_key(k) {
                        return Err(format!("property \"{k}\" is required"));
                    }
                }
                if let Some(n) = r.min_props
                    && o.len() < n
                {
                    return Err(format!("expect object to have at least {n} properties"));
                }
                if let Some(n) = r.max_props
                    && o.len() > n
                {
                    return Err(format!("expect object to have at most {n} properties"));
                }
                for (k, deps) in &r.dependencies {
                    if o.contains_key(k) {
                        for d in deps {
                            if !o.contains_key(d) {
                                return Err(format!(
                                    "property \"{d}\" is required when \"{k}\" is set"
                                ));
                            }
                        }
                    }
                }
                for (k, x) in o {
                    let mut matched = false;
                    if let Some((_, s)) = r.properties.iter().find(|(p, _)| p == k) {
                        matched = true;
                        s.check(x)
                            .map_err(|e| format!("property \"{k}\" validation failed: {e}"))?;
                    }
                    for (re, s) in &r.pattern_props {
                        if re.is_match(k) {
                            matched = true;
                            s.check(x)
                                .map_err(|e| format!("property \"{k}\" validation failed: {e}"))?;
                        }
                    }
                    if !matched && let Some(a) = &r.additional {
                        if matches!(a, Node::Never) {
                            return Err(format!("additional properties forbidden, found {k}"));
                        }
                        a.check(x)
                            .map_err(|e| format!("property \"{k}\" validation failed: {e}"))?;
                    }
                }
            }
            Value::Array(a) => {
                if let Some(n) = r.min_items
                    && a.len() < n
                {
                    return Err(format!("expect array to have at least {n} items"));
                }
                if let Some(n) = r.max_items
                    && a.len() > n
                {
                    return Err(format!("expect array to have at most {n} items"));
                }
                if r.unique {
                    for (i, x) in a.iter().enumerate() {
                        if a[..i].contains(x) {
                            return Err(format!(
                                "expected unique items but items {i} and {} are equal",
                                a[..i].iter().position(|y| y == x).unwrap_or(0)
                            ));
                        }
                    }
                }
                for (i, x) in a.iter().enumerate() {
                    let s = r.tuple.get(i).or(r.items.as_ref());
                    if let Some(s) = s {
                        s.check(x)
                            .map_err(|e| format!("failed to validate item {}: {e}", i + 1))?;
                    }
                }
            }
            Value::String(s) => {
                let n = s.chars().count();
                if let Some(m) = r.min_len
                    && n < m
                {
                    return Err(format!("string too short, expected at least {m}, got {n}"));
                }
                if let Some(m) = r.max_len
                    && n > m
                {
                    return Err(format!("string too long, expected at most {m}, got {n}"));
                }
                if let Some((re, src)) = &r.pattern
                    && !re.is_match(s)
                {
                    return Err(format!("failed to match pattern {src:?} with {s:?}"));
                }
            }
            Value::Number(num) => {
                let f = num.as_f64().unwrap_or(0.0);
                if let Some((m, ex)) = r.minimum
                    && (f < m || (ex && f <= m))
                {
                    return Err(if ex {
                        format!(
                            "expected {} to be greater than {}",
                            num_text(f),
                            num_text(m)
                        )
                    } else {
                        format!("expected {} to be at least {}", num_text(f), num_text(m))
                    });
                }
                if let Some((m, ex)) = r.maximum
                    && (f > m || (ex && f >= m))
                {
                    return Err(if ex {
                        format!(
                            "expected {} to be smaller than {}",
                            num_text(f),
                            num_text(m)
                        )
                    } else {
                        format!("expected {} to be at most {}", num_text(f), num_text(m))
                    });
                }
                if let Some(m) = r.multiple_of
                    && m > 0.0
                    && ((f / m).fract()).abs() > 1e-9
                {
                    return Err(format!(
                        "expected {} to be a multiple of {}",
                        num_text(f),
                        num_text(m)
                    ));
                }
            }
            _ => {}
        }
        for s in &r.all_of {
            s.check(v)?;
        }
        if !r.any_of.is_empty() && !r.any_of.iter().any(|s| s.check(v).is_ok()) {
            let req: Vec<String> = r
                .any_of
                .iter()
                .filter_map(|s| match s {
                    Node::Rules(x) if !x.required.is_empty() => Some(format!("{:?}", x.required)),
                    _ => None,
                })
                .collect();
            return Err(if req.len() == r.any_of.len() && v.is_object() {
                format!("object matches none of the required: {}", req.join(" or "))
            } else {
                "value should match any of the schemas".to_owned()
            });
        }
        if !r.one_of.is_empty() {
            let n = r.one_of.iter().filter(|s| s.check(v).is_ok()).count();
            if n != 1 {
                return Err(if n == 0 {
                    "value should match only one schema, but matches none".to_owned()
                } else {
                    "value should match only one schema, but matches both".to_owned()
                });
            }
        }
        if let Some(n) = &r.not
            && n.check(v).is_ok()
        {
            return Err("value wasn't supposed to match schema".into());
        }
        if let Some((i, t, e)) = &r.cond {
            let branch = if i.check(v).is_ok() { t } else { e };
            if let Some(b) = branch {
                b.check(v)?;
            }
        }
        Ok(())
    }
}

impl Schema {
    /// Compiles a schema; the error says which keyword is wrong.
    pub fn compile(v: &Value) -> Result<Schema, String> {
        Ok(Schema {
            root: compile(v, 0)?,
        })
    }

    /// Checks a value.
    pub fn check(&self, v: &Value) -> Result<(), String> {
        self.root.check(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(s: Value, v: Value) -> String {
        Schema::compile(&s)
            .unwrap()
            .check(&v)
            .err()
            .unwrap_or_default()
    }

    #[test]
    fn messages_like_lua_resty_jsonschema() {
        let s = json!({"type": "object", "required": ["required_payload"],
            "properties": {"required_payload": {"type": "string"},
                           "timeouts": {"type": "integer", "minimum": 1, "maximum": 254}}});
        assert_eq!(
            err(s.clone(), json!({})),
            "property \"required_payload\" is required"
        );
        assert_eq!(
            err(s.clone(), json!({"required_payload": 1})),
            "property \"required_payload\" validation failed: wrong type: expected string, got integer"
        );
        assert_eq!(
            err(s.clone(), json!({"required_payload": "x", "timeouts": 0})),
            "property \"timeouts\" validation failed: expected 0 to be at least 1"
        );
        assert_eq!(err(s, json!({"required_payload": "x", "timeouts": 3})), "");
        assert_eq!(
            err(json!({"enum": ["a"]}), json!("b")),
            "matches none of the enum values"
        );
        assert_eq!(
            err(
                json!({"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}),
                json!({})
            ),
            "object matches none of the required: [\"a\"] or [\"b\"]"
        );
        assert_eq!(
            err(
                json!({"additionalProperties": false, "properties": {"a": {}}}),
                json!({"b": 1})
            ),
            "additional properties forbidden, found b"
        );
        assert_eq!(err(json!({"type": "integer"}), json!(2.0)), "");
        assert!(Schema::compile(&json!({"type": "bogus"})).is_err());
    }
}
