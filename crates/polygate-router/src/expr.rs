//! The lua-resty-expr DSL used by APISIX `vars`, `_meta.filter` and other rule lists.
//!
//! An expression is `[var, op, value]`, `[var, "!", op, value]`, `[var, value]` (meaning
//! `==`), or a logical list `["AND" | "OR" | "!AND" | "!OR", expr, expr, ...]`; a list whose
//! first element is itself a list is an implicit `AND`. Operators: `==`, `~=`, `>`, `>=`,
//! `<`, `<=`, `~~` (regex), `~*` (case-insensitive regex), `in`, `has`, `ipmatch`.
//!
//! Semantics follow lua-resty-expr (`lib/resty/expr/v1.lua`): operators are case-insensitive
//! (`IN`), logical operators too (`and`); a `null` value stands for an unset variable (so
//! `["arg_x", "==", null]` holds when `x` is absent); a number compares numerically with `==`,
//! `~=` and the orderings, but an `in` list compares raw values, so a number there never
//! equals a (string) variable; elements after the value are ignored.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;
use serde_json::Value;

/// Supplies variable values (`uri`, `arg_name`, `http_x_foo`, `cookie_a`, `remote_addr`, ...).
pub trait VarSource {
    /// The value of variable `name`, or `None` when unset.
    fn var(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// An error in an expression, with the position inside the expression (`[1][2]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ExprError {
    /// Position below the expression's own key path, e.g. `[0][2]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn err(path: &str, message: impl Into<String>) -> ExprError {
    ExprError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// All must hold.
    And(Vec<Expr>),
    /// One must hold.
    Or(Vec<Expr>),
    /// Negation of a logical group (`!AND`, `!OR`).
    Not(Box<Expr>),
    /// A comparison.
    Cmp {
        /// Variable name.
        var: String,
        /// Operator with its compiled operand.
        op: Op,
        /// `[var, "!", op, value]`.
        negate: bool,
    },
}

/// A comparison operator with its operand.
#[derive(Debug, Clone)]
pub enum Op {
    /// `==`.
    Eq(Operand),
    /// `~=`.
    Ne(Operand),
    /// `>`.
    Gt(f64),
    /// `>=`.
    Ge(f64),
    /// `<`.
    Lt(f64),
    /// `<=`.
    Le(f64),
    /// `~~`.
    Regex(Regex),
    /// `~*`.
    IRegex(Regex),
    /// `in`.
    In(Vec<Operand>),
    /// `has`.
    Has(String),
    /// `ipmatch`.
    IpMatch(Vec<IpNet>),
}

/// A literal to compare against.
#[derive(Debug, Clone)]
pub enum Operand {
    /// A number: `==`/`~=` convert the variable with `tonumber` semantics.
    Num(f64),
    /// A string.
    Str(String),
    /// `null` (or no value): equal to an unset variable only.
    Null,
    /// A boolean or another JSON value: never equal to a variable (variables are strings).
    Other,
}

impl Operand {
    fn from_json(v: &Value) -> Operand {
        match v {
            Value::Number(n) => Operand::Num(n.as_f64().unwrap_or(0.0)),
            Value::String(s) => Operand::Str(s.clone()),
            Value::Null => Operand::Null,
            _ => Operand::Other,
        }
    }

    /// `==` of lua-resty-expr (numbers converted).
    fn equals(&self, l: &str) -> bool {
        match self {
            Operand::Num(n) => lua_tonumber(l).is_some_and(|x| x == *n),
            Operand::Str(s) => s == l,
            Operand::Null | Operand::Other => false,
        }
    }

    /// Raw equality (`in`): a string variable equals only a string.
    fn raw_equals(&self, l: &str) -> bool {
        matches!(self, Operand::Str(s) if s == l)
    }
}

/// Lua's `tonumber` on a string: surrounding spaces allowed, decimal or `0x` hex.
fn lua_tonumber(s: &str) -> Option<f64> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return i64::from_str_radix(h, 16).ok().map(|v| v as f64);
    }
    if t.eq_ignore_ascii_case("inf") || t.eq_ignore_ascii_case("nan") || t.contains("inf") {
        return None;
    }
    t.parse::<f64>().ok()
}

impl Expr {
    /// Compiles an expression from its JSON form.
    pub fn compile(v: &Value) -> Result<Expr, ExprError> {
        compile_at(v, "")
    }

