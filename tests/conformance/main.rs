//! APISIX's own test suite as polygate's conformance suite.
//!
//! Each file in `cases/` retells one of APISIX's test files (`t/...`): the resources its
//! tests create through the Admin API, and each request with the response APISIX's test
//! expects. The runner keeps the resources of a file in a configuration file that the real
//! `polygate` binary watches (APISIX's tests likewise keep state from one test to the next),
//! and sends each request to it; upstreams answer as APISIX's test server does
//! ([`server`]). Every case names its source: the file and `TEST n`.
//!
//! Cases polygate knowingly answers differently are listed in [`KNOWN_DIFFERENCES`] with the
//! reason (and in `docs/compatibility.md`); any other failure fails the suite.
//!
//! The case language, one statement per line (`#` starts a comment):
//!
//! ```text
//! file t/router/radixtree-uri-sanity.t   a new file: no resources
//! apisix {"router": {"http": "radixtree_uri"}}   the `apisix:` section (config.yaml)
//! put routes/1 {...}                     an Admin API PUT: the body as APISIX takes it
//! delete routes/1
//! test 5: GET /hello                     a request; indented lines refine it:
//!   header Host: foo.com                 a request header
//!   body {"a": 1}                        the request body
//!   status 404                           the expected status (default 200)
//!   says hello world                     the expected body, as `ngx.say` prints it (+ "\n")
//!   prints 1981                          the expected body, exactly
//!   has text                             the body contains this
//!   like regex                           the body matches this
//!   resp-header Name: value              a response header
//!   no-resp-header Name                  a response header that must be absent
//!   spread 12 1980=6 1981=6              sent 12 times, these bodies this many times
//!   statuses 200 200 503                 sent once per status, each answered with it
//! ```
#![allow(missing_docs, clippy::unwrap_used)]

mod server;
#[path = "../e2e/support.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Cases polygate answers differently on purpose or has not implemented, with the reason.
/// Each is also listed in `docs/compatibility.md`.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[(
    "t/node/remote_addrs.t TEST 4",
    "APISIX's test environment takes the client address from X-Real-IP (nginx's realip module, \
     `set_real_ip_from 127.0.0.1`, before routing); polygate's real-ip plugin, like APISIX's, \
     runs after the route matched, so `remote_addrs` sees the peer's address",
)];

const FILES: &[(&str, &str)] = &[
    ("router.case", include_str!("cases/router.case")),
    ("node.case", include_str!("cases/node.case")),
    ("key-auth.case", include_str!("cases/key-auth.case")),
    (
        "proxy-rewrite.case",
        include_str!("cases/proxy-rewrite.case"),
    ),
    (
        "response-rewrite.case",
        include_str!("cases/response-rewrite.case"),
    ),
    ("core.case", include_str!("cases/core.case")),
    ("access.case", include_str!("cases/access.case")),
    ("shaping.case", include_str!("cases/shaping.case")),
    (
        "traffic-split.case",
        include_str!("cases/traffic-split.case"),
    ),
    (
        "request-validation.case",
        include_str!("cases/request-validation.case"),
    ),
    ("csrf.case", include_str!("cases/csrf.case")),
    ("limits.case", include_str!("cases/limits.case")),
    ("jwt-auth.case", include_str!("cases/jwt-auth.case")),
    ("real-ip.case", include_str!("cases/real-ip.case")),
    ("gzip.case", include_str!("cases/gzip.case")),
    ("api-breaker.case", include_str!("cases/api-breaker.case")),
];

#[derive(Debug, Default, Clone)]
struct Case {
    id: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    status: u16,
    checks: Vec<Check>,
}

#[derive(Debug, Clone)]
enum Check {
    Body(String),
    Has(String),
    Like(String),
    Header(String, String),
    NoHeader(String),
    /// Send the request this many times; bodies counted must match.
    Spread(usize, Vec<(String, usize)>),
    /// Send the request once per status; each answer must have it (the other checks apply
    /// to the last answer).
    Statuses(Vec<u16>),
}

