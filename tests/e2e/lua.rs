//! The Lua layer through the real gateway: every `ngx` function the docs list (one request per
//! behaviour), `ngx.load_ffi` against the Go and Rust echo runtimes, the plugins, errors and
//! limits.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// One behaviour: a route running `lua` (a plugin configuration) and one request to it.
struct Case {
    name: &'static str,
    plugins: serde_json::Value,
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    check: fn(&Resp),
}

fn access(code: &str) -> serde_json::Value {
    json!({"lua": {"access": code}})
}

fn case(name: &'static str, code: &str, path: &'static str, check: fn(&Resp)) -> Case {
    Case {
        name,
        plugins: access(code),
        method: "GET",
        path,
        headers: &[],
        body: "",
        check,
    }
}

/// Starts a gateway with one route per case (`/<name>/*`) plus `extra` gateway settings.
fn start(cases: &[Case], upstream: &str, gateway_extra: serde_json::Value) -> Gateway {
    let port = free_port();
    let mut gw = json!({
        "listeners": [{"addr": format!("127.0.0.1:{port}")}],
        "worker_threads": 2,
        "watch_interval": 0.2,
    });
    if let (Some(g), Some(extra)) = (gw.as_object_mut(), gateway_extra.as_object()) {
        for (k, v) in extra {
            g.insert(k.clone(), v.clone());
        }
    }
    let routes: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            json!({
                "id": c.name,
                "uris": [format!("/{}", c.name), format!("/{}/*", c.name)],
                "upstream": {"nodes": {upstream: 1}, "type": "roundrobin"},
                "plugins": c.plugins,
            })
        })
        .collect();
    let cfg = json!({"gateway": gw, "routes": routes});
    Gateway::start_raw(port, &format!("{cfg}\n#END\n"))
}

