//! APISIX `vars` expressions: compiled from arbitrary JSON and evaluated against a fixed
//! set of variables.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use polygate_router::VarSource;
use polygate_router::expr::Expr;

struct Vars;

impl VarSource for Vars {
    fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            "uri" => Some(Cow::Borrowed("/a/b")),
            "arg_x" => Some(Cow::Borrowed("10")),
            "http_h" => Some(Cow::Borrowed("v, w")),
            "remote_addr" => Some(Cow::Borrowed("10.0.0.1")),
            _ => None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(e) = Expr::compile_vars(&v)
    {
        let _ = e.eval(&Vars);
    }
});
