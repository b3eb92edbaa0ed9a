//! polygate's Java loader (`runtimes/java`, the SDK and runtimes built with Maven by the test
//! command) through the real gateway with 2 worker threads: one JVM for the process, created on
//! the main thread with `-Xrs`; the SDK's sync and async handlers, rc ≠ 0, exceptions with their
//! stack trace, failing inits, reload with `?` (a class recompiled on disk), unload draining, two
//! runtimes of one class, 1,000 concurrent calls, the HttpCheck example, and SIGTERM draining.

use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::python_rt::{
    call, exits_0_on_sigterm, reloads_after_an_edit, start_with_loader, thousand_concurrent_calls,
    unload_drains,
};
use crate::support::*;

fn compile(src_dir: &std::path::Path, out: &std::path::Path, classpath: &str) {
    let st = Command::new("javac")
        .arg("-cp")
        .arg(classpath)
        .arg("-d")
        .arg(out)
        .arg(src_dir.join("Reloadme.java"))
        .status()
        .expect("javac");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn java_sdk_handlers_errors_reload_and_concurrency() {
    let libdir = libs::java_dir();
    let cp = libs::java_classpath();
    let tmp = tempdir::Dir::new();
    let src = tmp.path().join("src");
    let classes = tmp.path().join("classes");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&classes).unwrap();
    let write_version = |v: u32| {
        std::fs::write(
            src.join("Reloadme.java"),
            format!(
                "public class Reloadme {{\n  public static int init(String cfg, long tq) {{\n    return polygate.ffi.Runtime.serve(tq, t -> (\"v{v}:\" + t.requestString()).getBytes());\n  }}\n}}\n"
            ),
        )
        .unwrap();
        compile(&src, &classes, &cp);
    };
    write_version(1);
    let classpath = format!("{cp}:{}", classes.display());
    let cfgs: Vec<(&str, String)> = vec![
        ("echo", "pgtest.Runtimes,echo".into()),
        ("a", "pgtest.Runtimes,tagged,a".into()),
        ("b", "pgtest.Runtimes,tagged,b".into()),
        ("async", "pgtest.Runtimes,async".into()),
        ("slow", "pgtest.Runtimes,slow".into()),
        ("rc", "pgtest.Runtimes,rc".into()),
        ("raise", "pgtest.Runtimes,raise".into()),
        ("fail", "pgtest.Runtimes,fail".into()),
        ("boom", "pgtest.Runtimes,boom".into()),
        ("task", "pgtest.Runtimes,task".into()),
        ("gc", "pgtest.Runtimes,gc".into()),
        ("npe", "pgtest.Runtimes,npe".into()),
        ("example", "example.Echo,init".into()),
        ("reload", "Reloadme?,init".into()),
        ("noclass", "no.such.Klass,init".into()),
    ];
    let mut gw = start_with_loader(&libdir, "ffi_java", &cfgs, &[("CLASSPATH", &classpath)]);
    let p = gw.port;

    assert_eq!(call(p, "echo", "hello").await, "true hello nil\n");
    assert_eq!(call(p, "example", "ex").await, "true ex nil\n");
    assert_eq!(call(p, "a", "x").await, "true a:x nil\n");
    assert_eq!(call(p, "b", "x").await, "true b:x nil\n");
    assert_eq!(call(p, "async", "y").await, "true async:y nil\n");
    assert_eq!(call(p, "rc", "y").await, "false 5 five\n");
    assert_eq!(call(p, "task", "t").await, "true true false t nil\n");
    assert_eq!(call(p, "gc", "g").await, "true 200:g nil\n");
    // the JVM's own SIGSEGV handling (implicit null checks in compiled code) keeps working
    for _ in 0..3 {
        assert_eq!(call(p, "npe", "n").await, "true npe 100000 nil\n");
    }
    let r = call(p, "raise", "q").await;
    assert!(
        r.starts_with("false 1 java.lang.IllegalArgumentException: bad request q")
            && r.contains("at pgtest.Runtimes"),
        "{r}"
    );
    assert_eq!(call(p, "echo", "still").await, "true still nil\n");
    assert_eq!(call(p, "fail", "x").await, "load failed: 3\n");
    assert_eq!(call(p, "boom", "x").await, "load failed: 1\n");
    assert!(
        gw.stderr()
            .contains("java.lang.IllegalStateException: init exploded"),
        "{}",
        gw.stderr()
    );
    assert_eq!(call(p, "noclass", "x").await, "load failed: 1\n");
    assert!(gw.stderr().contains("no/such/Klass"), "{}", gw.stderr());
    // one JVM, started with -Xrs: the JVM left the stop signals to polygate
    assert_eq!(gw.stderr().matches("JVM started").count(), 1);
    assert!(gw.stderr().contains("\"-Xrs\""), "{}", gw.stderr());
    assert!(!gw.stderr().contains("replaced polygate's handler"));

    // `?`: a fresh child-first class loader picks up the recompiled class
    reloads_after_an_edit(p, write_version).await;

    unload_drains(&gw, p).await;
    thousand_concurrent_calls(p).await;

    exits_0_on_sigterm(&mut gw);
}

/// A check service: `?path=/public...` → 200 with `x-user: alice`, anything else → 403.
async fn check_service() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // the head, then as much body as Content-Length says
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let cl = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + cl {
                            let line = text.lines().next().unwrap_or_default().to_owned();
                            let ok = line.contains("path=%2Fpublic");
                            let resp = if ok {
                                "HTTP/1.1 200 OK\r\nx-user: alice\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_owned()
                            } else {
                                "HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\nconnection: close\r\n\r\nforbidden by check\n".to_owned()
                            };
                            let _ = s.write_all(resp.as_bytes()).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn java_example_calls_an_http_service_with_java_net_http() {
    let libdir = libs::java_dir();
    let cp = libs::java_classpath();
    let svc = check_service().await;
    let u = Upstream::start("u").await;
    let gw = Gateway::start_env(
        &format!(
            r#"gateway:
  listeners: [{{addr: "127.0.0.1:0"}}]
  worker_threads: 2
  ffi_lib_path: ["{lib}"]
routes:
  - id: checked
    uri: /*
    upstream: {{nodes: {{"{node}": 1}}}}
    plugins:
      ffi: {{lib: ffi_java, cfg: "example.HttpCheck,init,http://127.0.0.1:{svc}/check"}}
"#,
            lib = libdir.display(),
            node = u.node(),
        ),
        &[("CLASSPATH", &cp)],
    );
    let p = gw.port;
    let r = get(p, "/public/page").await;
    assert_eq!(r.status, 200, "{} {}", r.body, gw.stderr());
    assert_eq!(r.seen_header("x-checked-by").as_deref(), Some("java"));
    assert_eq!(r.seen_header("x-user").as_deref(), Some("alice"));
    let r = get(p, "/private").await;
    assert_eq!((r.status, r.body.as_str()), (403, "forbidden by check\n"));
    assert_eq!(u.hits(), 1, "refused requests never reach the upstream");
}