    /// Compiles a rule list as used by `vars` (an implicit `AND` when the first element is a
    /// list). An empty list always holds; a bare expression (`["arg_a", "==", "1"]`) is
    /// refused as lua-resty-expr refuses it: rules are wrapped in a list.
    pub fn compile_vars(v: &Value) -> Result<Expr, ExprError> {
        match v {
            Value::Array(a) if a.is_empty() => Ok(Expr::And(Vec::new())),
            Value::Array(a) => {
                if let Some(Value::String(s)) = a.first()
                    && logic_op(s).is_none()
                {
                    return Err(err("", "rule should be wrapped inside brackets"));
                }
                compile_at(v, "")
            }
            _ => Err(err("", "must be an array")),
        }
    }

    /// Evaluates against the variables of a request.
    pub fn eval(&self, vars: &dyn VarSource) -> bool {
        match self {
            Expr::And(list) => list.iter().all(|e| e.eval(vars)),
            Expr::Or(list) => list.iter().any(|e| e.eval(vars)),
            Expr::Not(e) => !e.eval(vars),
            Expr::Cmp { var, op, negate } => {
                let v = vars.var(var);
                let r = compare(op, v.as_deref());
                r != *negate
            }
        }
    }
}

fn compile_at(v: &Value, path: &str) -> Result<Expr, ExprError> {
    let Value::Array(a) = v else {
        return Err(err(path, "expression must be an array"));
    };
    let Some(first) = a.first() else {
        return Err(err(path, "empty expression"));
    };
    match first {
        Value::Array(_) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, e) in a.iter().enumerate() {
                out.push(compile_at(e, &format!("{path}[{i}]"))?);
            }
            Ok(Expr::And(out))
        }
        Value::String(s) if logic_op(s).is_some() => {
            if a.len() <= 2 {
                return Err(err(path, "rule too short"));
            }
            let mut out = Vec::with_capacity(a.len() - 1);
            for (i, e) in a.iter().enumerate().skip(1) {
                out.push(compile_at(e, &format!("{path}[{i}]"))?);
            }
            let op = logic_op(s).unwrap_or("AND");
            let g = if op.ends_with("AND") {
                Expr::And(out)
            } else {
                Expr::Or(out)
            };
            Ok(if op.starts_with('!') {
                Expr::Not(Box::new(g))
            } else {
                g
            })
        }
        Value::String(var) => {
            // [var, "!", op, value] | [var, op, value] | [var, value] (==)
            let (negate, op_v, val) = if a.len() == 4 {
                if a.get(1) != Some(&Value::String("!".into())) {
                    return Err(err(&format!("{path}[1]"), "bad 'not' expression"));
                }
                (true, a.get(2), a.get(3))
            } else {
                (false, a.get(1), a.get(2))
            };
            let op_idx = if negate { 2 } else { 1 };
            let vpath = format!("{path}[{}]", op_idx + 1);
            let oppath = format!("{path}[{op_idx}]");
            let op_name = match op_v {
                Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
                _ => None,
            };
            let known = op_name.as_deref().is_some_and(is_operator);
            let (op, val) = match (op_name, val) {
                (Some(op), Some(v)) if known => (op, v.clone()),
                (Some(op), None) if known => (op, Value::Null),
                // two elements: [var, value] means ==
                (_, None) if op_v.is_some_and(|v| !v.is_null()) => {
                    ("==".to_owned(), op_v.cloned().unwrap_or(Value::Null))
                }
                (None, _) => return Err(err(&oppath, "invalid expression")),
                (Some(op), _) => {
                    return Err(err(&oppath, format!("invalid operator '{op}'")));
                }
            };
            let op = compile_op(&op, &val, &vpath, &oppath)?;
            Ok(Expr::Cmp {
                var: var.clone(),
                op,
                negate,
            })
        }
        _ => Err(err(
            &format!("{path}[0]"),
            "expected a variable name or AND/OR",
        )),
    }
}

/// `AND`, `OR`, `!AND`, `!OR` in any case.
fn logic_op(s: &str) -> Option<&'static str> {
    ["AND", "OR", "!AND", "!OR"]
        .into_iter()
        .find(|op| op.eq_ignore_ascii_case(s))
}

fn is_operator(op: &str) -> bool {
    matches!(
        op,
        "==" | "~=" | ">" | ">=" | "<" | "<=" | "~~" | "~*" | "in" | "has" | "ipmatch"
    )
}

/// An ordering operand: a number, or a string Lua's `tonumber` converts; anything else
/// makes the comparison always false (NaN).
fn num(v: &Value, path: &str) -> Result<f64, ExprError> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => {
            lua_tonumber(s).ok_or_else(|| err(path, format!("{s:?} is not a number")))
        }
        _ => Ok(f64::NAN),
    }
}