enum Step {
    File,
    Apisix(Value),
    Put(String, String, Value),
    Delete(String, String),
    Test(Case),
}

fn parse(name: &str, text: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut file = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let at = || format!("{name}:{}", n + 1);
        let indented = line.starts_with(' ');
        if indented {
            let Some(Step::Test(c)) = steps.last_mut() else {
                panic!("{}: refinement outside a test", at());
            };
            let (word, rest) = t.split_once(' ').unwrap_or((t, ""));
            match word {
                "header" => {
                    let (k, v) = rest.split_once(':').expect("header Name: value");
                    c.headers.push((k.trim().into(), v.trim().into()));
                }
                "body" => c.body = unescape(rest),
                "status" => c.status = rest.parse().expect("status"),
                "says" => c.checks.push(Check::Body(unescape(rest) + "\n")),
                "prints" => c.checks.push(Check::Body(unescape(rest))),
                "has" => c.checks.push(Check::Has(unescape(rest))),
                "like" => c.checks.push(Check::Like(rest.into())),
                "resp-header" => {
                    let (k, v) = rest.split_once(':').expect("resp-header Name: value");
                    c.checks.push(Check::Header(
                        k.trim().to_ascii_lowercase(),
                        v.trim().into(),
                    ));
                }
                "no-resp-header" => c.checks.push(Check::NoHeader(rest.to_ascii_lowercase())),
                "spread" => {
                    let mut it = rest.split_whitespace();
                    let n = it
                        .next()
                        .and_then(|n| n.parse().ok())
                        .expect("spread N body=count...");
                    let counts = it
                        .map(|p| {
                            let (b, c) = p.split_once('=').expect("body=count");
                            (b.to_owned(), c.parse().expect("count"))
                        })
                        .collect();
                    c.checks.push(Check::Spread(n, counts));
                }
                "statuses" => c.checks.insert(
                    0,
                    Check::Statuses(
                        rest.split_whitespace()
                            .map(|s| s.parse().expect("statuses N N ..."))
                            .collect(),
                    ),
                ),
                other => panic!("{}: unknown refinement {other:?}", at()),
            }
            continue;
        }
        let (word, rest) = t.split_once(' ').unwrap_or((t, ""));
        match word {
            "file" => {
                file = rest.to_owned();
                steps.push(Step::File);
            }
            "apisix" => steps.push(Step::Apisix(
                serde_json::from_str(rest).unwrap_or_else(|e| panic!("{}: {e}", at())),
            )),
            "put" => {
                let (key, json) = rest.split_once(' ').expect("put kind/id {json}");
                let (kind, id) = key.split_once('/').expect("kind/id");
                let v: Value =
                    serde_json::from_str(json).unwrap_or_else(|e| panic!("{}: {e}", at()));
                steps.push(Step::Put(kind.into(), id.into(), v));
            }
            "delete" => {
                let (kind, id) = rest.split_once('/').expect("kind/id");
                steps.push(Step::Delete(kind.into(), id.into()));
            }
            "test" => {
                let (num, req) = rest.split_once(':').expect("test N: METHOD /path");
                let req = req.trim();
                let (method, path) = req.split_once(' ').expect("METHOD /path");
                steps.push(Step::Test(Case {
                    id: format!("{file} TEST {}", num.trim()),
                    method: method.into(),
                    path: path.into(),
                    status: 200,
                    ..Default::default()
                }));
            }
            other => panic!("{}: unknown statement {other:?}", at()),
        }
    }
    steps
}

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

/// The resources of the current file as a configuration file.
struct State {
    apisix: Option<Value>,
    resources: BTreeMap<String, BTreeMap<String, Value>>,
}