async fn run_cases(gw: &Gateway, cases: &[Case]) {
    for c in cases {
        let mut headers: Vec<(&str, &str)> = c.headers.to_vec();
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            headers.push(("host", "example.com"));
        }
        let r = request(gw.port, c.method, c.path, &headers, c.body).await;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.check)(&r)));
        if res.is_err() {
            panic!(
                "case {} failed: {} {:?} {:?}\nstderr:\n{}",
                c.name,
                r.status,
                r.headers,
                r.body,
                tail(&gw.stderr())
            );
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn body_is(r: &Resp, status: u16, body: &str) {
    assert_eq!((r.status, r.body.as_str()), (status, body));
}

#[tokio::test(flavor = "multi_thread")]
async fn ngx_var_req_and_response_api() {
    let u = Upstream::start("u").await;
    let cases = vec![
        Case {
            headers: &[
                ("x-test", "xt"),
                ("cookie", "sid=abc; o=1"),
                ("host", "example.com:8080"),
            ],
            ..case(
                "vars",
                r#"local v = ngx.var
                ngx.say(v.uri, "|", v.request_uri, "|", v.args, "|", v.arg_a, "|", v.arg_none,
                  "|", v.http_x_test, "|", v.cookie_sid, "|", v.remote_addr, "|", v.host, "|",
                  v.scheme, "|", v.request_method, "|", v.server_port ~= nil)"#,
                "/vars/p?a=1&b=2",
                |r| {
                    body_is(
                        r,
                        200,
                        "/vars/p|/vars/p?a=1&b=2|a=1&b=2|1|nil|xt|abc|127.0.0.1|example.com|http|GET|true\n",
                    )
                },
            )
        },
        case(
            "varset",
            r#"ngx.var.args = "z=9"; ngx.var.my_var = "on"
            local ok, err = pcall(function() ngx.var.uri = "/x" end)
            ngx.req.set_header("x-my-var", ngx.var.my_var .. "," .. tostring(ok))"#,
            "/varset/a?old=1",
            |r| {
                assert_eq!(r.json()["uri"], "/varset/a?z=9");
                assert_eq!(r.seen_header("x-my-var").as_deref(), Some("on,false"));
            },
        ),
        case(
            "method",
            r#"ngx.req.set_header("x-orig-method", ngx.req.get_method())
            ngx.req.set_method(ngx.HTTP_POST)"#,
            "/method",
            |r| {
                assert_eq!(r.json()["method"], "POST");
                assert_eq!(r.seen_header("x-orig-method").as_deref(), Some("GET"));
            },
        ),
        Case {
            headers: &[("x-multi", "a"), ("x-multi", "b"), ("X-Single", "s")],
            ..case(
                "getheaders",
                r#"local h = ngx.req.get_headers()
                ngx.say(h["X-Multi"][1], ",", h.x_multi[2], ",", h["x-single"], ",", h.X_Single, ",", h.host)"#,
                "/getheaders",
                |r| body_is(r, 200, "a,b,s,s,example.com\n"),
            )
        },
        Case {
            headers: &[("x-remove", "1"), ("x-keep", "k")],
            ..case(
                "setheader",
                r#"ngx.req.set_header("X-Added", "1")
                ngx.req.set_header("X-Num", 42)
                ngx.req.clear_header("X-Remove")"#,
                "/setheader",
                |r| {
                    assert_eq!(r.seen_header("x-added").as_deref(), Some("1"));
                    assert_eq!(r.seen_header("x-num").as_deref(), Some("42"));
                    assert_eq!(r.seen_header("x-keep").as_deref(), Some("k"));
                    assert_eq!(r.seen_header("x-remove"), None);
                },
            )
        },
        case(
            "badheader",
            r#"local ok, err = pcall(ngx.req.set_header, "bad name", "v")
            local ok2, err2 = pcall(ngx.req.set_header, "x-ok", "bad\nvalue")
            ngx.req.set_header("Host", "other.example")
            ngx.say(ok, "|", err, "|", ok2, "|", err2 ~= nil, "|", ngx.var.host)"#,
            "/badheader",
            |r| {
                body_is(
                    r,
                    200,
                    "false|ngx.req.set_header: invalid header name \"bad name\"|false|true|other.example\n",
                )
            },
        ),
        case(
            "uriargs",
            r#"local a = ngx.req.get_uri_args()
            ngx.say(a.a, ",", a.b[1], a.b[2], ",", tostring(a.flag), ",", a.sp)"#,
            "/uriargs?a=1&b=x&b=y&flag&sp=a%20b+c",
            |r| body_is(r, 200, "1,xy,true,a b c\n"),
        ),
        case(
            "seturi",
            r#"ngx.req.set_uri("/new path")"#,
            "/seturi/old?keep=1",
            |r| assert_eq!(r.json()["uri"], "/new%20path?keep=1"),
        ),
        case(
            "seturiargs",
            r#"ngx.req.set_uri_args({q = "a b", n = 1, f = true})"#,
            "/seturiargs?old=1",
            |r| assert_eq!(r.json()["uri"], "/seturiargs?f&n=1&q=a%20b"),
        ),
        Case {
            method: "POST",
            body: "hello body",
            ..case(
                "readbody",
                r#"ngx.req.read_body()
                ngx.say("got: ", ngx.req.get_body_data())"#,
                "/readbody",
                |r| body_is(r, 200, "got: hello body\n"),
            )
        },
        Case {
            method: "POST",
            body: "original",
            ..case(
                "setbody",
                r#"ngx.req.read_body()
                ngx.req.set_body_data(ngx.req.get_body_data() .. "+replaced")"#,
                "/setbody",
                |r| assert_eq!(r.json()["body"], "original+replaced"),
            )
        },
        case(
            "header",
            r#"ngx.header["X-From-Lua"] = "1"
            ngx.header.x_multi = {"a", "b"}
            ngx.header["X-Gone"] = nil"#,
            "/header",
            |r| {
                assert_eq!(r.status, 200);
                assert_eq!(r.header("x-from-lua"), Some("1"));
                assert!(r.header("x-multi").is_some());
                assert_eq!(r.json()["name"], "u", "proxied");
            },
        ),
        case(
            "status",
            r#"ngx.status = 201
            ngx.say("created ", ngx.status)"#,
            "/status",
            |r| body_is(r, 201, "created 201\n"),
        ),
        case(
            "print",
            r#"ngx.print({"a", {"b", "c"}}, 1, true, nil)"#,
            "/print",
            |r| {
                body_is(r, 200, "abc1truenil");
                assert_eq!(r.header("content-type"), Some("text/plain"));
            },
        ),
        case("exit403", r#"ngx.exit(403)"#, "/exit403", |r| {
            assert_eq!(r.status, 403);
            assert!(r.body.contains("403 Forbidden"), "{}", r.body);
        }),
        case(
            "exitok",
            r#"ngx.req.set_header("x-before-exit", "1"); ngx.exit(ngx.OK); ngx.req.set_header("x-after-exit", "1")"#,
            "/exitok",
            |r| {
                assert_eq!(r.seen_header("x-before-exit").as_deref(), Some("1"));
                assert_eq!(
                    r.seen_header("x-after-exit"),
                    None,
                    "code after ngx.exit does not run"
                );
            },
        ),
        case(
            "exitjson",
            r#"ngx.header["Content-Type"] = "application/json"
            ngx.say('{"ok":true}')
            ngx.exit(ngx.HTTP_OK)"#,
            "/exitjson",
            |r| {
                body_is(r, 200, "{\"ok\":true}\n");
                assert_eq!(r.header("content-type"), Some("application/json"));
            },
        ),
        case(
            "exitpcall",
            r#"pcall(ngx.exit, 409); ngx.say("not reached")"#,
            "/exitpcall",
            |r| assert_eq!(r.status, 409, "pcall cannot catch ngx.exit"),
        ),
        case(
            "log",
            r#"ngx.log(ngx.ERR, "lua-log-marker ", 42, " ", nil, " ", true)
            ngx.log(ngx.WARN, "warn-marker")
            print("print-marker")"#,
            "/log",
            |r| assert_eq!(r.status, 200),
        ),
        Case {
            plugins: json!({"lua": {"log": "ngx.log(ngx.ERR, 'log-status ', ngx.status)"}}),
            ..case("logstatus", "", "/logstatus", |r| assert_eq!(r.status, 200))
        },
        Case {
            plugins: json!({"lua": {
                "rewrite": "ngx.ctx.v = 'from-rewrite'",
                "access": "ngx.ctx.n = 2; ngx.header['X-Ctx-Access'] = ngx.ctx.v",
                "header_filter": "ngx.header['X-Ctx'] = ngx.ctx.v .. ':' .. ngx.ctx.n"
            }}),
            ..case("ctx", "", "/ctx", |r| {
                assert_eq!(r.header("x-ctx"), Some("from-rewrite:2"));
                assert_eq!(r.header("x-ctx-access"), Some("from-rewrite"));
            })
        },
        case(
            "sleep",
            r#"local t0 = ngx.now()
            ngx.sleep(0.2)
            ngx.update_time()
            local dt = ngx.now() - t0
            ngx.say(dt >= 0.19 and dt < 2, " ", ngx.time() == math.floor(ngx.now()), " ", type(ngx.time()))"#,
            "/sleep",
            |r| body_is(r, 200, "true true number\n"),
        ),
        case(
            "httptime",
            r#"ngx.say(ngx.http_time(1290079655), "|", #ngx.today(), "|", #ngx.utctime())"#,
            "/httptime",
            |r| body_is(r, 200, "Thu, 18 Nov 2010 11:27:35 GMT|10|19\n"),
        ),
        case(
            "rematch",
            r#"local m = ngx.re.match("hello-1234", [[([a-z]+)-(?<num>\d+)(x)?]], "jo")
            local ctx = {pos = 7}
            local m2 = ngx.re.match("hello-1234", [[\d]], "", ctx)
            ngx.say(m[0], ",", m[1], ",", m.num, ",", tostring(m[3]), ",", m2[0], ",", ctx.pos)"#,
            "/rematch",
            |r| body_is(r, 200, "hello-1234,hello,1234,false,1,8\n"),
        ),
        case(
            "renomatch",
            r#"local a = ngx.re.match("ABC", "abc", "i")
            local b = ngx.re.match("x", "y")
            local c, err = ngx.re.match("x", "(")
            local d = ngx.re.match("xabc", "abc", "a")
            ngx.say(a[0], ",", tostring(b), ",", tostring(c), ",", err ~= nil, ",", tostring(d))"#,
            "/renomatch",
            |r| body_is(r, 200, "ABC,nil,nil,true,nil\n"),
        ),
        case(
            "refind",
            r#"local from, to = ngx.re.find("abc123", [[\d+]], "jo")
            local f2, t2 = ngx.re.find("abc123", [[([a-z]+)(\d+)]], "", nil, 2)
            ngx.say(from, ",", to, ",", f2, ",", t2)"#,
            "/refind",
            |r| body_is(r, 200, "4,6,4,6\n"),
        ),
        case(
            "regmatch",
            r#"local out = {}
            for m in ngx.re.gmatch("a1b22c333", [[(\d)(\d*)]]) do out[#out + 1] = m[0] .. ":" .. m[1] end
            ngx.say(table.concat(out, ";"))"#,
            "/regmatch",
            |r| body_is(r, 200, "1:1;22:2;333:3\n"),
        ),
        case(
            "resub",
            r#"local s, n = ngx.re.sub("hello world", "o", "0")
            local g, gn = ngx.re.gsub("a1b2", [[(\d)]], "<$1>")
            local f, fn = ngx.re.gsub("a1b2", [[\d]], function(m) return "[" .. m[0] * 2 .. "]" end)
            local e = ngx.re.gsub("abc", "", "-")
            ngx.say(s, " ", n, "|", g, " ", gn, "|", f, " ", fn, "|", e, "|", (ngx.re.gsub("a$b", [[\$]], "$$")))"#,
            "/resub",
            |r| body_is(r, 200, "hell0 world 1|a<1>b<2> 2|a[2]b[4] 2|-a-b-c-|a$b\n"),
        ),
        case(
            "base64",
            r#"ngx.say(ngx.encode_base64("hello?"), ",", ngx.decode_base64("aGVsbG8/"), ",",
              tostring(ngx.decode_base64("!!")), ",", ngx.encode_base64("a", true))"#,
            "/base64",
            |r| body_is(r, 200, "aGVsbG8/,hello?,nil,YQ\n"),
        ),
        case(
            "digest",
            r#"ngx.say(ngx.md5("abc"), ",", ngx.encode_base64(ngx.sha1_bin("abc")), ",",
              ngx.encode_base64(ngx.hmac_sha1("key", "The quick brown fox jumps over the lazy dog")))"#,
            "/digest",
            |r| {
                body_is(
                    r,
                    200,
                    "900150983cd24fb0d6963f7d28e17f72,qZk+NkcGgWq6PiVxeFDCbJzQ2J0=,3nybhbi3iqa8ino29wqQcBydtNk=\n",
                )
            },
        ),
        case(
            "uriescape",
            r#"ngx.say(ngx.escape_uri("a b/c?"), ",", ngx.unescape_uri("a%20b+c%2F"), ",",
              ngx.encode_args({b = {1, 2}, a = "x y", c = true, d = false}))"#,
            "/uriescape",
            |r| body_is(r, 200, "a%20b%2Fc%3F,a b c/,a=x%20y&b=1&b=2&c\n"),
        ),
        case(
            "worker",
            r#"ngx.say(type(ngx.worker.id()), ",", ngx.worker.count(), ",", ngx.worker.pid() > 0)"#,
            "/worker",
            |r| body_is(r, 200, "number,2,true\n"),
        ),
        case(
            "cjson",
            r#"local cjson = require "cjson"
            local t = cjson.decode('{"a":[1,2,{"b":null}],"s":"x"}')
            local safe = require "cjson.safe"
            local bad, err = safe.decode("{bad")
            ngx.say(t.a[2], ",", t.a[3].b == cjson.null, ",", cjson.encode({k = "v/w"}), ",",
              cjson.encode({1, 2, "x"}), ",", cjson.encode({}), ",", tostring(bad), ",", err ~= nil,
              ",", select('#', cjson.encode(1)), ",", (pcall(cjson.decode, "{bad")))"#,
            "/cjson",
            |r| {
                body_is(
                    r,
                    200,
                    "2,true,{\"k\":\"v\\/w\"},[1,2,\"x\"],{},nil,true,1,false\n",
                )
            },
        ),
        case(
            "require",
            r#"local m = require("polygate_test_mod")
            ngx.say(m.hi("there"), ",", m.loads)"#,
            "/require",
            |r| body_is(r, 200, "hi there,1\n"),
        ),
    ];
    let dir = tempdir::Dir::new();
    std::fs::write(
        dir.path().join("polygate_test_mod.lua"),
        "local _M = {loads = 0}\n_M.loads = _M.loads + 1\nfunction _M.hi(n) return 'hi ' .. n end\nreturn _M\n",
    )
    .unwrap();
    let gw = start(
        &cases,
        &u.node(),
        json!({"lua": {"package_path": format!("{}/?.lua;;", dir.path().display())}}),
    );
    run_cases(&gw, &cases).await;
    let err = gw.stderr();
    assert!(err.contains("lua-log-marker 42 nil true"), "{}", tail(&err));
    assert!(err.contains("ERROR") && err.contains("warn-marker"));
    assert!(err.contains("print-marker"));
    assert!(
        err.contains("log-status 200"),
        "ngx.status in the log phase"
    );
    assert!(err.contains("lua[access]:1:"), "log lines name the source");
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_dicts_and_timers() {
    let u = Upstream::start("u").await;
    let cases = vec![
        case(
            "dictops",
            r#"local d = ngx.shared.cache
            d:flush_all()
            local out = {}
            local function add(...) for i = 1, select('#', ...) do out[#out + 1] = tostring((select(i, ...))) end end
            add(d:set("k", "v", 0, 7))
            add(d:get("k"))
            add(d:add("k", "other"))
            add(d:replace("nope", 1))
            add(d:incr("n", 5, 10))
            add(d:incr("n", 1))
            add(d:incr("k", 1))
            add(d:set("t", true, 100))
            add(d:ttl("t") > 99, d:ttl("k"))
            add(d:expire("t", 0.05))
            d:delete("k")
            add(d:get("k"))
            add(ngx.shared.nope == nil)
            ngx.say(table.concat(out, ","))"#,
            "/dictops",
            |r| {
                body_is(
                    r,
                    200,
                    "true,nil,false,v,7,false,exists,false,false,not found,false,15,nil,false,16,nil,false,nil,not a number,true,nil,false,true,0,true,nil,true\n",
                )
            },
        ),
        case(
            "dictexpire",
            r#"ngx.sleep(0.1)
            local d = ngx.shared.cache
            local v, err = d:ttl("t")
            ngx.say(tostring(d:get("t")), ",", tostring(v), ",", err)"#,
            "/dictexpire",
            |r| body_is(r, 200, "nil,nil,not found\n"),
        ),
        case(
            "timerstart",
            r#"local d = ngx.shared.cache
            local ok = ngx.timer.at(0.05, function(premature, key)
              ngx.sleep(0.01)
              d:set(key, "fired:" .. tostring(premature))
            end, "timer-key")
            local ok2 = ngx.timer.every(0.05, function() d:incr("ticks", 1, 0) end)
            ngx.say(ok, ",", ok2, ",", ngx.timer.pending_count() >= 1)"#,
            "/timerstart",
            |r| body_is(r, 200, "true,true,true\n"),
        ),
        case(
            "timercheck",
            r#"local d = ngx.shared.cache
            ngx.say(d:get("timer-key"), ",", d:get("ticks") >= 3)"#,
            "/timercheck",
            |r| body_is(r, 200, "fired:false,true\n"),
        ),
    ];
    let gw = start(
        &cases,
        &u.node(),
        json!({"lua": {"shared_dict": {"cache": "1m"}}}),
    );
    // the dictionary is process-wide: many requests over fresh connections land on both
    // workers and all see one counter
    run_cases(&gw, &cases[..2]).await;
    run_cases(&gw, &cases[2..3]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    run_cases(&gw, &cases[3..]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_dict_is_process_wide_and_evicts() {
    let u = Upstream::start("u").await;
    let cases = vec![
        case(
            "count",
            r#"ngx.say(ngx.shared.small:incr("hits", 1, 0), " ", ngx.worker.id())"#,
            "/count",
            |r| assert_eq!(r.status, 200),
        ),
        case(
            "fill",
            r#"local d = ngx.shared.small
            local forced_any = false
            for i = 1, 400 do
              local ok, err, forced = d:set("k" .. i, string.rep("x", 100))
              forced_any = forced_any or forced
            end
            local ok, err = d:safe_set("big", string.rep("y", 20000))
            ngx.say(forced_any, ",", tostring(d:get("k1")), ",", d:get("k400") ~= nil, ",", ok, ",", err)"#,
            "/fill",
            |r| body_is(r, 200, "true,nil,true,false,no memory\n"),
        ),
    ];
    let gw = start(
        &cases,
        &u.node(),
        json!({"lua": {"shared_dict": {"small": "16k"}}}),
    );
    let mut workers = std::collections::HashSet::new();
    let mut last = 0;
    for _ in 0..40 {
        let r = get_h(gw.port, "/count", &[("host", "x")]).await;
        let mut parts = r.body.split_whitespace();
        let n: i64 = parts.next().unwrap().parse().unwrap();
        workers.insert(parts.next().unwrap().to_owned());
        assert_eq!(n, last + 1, "one counter for the whole process");
        last = n;
    }
    assert_eq!(workers.len(), 2, "both workers served requests");
    run_cases(&gw, &cases[1..]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn load_ffi_with_go_and_rust_runtimes() {
    let go = libs::go("echo");
    let rust = libs::rust_echo();
    let libdir = go.parent().unwrap().display().to_string();
    let rustdir = rust.parent().unwrap().display().to_string();
    let u = Upstream::start("u").await;
    let dir = tempdir::Dir::new();
    let cancel_log = dir.path().join("cancelled.txt");
    let cases = vec![
        case(
            "goecho",
            r#"local demo = ngx.load_ffi("ffi_go_echo")
            local ok, res = demo:echo("hello")
            ngx.say(ok, " ", res)"#,
            "/goecho",
            |r| body_is(r, 200, "true hello\n"),
        ),
        case(
            "rustecho",
            r#"require("resty_ffi")
            local demo = ngx.load_ffi("ffi_rust_echo")
            local ok, res, err = demo:echo("hello rust")
            local ok2, res2 = demo("called directly")
            ngx.say(ok, " ", res, " ", tostring(err), " ", ok2, " ", res2, " ", demo == ngx.load_ffi("ffi_rust_echo"))"#,
            "/rustecho",
            |r| body_is(r, 200, "true hello rust nil true called directly true\n"),
        ),
        case(
            "rc",
            r#"local rt = ngx.load_ffi("ffi_go_echo", "fail")
            local ok, rc, res = rt:anything("x")
            ngx.say(ok, " ", rc, " ", res)"#,
            "/rc",
            |r| body_is(r, 200, "false 3 something broke\n"),
        ),
        case(
            "unload",
            r#"local rt = ngx.load_ffi("ffi_rust_echo", "unload-me")
            local ok1 = rt:echo("a")
            rt:__unload()
            local ok2, err = rt:echo("b")
            local again = ngx.load_ffi("ffi_rust_echo", "unload-me")
            local ok3, res3 = again:echo("c")
            ngx.say(ok1, " ", ok2, " ", err, " ", ok3, " ", res3)"#,
            "/unload",
            |r| body_is(r, 200, "true false task queue is finished true c\n"),
        ),
        // the Go SDK's poller after an answer waits on the queue's descriptor holding its P
        // (50 ms), then parks in Go's netpoller: an answer after each, and an unload while it
        // waits, which ends its poll loop and lets a fresh runtime of the same key start
        case(
            "gohot",
            r#"local rt = ngx.load_ffi("ffi_go_echo", "hot-then-idle")
            local _, r1 = rt:echo("a")
            ngx.sleep(0.15)
            local _, r2 = rt:echo("b")
            local _, r3 = rt:echo("c")
            rt:__unload()
            local ok4, err4 = rt:echo("d")
            local again = ngx.load_ffi("ffi_go_echo", "hot-then-idle")
            local _, r5 = again:echo("e")
            ngx.say(r1, r2, r3, " ", ok4, " ", err4, " ", r5)"#,
            "/gohot",
            |r| body_is(r, 200, "abc false task queue is finished e\n"),
        ),
        case(
            "missing",
            r#"local rt, err = ngx.load_ffi("ffi_no_such_runtime")
            ngx.say(tostring(rt), " ", err:find("cannot load ffi_no_such_runtime", 1, true) ~= nil)"#,
            "/missing",
            |r| body_is(r, 200, "nil true\n"),
        ),
        case(
            "hang",
            r#"local rt = ngx.load_ffi("ffi_go_echo", "hang", {timeout = 0.2})
            local ok, err = rt:call("x")
            ngx.say(ok, " ", err)"#,
            "/hang",
            |r| body_is(r, 200, "false timeout\n"),
        ),
        case(
            "deadline",
            r#"local rt = ngx.load_ffi("ffi_go_echo", "deadline", {timeout = 2})
            local ok, res = rt:call("x")
            local ms = tonumber(res:match("remaining (%d+)"))
            ngx.say(ok, " ", ms ~= nil and ms > 1000 and ms <= 2000)"#,
            "/deadline",
            |r| body_is(r, 200, "true true\n"),
        ),
        Case {
            plugins: access(&format!(
                r#"local rt = ngx.load_ffi("ffi_go_echo", "cancel:{}", {{timeout = 0.2}})
                local ok, err = rt:call("gone")
                ngx.say(ok, " ", err)"#,
                cancel_log.display()
            )),
            // the handler's context ends at the caller's deadline: its answer (rc 1) and the
            // host's timeout race
            ..case("cancel", "", "/cancel", |r| {
                assert!(
                    r.body == "false timeout\n" || r.body == "false 1\n",
                    "{}",
                    r.body
                )
            })
        },
        case(
            "concurrent",
            r#"local demo = ngx.load_ffi("ffi_go_echo")
            local id = ngx.var.arg_id
            ngx.sleep(0.001 * (tonumber(id) % 5))
            local ok, res = demo:echo("id=" .. id)
            ngx.say(res)"#,
            "/concurrent?id=7",
            |r| body_is(r, 200, "id=7\n"),
        ),
        Case {
            plugins: json!({"lua": {
                "header_filter": r#"local ok, err = pcall(ngx.sleep, 0.01)
                    local rt = ngx.load_ffi("ffi_go_echo")
                    local ok2, err2 = pcall(rt.echo, rt, "x")
                    ngx.header["X-Sleep"] = tostring(ok) .. ":" .. tostring(err):match("API disabled in the context of header_filter") 
                    ngx.header["X-Ffi"] = tostring(ok2) .. ":" .. (tostring(err2):find("cannot yield", 1, true) and "cannot yield" or tostring(err2))"#
            }}),
            ..case("noyield", "", "/noyield", |r| {
                assert_eq!(r.status, 200);
                assert_eq!(
                    r.header("x-sleep"),
                    Some("false:API disabled in the context of header_filter")
                );
                assert_eq!(r.header("x-ffi"), Some("false:cannot yield"));
            })
        },
    ];
    let gw = start(
        &cases,
        &u.node(),
        json!({"ffi_lib_path": [libdir, rustdir]}),
    );
    run_cases(&gw, &cases).await;
    // the Go handler saw its caller give up through its context (Go SDK's Task.Context)
    let seen = gw
        .eventually(Duration::from_secs(3), || async {
            std::fs::read_to_string(&cancel_log)
                .unwrap_or_default()
                .starts_with("cancelled gone")
        })
        .await;
    assert!(seen, "{:?}", std::fs::read_to_string(&cancel_log));

    // many requests, each waiting on its own FFI call: no answer reaches the wrong coroutine
    let port = gw.port;
    let mut tasks = Vec::new();
    for i in 0..300 {
        tasks.push(tokio::spawn(async move {
            let r = get_h(port, &format!("/concurrent?id={i}"), &[("host", "x")]).await;
            (i, r)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!((r.status, r.body.clone()), (200, format!("id={i}\n")));
    }
}

/// A Lua loop of FFI calls answered at once stays within the time limit: with every thread of
/// the gateway on one CPU the runtime's poller and the worker hand the CPU to each other, so a
/// call finds its answer without yielding; once half of the step's budget is spent a call
/// yields anyway (and starts a new budget) instead of failing the handler.
#[tokio::test(flavor = "multi_thread")]
async fn ffi_call_loop_on_one_cpu_stays_within_the_time_limit() {
    let rust = libs::rust_echo();
    let rustdir = rust.parent().unwrap().display().to_string();
    // the Go SDK's poller waits on the queue's descriptor: it hands off through ABI 1.2
    let go = libs::go("echo");
    let godir = go.parent().unwrap().display().to_string();
    let u = Upstream::start("u").await;
    let looping = |lib: &str| {
        format!(
            r#"local demo = ngx.load_ffi("{lib}", "loop")
        local n = 0
        for i = 1, 20000 do
            local ok, res = demo:echo("m" .. i)
            if ok and res == "m" .. i then n = n + 1 end
        end
        ngx.say(n)"#
        )
    };
    let cases = vec![
        Case {
            plugins: access(&looping("ffi_rust_echo")),
            ..case("loop", "", "/loop", |r| body_is(r, 200, "20000\n"))
        },
        Case {
            plugins: access(&looping("ffi_go_echo")),
            ..case("goloop", "", "/goloop", |r| body_is(r, 200, "20000\n"))
        },
    ];
    let gw = start(
        &cases,
        &u.node(),
        json!({"ffi_lib_path": [rustdir, godir], "lua": {"time_limit": 0.005}}),
    );
    // every thread on CPU 0; the runtime's threads, started at the first call, inherit it
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-cp", "0", &gw.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(pinned.success());
    run_cases(&gw, &cases).await;
    assert!(
        !gw.stderr().contains("time limit exceeded"),
        "{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_and_limits_fail_one_request_only() {
    let u = Upstream::start("u").await;
    let cases = vec![
        case("boom", r#"local x = nil; return x.field"#, "/boom", |r| {
            assert_eq!(r.status, 500)
        }),
        case("ok", r#"ngx.say("fine")"#, "/ok", |r| {
            body_is(r, 200, "fine\n")
        }),
        case(
            "spin",
            r#"local i = 0 while true do i = i + 1 end"#,
            "/spin",
            |r| assert_eq!(r.status, 500),
        ),
        case(
            "spinpcall",
            r#"while true do pcall(function() while true do end end) end"#,
            "/spinpcall",
            |r| assert_eq!(r.status, 500),
        ),
        case(
            "hog",
            r#"local t = {} local i = 0 while true do i = i + 1; t[i] = string.rep("x", 4096) .. i end"#,
            "/hog",
            |r| assert_eq!(r.status, 500),
        ),
        Case {
            plugins: json!({"lua": {"header_filter": "error('filter broke')"}}),
            ..case("hferr", "", "/hferr", |r| assert_eq!(r.status, 500))
        },
        Case {
            plugins: json!({"lua": {"log": "ngx.say('x')"}}),
            ..case("logerr", "", "/logerr", |r| assert_eq!(r.status, 200))
        },
    ];
    let gw = start(
        &cases,
        &u.node(),
        json!({"lua": {"memory_limit": "16m", "instruction_limit": 20000000, "time_limit": 0}}),
    );
    for _ in 0..2 {
        run_cases(&gw, &cases).await;
    }
    let err = gw.stderr();
    assert!(
        err.contains("attempt to index local 'x' (a nil value)") && err.contains("stack traceback"),
        "{}",
        tail(&err)
    );
    assert!(err.contains("instruction limit exceeded"), "{}", tail(&err));
    assert!(err.contains("not enough memory"), "{}", tail(&err));
    assert!(err.contains("filter broke"));
    assert!(err.contains("API disabled in the context of log_by_lua*"));
}

#[tokio::test(flavor = "multi_thread")]
async fn serverless_functions_and_lua_files() {
    let u = Upstream::start("u").await;
    let dir = tempdir::Dir::new();
    let access_file = dir.path().join("access.lua");
    std::fs::write(
        &access_file,
        "-- an access_by_lua_file body\nif ngx.var.arg_key ~= 'secret' then\n  ngx.status = 401\n  ngx.say('no key')\n  return ngx.exit(401)\nend\nngx.req.set_header('x-authed', 'yes')\n",
    )
    .unwrap();
    let cases = vec![
        Case {
            plugins: json!({"serverless-pre-function": {"phase": "rewrite", "functions": [
                "return function(conf, ctx) if ctx.var.arg_deny then return 403, {message = 'denied in ' .. conf.phase} end end"
            ]}}),
            ..case("pre", "", "/pre?deny=1", |r| {
                body_is(r, 403, "{\"message\":\"denied in rewrite\"}");
                assert_eq!(r.header("content-type"), Some("application/json"));
            })
        },
        Case {
            plugins: json!({"serverless-pre-function": {"functions": [
                "return function(conf, ctx) ngx.ctx.n = 1 end",
                "local add = 1\nreturn function(conf, ctx) ngx.req.set_header('x-n', ngx.ctx.n + add) end"
            ]}}),
            ..case("chain", "", "/chain", |r| {
                assert_eq!(r.seen_header("x-n").as_deref(), Some("2"))
            })
        },
        Case {
            plugins: json!({"serverless-post-function": {"phase": "header_filter", "functions": [
                "return function(conf, ctx) ngx.header['X-Post'] = ctx.var.uri .. ':' .. ngx.status end"
            ]}}),
            ..case("post", "", "/post", |r| {
                assert_eq!(r.header("x-post"), Some("/post:200"))
            })
        },
        Case {
            plugins: json!({"lua": {"body_filter": "ngx.arg[1] = string.upper(ngx.arg[1])"}}),
            ..case("upper", "", "/upper", |r| {
                assert!(r.body.contains("\"NAME\":\"U\""), "{}", r.body)
            })
        },
        Case {
            plugins: json!({"lua": {"access_file": access_file.display().to_string()}}),
            ..case("file", "", "/file?key=wrong", |r| {
                body_is(r, 401, "no key\n")
            })
        },
        Case {
            plugins: json!({"lua": {"body_filter": "if ngx.arg[1] ~= '' then ngx.arg[1] = 'short'; ngx.arg[2] = true end"}}),
            ..case("truncate", "", "/truncate", |r| body_is(r, 200, "short"))
        },
        Case {
            plugins: json!({"lua": {"header_filter": "if ngx.status == 200 then ngx.exit(503) end"}}),
            ..case("hfexit", "", "/hfexit", |r| {
                assert_eq!(r.status, 503);
                assert!(r.body.contains("503 Service Unavailable"), "{}", r.body);
            })
        },
        Case {
            plugins: json!({"lua": {"access_file": access_file.display().to_string()}}),
            ..case("file2", "", "/file2?key=secret", |r| {
                assert_eq!(r.seen_header("x-authed").as_deref(), Some("yes"))
            })
        },
    ];
    let gw = start(&cases, &u.node(), json!({}));
    run_cases(&gw, &cases).await;
}

/// `polygate validate` on a one-route file with `plugins` (YAML flow text) and an optional
/// `gateway` section; the file must be rejected. Returns the output.
fn rejected(gateway: &str, plugins: &str) -> String {
    let text = format!(
        "{gateway}\nroutes:\n  - id: r\n    uri: /x\n    upstream: {{nodes: {{\"127.0.0.1:1\": 1}}}}\n    plugins: {plugins}\n#END\n"
    );
    let (code, out) = validate(&text, "yaml");
    assert_ne!(code, 0, "{text} was accepted");
    out
}

#[test]
fn lua_configuration_errors_name_the_key() {
    let out = rejected(
        "",
        r#"{serverless-pre-function: {functions: ["return function(conf, ctx) if then end"]}}"#,
    );
    assert!(
        out.contains("routes[0].plugins.serverless-pre-function.functions[0]"),
        "{out}"
    );
    // `validate` compiles without running code; the chunk's result is checked when the
    // gateway loads it (and the route is skipped, with the reason)
    let gw = Gateway::start(
        "routes:\n  - {id: r, uri: /x, upstream: {nodes: {\"127.0.0.1:1\": 1}}, plugins: {serverless-post-function: {functions: [\"return 42\"]}}}\n",
    );
    assert!(
        gw.stderr().contains("only accept Lua function"),
        "{}",
        gw.stderr()
    );
    let out = rejected(
        r#"gateway: {lua: {shared_dict: {cache: "ten"}}}"#,
        r#"{lua: {access: "ngx.say(", access_file: "/nope.lua"}}"#,
    );
    assert!(out.contains("gateway.lua.shared_dict.cache"), "{out}");
    let out = rejected("", r#"{lua: {access: "ngx.say("}}"#);
    assert!(out.contains("routes[0].plugins.lua.access"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_reload_keeps_the_lua_route_serving() {
    let u = Upstream::start("u").await;
    let good = format!(
        r#"
routes:
  - id: r
    uri: /x
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      lua: {{access: "_G.n = (_G.n or 0) + 1; ngx.say('v1 ', _G.n)"}}
  - id: other
    uri: /other
    upstream: {{nodes: {{"{n}": 1}}}}
"#,
        n = u.node()
    );
    let bad = good.replace("ngx.say('v1 ', _G.n)", "ngx.say('v2'");
    // --strict: the whole change is rejected; the Lua state is untouched (its globals live on)
    // one worker: every request meets the same Lua state
    let port = free_port();
    let head = format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\"}}]\n  worker_threads: 1\n  watch_interval: 0.2\n"
    );
    let mut strict = Gateway::start_args(port, &format!("{head}{good}\n#END\n"), &["--strict"]);
    assert_eq!(get(port, "/x").await.body, "v1 1\n");
    strict.write_config(&format!("{head}{bad}\n#END\n"));
    assert!(
        strict
            .eventually(Duration::from_secs(5), || async {
                strict.stderr().contains("configuration rejected")
            })
            .await
    );
    assert!(
        strict.stderr().contains("routes[0].plugins.lua"),
        "{}",
        strict.stderr()
    );
    let body = get(port, "/x").await.body;
    assert!(body.starts_with("v1 "), "{body}");
    assert_ne!(
        body, "v1 1\n",
        "the Lua state was not rebuilt by the rejected change"
    );
    strict.kill();

    // default (APISIX standalone): the invalid route is skipped, the others are served
    let gw = Gateway::start(&good);
    assert_eq!(get(gw.port, "/x").await.body, "v1 1\n");
    gw.reload(&bad);
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            gw.stderr()
                .contains("skipped invalid resource: routes[0].plugins.lua")
        })
        .await,
        "{}",
        gw.stderr()
    );
    assert_eq!(get(gw.port, "/x").await.status, 404);
    assert_eq!(get(gw.port, "/other").await.status, 200);
    gw.reload(&good.replace("v1", "v2"));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            get(gw.port, "/x").await.body.starts_with("v2")
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lua_settings_change_gives_fresh_states_and_timer_limit() {
    let u = Upstream::start("u").await;
    let port = free_port();
    let text = |limit: &str| {
        format!(
            r#"gateway:
  listeners: [{{addr: "127.0.0.1:{port}"}}]
  worker_threads: 1
  watch_interval: 0.2
  lua: {{max_pending_timers: 2, memory_limit: {limit}}}
routes:
  - id: r
    uri: /count
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      lua: {{access: "_G.n = (_G.n or 0) + 1; ngx.say(_G.n)"}}
  - id: t
    uri: /timers
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      lua:
        access: |
          local out = {{}}
          for i = 1, 3 do
            local ok, err = ngx.timer.at(100, function() end)
            out[#out + 1] = tostring(ok) .. ":" .. tostring(err)
          end
          ngx.say(table.concat(out, ","))
#END
"#,
            n = u.node()
        )
    };
    let gw = Gateway::start_raw(port, &text("64m"));
    assert_eq!(get(port, "/count").await.body, "1\n");
    assert_eq!(
        get(port, "/count").await.body,
        "2\n",
        "module state lives in the worker's state"
    );
    assert_eq!(
        get(port, "/timers").await.body,
        "true:nil,true:nil,nil:too many pending timers\n"
    );
    // a settings change builds a fresh state in each worker (like an nginx reload)
    gw.write_config(&text("32m"));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            get(port, "/count").await.body == "1\n"
        })
        .await,
        "{}",
        gw.stderr()
    );
    // the old state's timers ran their premature round and stopped, freeing their slots
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            get(port, "/timers").await.body == "true:nil,true:nil,nil:too many pending timers\n"
        })
        .await
    );
}

/// A runaway handler is stopped after `time_limit` (20 ms by default, 10 ms here: this is a
/// debug build on a shared CI machine) of running without yielding, so the other requests of
/// its worker thread wait at most about that long: with one worker, a client hammering
/// `while true do end` leaves another route's p99 under 50 ms (it was 3.8 s p50 with only the
/// instruction limit).
#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_handler_cannot_stall_its_neighbours() {
    let u = Upstream::start("u").await;
    let port = free_port();
    let gw = Gateway::start_raw(
        port,
        &format!(
            r#"gateway:
  listeners: [{{addr: "127.0.0.1:{port}"}}]
  worker_threads: 1
  access_log: {{enabled: false}}
  lua: {{time_limit: 0.01}}
routes:
  - id: spin
    uri: /spin
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      lua: {{access: "while true do end"}}
  - id: ok
    uri: /ok
    upstream: {{nodes: {{"{n}": 1}}}}
#END
"#,
            n = u.node()
        ),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                assert_eq!(get(port, "/spin").await.status, 500);
                n += 1;
            }
            n
        })
    };
    // the runaway handler is being hit
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            gw.stderr().contains("time limit exceeded")
        })
        .await
    );
    let mut lat = Vec::new();
    for _ in 0..100 {
        let t = std::time::Instant::now();
        assert_eq!(get(port, "/ok").await.status, 200);
        lat.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let spins = spinner.await.unwrap();
    lat.sort();
    let p99 = lat[98];
    assert!(
        spins > 5,
        "the runaway route was exercised ({spins} requests)"
    );
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    assert!(
        gw.stderr().contains("time limit exceeded"),
        "{}",
        gw.stderr()
    );
}