fn compile_op(op: &str, val: &Value, vpath: &str, oppath: &str) -> Result<Op, ExprError> {
    Ok(match op {
        "==" => Op::Eq(Operand::from_json(val)),
        "~=" => Op::Ne(Operand::from_json(val)),
        ">" => Op::Gt(num(val, vpath)?),
        ">=" => Op::Ge(num(val, vpath)?),
        "<" => Op::Lt(num(val, vpath)?),
        "<=" => Op::Le(num(val, vpath)?),
        "~~" | "~*" => {
            let Value::String(p) = val else {
                return Err(err(vpath, "regex must be a string"));
            };
            let src = if op == "~*" {
                format!("(?i){p}")
            } else {
                p.clone()
            };
            let re =
                Regex::new(&src).map_err(|e| err(vpath, format!("invalid regex {p:?}: {e}")))?;
            if op == "~*" {
                Op::IRegex(re)
            } else {
                Op::Regex(re)
            }
        }
        "in" => match val {
            Value::Array(items) => Op::In(items.iter().map(Operand::from_json).collect()),
            // lua-resty-expr: `in` with anything but a list holds for nothing
            _ => Op::In(Vec::new()),
        },
        "has" => match val {
            Value::String(s) => Op::Has(s.clone()),
            Value::Number(n) => Op::Has(n.to_string()),
            _ => return Err(err(vpath, "operator \"has\" needs a string")),
        },
        "ipmatch" => {
            let items: Vec<&Value> = match val {
                Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            let mut nets = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                let Value::String(s) = it else {
                    return Err(err(
                        &format!("{vpath}[{i}]"),
                        "expected an IP or CIDR string",
                    ));
                };
                let net = polygate_model::validate::parse_cidr(s).ok_or_else(|| {
                    err(
                        &format!("{vpath}[{i}]"),
                        format!("{s:?} is not an IP or CIDR"),
                    )
                })?;
                nets.push(net);
            }
            Op::IpMatch(nets)
        }
        other => return Err(err(oppath, format!("unknown operator {other:?}"))),
    })
}