impl State {
    fn render(&self, port: u16, mport: u16, upstreams: &[(u16, String)]) -> String {
        let mut root = serde_json::json!({
            "gateway": {
                "listeners": [{"addr": format!("127.0.0.1:{port}")}],
                "worker_threads": 1,
                "watch_interval": 0.05,
                "metrics": {"addr": format!("127.0.0.1:{mport}")},
                "log_level": "warn",
                "access_log": {"enabled": false},
            }
        });
        if let Some(a) = &self.apisix {
            root["apisix"] = a.clone();
        }
        for (kind, items) in &self.resources {
            let mut list = Vec::new();
            for (id, v) in items {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    match kind.as_str() {
                        "consumers" => {
                            o.entry("username").or_insert(Value::String(id.clone()));
                        }
                        "plugin_metadata" => {
                            o.insert("id".into(), Value::String(id.clone()));
                        }
                        _ => {
                            o.insert("id".into(), Value::String(id.clone()));
                        }
                    }
                }
                list.push(v);
            }
            root[kind.as_str()] = Value::Array(list);
        }
        fix_array_nodes(&mut root, upstreams);
        let mut text = serde_json::to_string_pretty(&root).unwrap();
        for (logical, real) in upstreams {
            text = text.replace(&format!("127.0.0.1:{logical}"), real);
        }
        text + "\n#END\n"
    }
}

/// Nodes written as `{"host": "127.0.0.1", "port": 1980}` point at the test servers too.
fn fix_array_nodes(v: &mut Value, upstreams: &[(u16, String)]) {
    match v {
        Value::Object(o) => {
            if o.get("host").and_then(Value::as_str) == Some("127.0.0.1")
                && let Some(port) = o.get("port").and_then(Value::as_u64)
                && let Some((_, real)) = upstreams.iter().find(|(l, _)| u64::from(*l) == port)
                && let Some(p) = real.rsplit(':').next().and_then(|p| p.parse::<u64>().ok())
            {
                o.insert("port".into(), Value::from(p));
            }
            for x in o.values_mut() {
                fix_array_nodes(x, upstreams);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| fix_array_nodes(x, upstreams)),
        _ => {}
    }
}

/// The pipeline's counters, from `/status` on the metrics listener.
async fn changes_seen(mport: u16) -> u64 {
    let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), async {
        Ok::<_, ()>(get(mport, "/status").await)
    })
    .await
    else {
        return 0;
    };
    let j = r.json();
    j["config"]["commits"].as_u64().unwrap_or(0) + j["config"]["rejected"].as_u64().unwrap_or(0)
}

