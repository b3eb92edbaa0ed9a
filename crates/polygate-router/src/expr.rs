//! The lua-resty-expr DSL used by APISIX `vars`, `_meta.filter` and other rule lists.
//!
//! An expression is `[var, op, value]`, `[var, "!", op, value]`, or a logical list
//! `["AND" | "OR" | "!AND" | "!OR", expr, ...]`; a list whose first element is itself a list is
//! an implicit `AND`. Operators: `==`, `~=`, `>`, `>=`, `<`, `<=`, `~~` (regex), `~*`
//! (case-insensitive regex), `in`, `has`, `ipmatch`.

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

/// A literal to compare against: numbers compare numerically, everything else as strings.
#[derive(Debug, Clone)]
pub enum Operand {
    /// A number: the variable is converted with `tonumber` semantics.
    Num(f64),
    /// A string (booleans are compared as `true`/`false`).
    Str(String),
}

impl Operand {
    fn from_json(v: &Value, path: &str) -> Result<Operand, ExprError> {
        match v {
            Value::Number(n) => Ok(Operand::Num(n.as_f64().unwrap_or(0.0))),
            Value::String(s) => Ok(Operand::Str(s.clone())),
            Value::Bool(b) => Ok(Operand::Str(b.to_string())),
            other => Err(err(path, format!("unsupported operand {other}"))),
        }
    }

    fn equals(&self, l: &str) -> bool {
        match self {
            Operand::Num(n) => l.trim().parse::<f64>().is_ok_and(|x| x == *n),
            Operand::Str(s) => s == l,
        }
    }
}

impl Expr {
    /// Compiles an expression from its JSON form.
    pub fn compile(v: &Value) -> Result<Expr, ExprError> {
        compile_at(v, "")
    }

    /// Compiles a rule list as used by `vars` (an implicit `AND` when the first element is a
    /// list). An empty list always holds.
    pub fn compile_vars(v: &Value) -> Result<Expr, ExprError> {
        match v {
            Value::Array(a) if a.is_empty() => Ok(Expr::And(Vec::new())),
            Value::Array(_) => compile_at(v, ""),
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
        Value::String(s) if matches!(s.as_str(), "AND" | "OR" | "!AND" | "!OR") => {
            let mut out = Vec::with_capacity(a.len() - 1);
            for (i, e) in a.iter().enumerate().skip(1) {
                out.push(compile_at(e, &format!("{path}[{i}]"))?);
            }
            let g = if s.ends_with("AND") {
                Expr::And(out)
            } else {
                Expr::Or(out)
            };
            Ok(if s.starts_with('!') {
                Expr::Not(Box::new(g))
            } else {
                g
            })
        }
        Value::String(var) => {
            let (negate, op_idx) = match a.get(1) {
                Some(Value::String(s)) if s == "!" => (true, 2),
                _ => (false, 1),
            };
            let op = match a.get(op_idx) {
                Some(Value::String(s)) => s.as_str(),
                _ => return Err(err(&format!("{path}[{op_idx}]"), "missing operator")),
            };
            let vpath = format!("{path}[{}]", op_idx + 1);
            let Some(val) = a.get(op_idx + 1) else {
                return Err(err(&vpath, format!("missing value for operator {op:?}")));
            };
            if a.len() > op_idx + 2 {
                return Err(err(path, "too many elements in expression"));
            }
            let op = compile_op(op, val, &vpath, &format!("{path}[{op_idx}]"))?;
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

fn num(v: &Value, path: &str) -> Result<f64, ExprError> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| err(path, format!("{s:?} is not a number"))),
        other => Err(err(path, format!("{other} is not a number"))),
    }
}

fn compile_op(op: &str, val: &Value, vpath: &str, oppath: &str) -> Result<Op, ExprError> {
    Ok(match op {
        "==" => Op::Eq(Operand::from_json(val, vpath)?),
        "~=" => Op::Ne(Operand::from_json(val, vpath)?),
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
        "in" => {
            let Value::Array(items) = val else {
                return Err(err(vpath, "operator \"in\" needs an array"));
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                out.push(Operand::from_json(it, &format!("{vpath}[{i}]"))?);
            }
            Op::In(out)
        }
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
        // An unset variable equals nothing and differs from everything.
        return matches!(op, Op::Ne(_));
    };
    let lnum = || l.trim().parse::<f64>().ok();
    match op {
        Op::Eq(r) => r.equals(l),
        Op::Ne(r) => !r.equals(l),
        Op::Gt(r) => lnum().is_some_and(|x| x > *r),
        Op::Ge(r) => lnum().is_some_and(|x| x >= *r),
        Op::Lt(r) => lnum().is_some_and(|x| x < *r),
        Op::Le(r) => lnum().is_some_and(|x| x <= *r),
        Op::Regex(re) | Op::IRegex(re) => re.is_match(l),
        Op::In(list) => list.iter().any(|r| r.equals(l)),
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