fn compare(op: &Op, l: Option<&str>) -> bool {
    let Some(l) = l else {
        // An unset variable equals only null and differs from everything else.
        return match op {
            Op::Eq(r) => matches!(r, Operand::Null),
            Op::Ne(r) => !matches!(r, Operand::Null),
            _ => false,
        };
    };
    let lnum = || l.trim().parse::<f64>().ok();
    match op {
        Op::Eq(r) => r.equals(l),
        // lua-resty-expr: `~=` a number is true when the variable is not a number
        Op::Ne(r) => !r.equals(l),
        Op::Gt(r) => lnum().is_some_and(|x| x > *r),
        Op::Ge(r) => lnum().is_some_and(|x| x >= *r),
        Op::Lt(r) => lnum().is_some_and(|x| x < *r),
        Op::Le(r) => lnum().is_some_and(|x| x <= *r),
        Op::Regex(re) | Op::IRegex(re) => re.is_match(l),
        Op::In(list) => list.iter().any(|r| r.raw_equals(l)),
        Op::Has(r) => l == r || l.split(',').any(|p| p.trim() == r),
        Op::IpMatch(nets) => l
            .parse::<IpAddr>()
            .is_ok_and(|ip| nets.iter().any(|n| n.contains(&ip))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct M(HashMap<&'static str, &'static str>);
    impl VarSource for M {
        fn var(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.get(name).map(|s| Cow::Borrowed(*s))
        }
    }

    fn ev(e: Value, vars: &[(&'static str, &'static str)]) -> bool {
        Expr::compile_vars(&e)
            .unwrap()
            .eval(&M(vars.iter().copied().collect()))
    }

    #[test]
    fn operators() {
        let v = [
            ("arg_a", "10"),
            ("http_x", "Hello"),
            ("remote_addr", "10.1.2.3"),
            ("arg_l", "a, b"),
        ];
        assert!(ev(json!([["arg_a", "==", 10]]), &v));
        assert!(ev(json!([["arg_a", "==", "10"]]), &v));
        assert!(ev(json!([["arg_a", "~=", "11"]]), &v));
        assert!(ev(json!([["arg_a", ">", 9], ["arg_a", "<=", 10]]), &v));
        assert!(!ev(json!([["arg_a", ">", 10]]), &v));
        assert!(ev(json!([["http_x", "~~", "^H.l"]]), &v));
        assert!(!ev(json!([["http_x", "~~", "^h"]]), &v));
        assert!(ev(json!([["http_x", "~*", "^h"]]), &v));
        assert!(ev(json!([["http_x", "in", ["a", "Hello"]]]), &v));
        assert!(ev(json!([["arg_l", "has", "b"]]), &v));
        assert!(ev(json!([["remote_addr", "ipmatch", ["10.0.0.0/8"]]]), &v));
        assert!(!ev(
            json!([["remote_addr", "ipmatch", "192.168.0.0/16"]]),
            &v
        ));
        assert!(ev(json!([["arg_a", "!", "==", 11]]), &v));
        assert!(ev(json!([["missing", "~=", "x"]]), &v));
        assert!(!ev(json!([["missing", "==", "x"]]), &v));
    }

    #[test]
    fn logic() {
        let v = [("arg_a", "1")];
        assert!(ev(
            json!(["OR", ["arg_a", "==", "2"], ["arg_a", "==", "1"]]),
            &v
        ));
        assert!(!ev(
            json!(["AND", ["arg_a", "==", "2"], ["arg_a", "==", "1"]]),
            &v
        ));
        assert!(ev(
            json!(["!AND", ["arg_a", "==", "2"], ["arg_a", "==", "1"]]),
            &v
        ));
        assert!(ev(
            json!([[
                "OR",
                ["arg_a", "==", "3"],
                ["AND", ["arg_a", ">", 0], ["arg_a", "<", 2]]
            ]]),
            &v
        ));
    }

    /// Cases from lua-resty-expr's own tests (`t/v1/*.t`, `t/validate.t`) and APISIX's
    /// `t/router/radixtree-uri-vars.t`, in this crate's terms.
    #[test]
    fn lua_resty_expr_semantics() {
        let v = [("arg_k", "v"), ("arg_n", "10"), ("http_x", "a")];
        // operators in any case; logical operators too
        assert!(ev(json!([["arg_k", "IN", ["v", "w"]]]), &v));
        assert!(ev(json!([["arg_k", "In", ["v"]]]), &v));
        assert!(ev(
            json!(["or", ["arg_k", "==", "x"], ["arg_k", "==", "v"]]),
            &v
        ));
        // two elements: ==
        assert!(ev(json!([["arg_k", "v"]]), &v));
        assert!(!ev(json!([["arg_k", "w"]]), &v));
        // null: the variable is unset
        assert!(ev(json!([["arg_missing", "==", null]]), &v));
        assert!(!ev(json!([["arg_k", "==", null]]), &v));
        assert!(ev(json!([["arg_k", "~=", null]]), &v));
        // an `in` list compares raw values: a number never equals a string variable
        assert!(!ev(json!([["arg_n", "in", [10]]]), &v));
        assert!(ev(json!([["arg_n", "in", ["10"]]]), &v));
        assert!(ev(json!([["arg_n", "==", 10]]), &v));
        assert!(ev(json!([["arg_n", "==", "10"]]), &v));
        assert!(
            ev(json!([["arg_k", "~=", 10]]), &v),
            "not a number: differs"
        );
        assert!(ev(json!([["arg_n", ">", "9"]]), &v));
        assert!(ev(json!([["arg_n", "==", 16]]), &[("arg_n", "0x10")]));
        // a boolean never equals a variable
        assert!(!ev(json!([["arg_k", "==", true]]), &[("arg_k", "true")]));
        // four elements need "!"; with five or more, those after the value are ignored
        assert!(ev(json!([["arg_k", "==", "v", "x", "y"]]), &v));
        assert!(Expr::compile_vars(&json!([["arg_k", "==", "v", "x"]])).is_err());
        for bad in [
            json!(["arg_k", "==", "v"]),
            json!([["arg_k", "=~", "v"]]),
            json!(["AND", ["arg_k", "==", "v"]]),
            json!([["arg_k", "?", "==", "v"]]),
        ] {
            assert!(Expr::compile_vars(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_have_paths() {
        let e =
            Expr::compile_vars(&json!([["a", "==", "b"], ["x", "~~", "(unclosed"]])).unwrap_err();
        assert_eq!(e.path, "[1][2]");
        assert!(e.message.contains("invalid regex"));
        let e = Expr::compile_vars(&json!([["a", "=~", "b"]])).unwrap_err();
        assert_eq!(e.path, "[0][1]");
    }
}