async fn run_case(port: u16, c: &Case) -> Result<(), String> {
    if let Some(Check::Spread(n, want)) = c.checks.first() {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..*n {
            let r = Conn::open(port)
                .await
                .send(&c.method, &c.path, &[], "")
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            *seen.entry(r.body.trim().to_owned()).or_default() += 1;
        }
        let want: BTreeMap<String, usize> = want.iter().cloned().collect();
        return if seen == want {
            Ok(())
        } else {
            Err(format!("bodies {seen:?} (want {want:?})"))
        };
    }
    let headers: Vec<(&str, &str)> = c
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut problems = Vec::new();
    let mut expect = c.status;
    if let Some(Check::Statuses(list)) = c.checks.first() {
        let (last, before) = list.split_last().ok_or("statuses: none given")?;
        let mut seen = Vec::new();
        for _ in before {
            let r = Conn::open(port)
                .await
                .send(&c.method, &c.path, &headers, &c.body)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            seen.push(r.status);
        }
        if seen != before {
            problems.push(format!("statuses {seen:?} (want {before:?} first)"));
        }
        expect = *last;
    }
    let r = Conn::open(port)
        .await
        .send(&c.method, &c.path, &headers, &c.body)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if r.status != expect {
        problems.push(format!(
            "status {} (want {}), body {:?}",
            r.status, expect, r.body
        ));
    }
    for ch in &c.checks {
        match ch {
            Check::Body(b) if r.body != *b => {
                problems.push(format!("body {:?} (want {b:?})", r.body))
            }
            Check::Has(s) if !r.body.contains(s.as_str()) => {
                problems.push(format!("body {:?} lacks {s:?}", r.body))
            }
            Check::Like(re) if !regex::Regex::new(re).unwrap().is_match(&r.body) => {
                problems.push(format!("body {:?} does not match {re:?}", r.body))
            }
            Check::Header(k, v) if r.header(k) != Some(v.as_str()) => {
                problems.push(format!("header {k}: {:?} (want {v:?})", r.header(k)))
            }
            Check::NoHeader(k) if r.header(k).is_some() => {
                problems.push(format!("header {k} present: {:?}", r.header(k)))
            }
            Check::Spread(..) => problems.push("spread must be the only check".into()),
            Check::Statuses(..) => {}
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn apisix_conformance() {
    let mut servers = Vec::new();
    for logical in [1980u16, 1981, 1982] {
        servers.push((logical, server::TestServer::start(logical).await));
    }
    let mut upstreams: Vec<(u16, String)> = servers
        .iter()
        .map(|(l, s)| (*l, s.addr.to_string()))
        .collect();
    // 1977 and 1979 are ports nothing listens on in APISIX's tests
    for logical in [1977u16, 1979] {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        upstreams.push((logical, closed.local_addr().unwrap().to_string()));
    }
    let mut results: Vec<(String, Result<(), String>)> = Vec::new();
    for (name, text) in FILES {
        let mut state = State {
            apisix: None,
            resources: BTreeMap::new(),
        };
        let port = free_port();
        let mport = free_port();
        let gw = Gateway::start_raw(port, &state.render(port, mport, &upstreams));
        let mut dirty = false;
        for step in parse(name, text) {
            match step {
                Step::File => {
                    state.apisix = None;
                    state.resources.clear();
                    dirty = true;
                }
                Step::Apisix(v) => {
                    state.apisix = Some(v);
                    dirty = true;
                }
                Step::Put(kind, id, v) => {
                    state.resources.entry(kind).or_default().insert(id, v);
                    dirty = true;
                }
                Step::Delete(kind, id) => {
                    if let Some(m) = state.resources.get_mut(&kind) {
                        m.remove(&id);
                    }
                    dirty = true;
                }
                Step::Test(c) => {
                    if dirty {
                        let before = changes_seen(mport).await;
                        gw.write_config(&state.render(port, mport, &upstreams));
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while changes_seen(mport).await <= before && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        dirty = false;
                    }
                    let r = run_case(port, &c).await;
                    if r.is_err() && std::env::var_os("CONFORMANCE_DEBUG").is_some() {
                        let log = gw.stderr();
                        let tail: Vec<&str> = log.lines().rev().take(8).collect();
                        eprintln!(
                            "--- {}:\n{}",
                            c.id,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                    results.push((c.id.clone(), r));
                }
            }
        }
    }
    let passed = results.iter().filter(|(_, r)| r.is_ok()).count();
    let failed: Vec<&(String, Result<(), String>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    println!("APISIX conformance ({} cases):", results.len());
    for (id, r) in &failed {
        let known = KNOWN_DIFFERENCES.iter().find(|(k, _)| k == id);
        println!(
            "  FAIL {id}: {}{}",
            r.as_ref().err().cloned().unwrap_or_default(),
            known
                .map(|(_, why)| format!(" [known: {why}]"))
                .unwrap_or_default()
        );
    }
    println!(
        "APISIX conformance: {passed} of {} cases behave as in APISIX ({:.1}%); {} known differences",
        results.len(),
        100.0 * passed as f64 / results.len().max(1) as f64,
        failed.len()
    );
    let unexpected: Vec<&String> = failed
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !KNOWN_DIFFERENCES.iter().any(|(k, _)| k == id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected conformance failures: {unexpected:#?}"
    );
    let fixed: Vec<&str> = KNOWN_DIFFERENCES
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| results.iter().any(|(id, r)| id == k && r.is_ok()))
        .collect();
    assert!(
        fixed.is_empty(),
        "known differences that now pass (update the list and docs/compatibility.md): {fixed:?}"
    );
    assert!(results.len() >= 200, "only {} cases", results.len());
}
