//! Test harness: the real `polygate` binary, real upstream HTTP servers and a small client.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real upstream HTTP/1.1 server answering JSON `{"name", "method", "uri", "headers", "body"}`.
/// `/delay/<ms>/...` waits first; `/status/<code>` answers with that status.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (n, h) = (name.to_owned(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, h) = (n.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (n, h) = (n.clone(), h.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, hyper::Error>(upstream_reply(&n, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn node(&self) -> String {
        self.addr.to_string()
    }
}

async fn upstream_reply(name: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if let Some(rest) = path.strip_prefix("/delay/") {
        let ms: u64 = rest
            .split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
            )
        })
        .collect();
    let out = serde_json::json!({
        "name": name,
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", name)
        .body(Full::new(Bytes::from(out.to_string())))
        .unwrap()
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// Name of the upstream that answered.
    pub fn upstream(&self) -> String {
        self.headers.get("x-upstream").cloned().unwrap_or_default()
    }
    /// A request header as the upstream received it.
    pub fn seen_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Conn {
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn { tx }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Resp, hyper::Error> {
        let mut b = Request::builder().method(method).uri(path);
        let mut has_host = false;
        for (k, v) in headers {
            has_host |= k.eq_ignore_ascii_case("host");
            b = b.header(*k, *v);
        }
        if !has_host {
            b = b.header("host", "localhost");
        }
        let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        self.tx.ready().await?;
        let resp = self.tx.send_request(req).await?;
        let status = resp.status().as_u16();
        // repeated fields joined with ", ", as Test::Nginx shows them
        let mut headers: HashMap<String, String> = HashMap::new();
        for (k, v) in resp.headers() {
            let v = v.to_str().unwrap_or("");
            headers
                .entry(k.to_string())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(v);
                })
                .or_insert_with(|| v.to_owned());
        }
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.send("GET", path, &[], "").await.unwrap()
    }
}

/// One request on a new connection.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    Conn::open(port)
        .await
        .send(method, path, headers, body)
        .await
        .unwrap()
}

/// GET on a new connection.
pub async fn get(port: u16, path: &str) -> Resp {
    request(port, "GET", path, &[], "").await
}

/// GET with headers on a new connection.
pub async fn get_h(port: u16, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(port, "GET", path, headers, "").await
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_polygate"))
}

/// A running `polygate run -c <file>`.
pub struct Gateway {
    pub port: u16,
    /// The port written in the configuration's listener (0: chosen by the system).
    spec_port: u16,
    pub dir: tempdir::Dir,
    pub config: PathBuf,
    child: Option<Child>,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static N: AtomicUsize = AtomicUsize::new(0);

    /// A temporary directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!(
                "polygate-e2e-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A route `/slow` (a YAML list item for `routes:`) whose Lua handler logs "slow request
/// started", sleeps 1 s and answers "done": a request in flight for [`stop_drains`].
pub const SLOW_ROUTE: &str = "  - id: slow\n    uri: /slow\n    plugins:\n      lua:\n        access: |\n          ngx.log(ngx.WARN, \"slow request started\")\n          ngx.sleep(1)\n          ngx.say(\"done\")\n          return ngx.exit(200)\n";

/// Sends `sig` while `n` requests to [`SLOW_ROUTE`] are in flight: each is answered, and the
/// gateway exits 0 within 10 s. Returns how long the exit took after the signal.
pub async fn stop_drains(gw: &mut Gateway, sig: &str, n: usize) -> Duration {
    let p = gw.port;
    let before = gw.stderr().matches("slow request started").count();
    let inflight: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(p, "/slow").await }))
        .collect();
    let started = gw
        .eventually(Duration::from_secs(5), || async {
            gw.stderr().matches("slow request started").count() >= before + n
        })
        .await;
    assert!(started, "{}", gw.stderr());
    let t0 = Instant::now();
    gw.signal(sig);
    for t in inflight {
        let r = t.await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "done\n"),
            "{}",
            gw.stderr()
        );
    }
    let code = gw.wait_exit(Duration::from_secs(10));
    let err = gw.stderr();
    let tail: Vec<&str> = err.lines().rev().take(30).collect();
    // a runtime's own crash report goes to standard output (the JVM's hs_err summary, Go's
    // traceback goes to stderr): both are shown
    let out = gw.stdout();
    let out_tail: Vec<&str> = out.lines().rev().take(40).collect();
    assert_eq!(
        code,
        Some(0),
        "exit status {code:?} (None: killed by a signal, or still running after 10 s); last lines:\n{}\nstandard output's last lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        out_tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    took
}

/// Adds a `gateway:` section listening on `port` (unless the text has one) and the `#END` marker.
pub fn with_gateway(port: u16, resources: &str) -> String {
    let gw = if resources.contains("gateway:") {
        String::new()
    } else {
        format!(
            "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\"}}]\n  worker_threads: 2\n  log_level: info\n  watch_interval: 0.2\n"
        )
    };
    format!("{gw}{resources}\n#END\n")
}

impl Gateway {
    /// Starts the gateway with these resources (YAML) and waits until it accepts connections.
    /// It listens on a port the system chooses, read back from its log (no port is picked and
    /// released before the gateway binds it).
    pub fn start(resources: &str) -> Gateway {
        let mut gw = Self::spawn(&with_gateway(0, resources), &[]);
        gw.port = gw.wait_listening();
        gw.spec_port = 0;
        gw.wait_ready();
        gw
    }

    /// Waits for the "listening on ADDR" log line; returns its port.
    fn wait_listening(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(port) = self
                .stderr()
                .lines()
                .find_map(|l| port_after(l, "listening on "))
            {
                return port;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "gateway exited ({status}) during start-up:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("gateway did not report its port:\n{}", self.stderr());
    }

    /// Starts with an exact file text whose listeners use port 0; `port` is the first
    /// listener's ([`Gateway::ports`] has them all).
    pub fn start_text(text: &str) -> Gateway {
        let mut gw = Self::spawn(text, &[]);
        gw.port = gw.wait_listening();
        gw.wait_ready();
        gw
    }

    /// The bound port of every listener, in configuration order.
    pub fn ports(&self) -> Vec<u16> {
        self.stderr()
            .lines()
            .filter_map(|l| port_after(l, "listening on "))
            .collect()
    }

    /// Starts with an exact file text.
    pub fn start_raw(port: u16, text: &str) -> Gateway {
        Self::start_args(port, text, &[])
    }

    /// Starts with an exact file text and more `polygate run` arguments.
    pub fn start_args(port: u16, text: &str, args: &[&str]) -> Gateway {
        let mut gw = Self::spawn(text, args);
        gw.port = port;
        gw.spec_port = port;
        gw.wait_ready();
        gw
    }

    /// [`Gateway::start`] with extra environment variables for the gateway process.
    pub fn start_env(resources: &str, env: &[(&str, &str)]) -> Gateway {
        let mut gw = Self::spawn_env(&with_gateway(0, resources), &[], env);
        gw.port = gw.wait_listening();
        gw.spec_port = 0;
        gw.wait_ready();
        gw
    }

    fn spawn(text: &str, args: &[&str]) -> Gateway {
        Self::spawn_env(text, args, &[])
    }

    fn spawn_env(text: &str, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let dir = tempdir::Dir::new();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, text).unwrap();
        let child = Command::new(binary())
            .args(["run", "-c"])
            .arg(&config)
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Gateway {
            port: 0,
            spec_port: 0,
            dir,
            config,
            child: Some(child),
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "gateway exited ({status}) during start-up:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway did not start:\n{}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// Rewrites the config file (atomically, via rename) with these resources.
    pub fn reload(&self, resources: &str) {
        self.write_config(&with_gateway(self.spec_port, resources));
    }

    pub fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join("config.yaml.tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Stops the gateway now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal (by name, e.g. "TERM") to the gateway.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait().unwrap() {
                if s.code().is_none() {
                    use std::os::unix::process::ExitStatusExt;
                    eprintln!("the gateway was killed by signal {:?}", s.signal());
                }
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Polls `f` until it returns true or `timeout` passes.
    pub async fn eventually<F, Fut>(&self, timeout: Duration, mut f: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `polygate validate -c <file>` on this exact text; returns (exit code, stdout+stderr).
pub fn validate(text: &str, ext: &str) -> (i32, String) {
    let dir = tempdir::Dir::new();
    let path = dir.path().join(format!("config.{ext}"));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(binary())
        .args(["validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runtime libraries built from source for the tests, once per test process.
pub mod libs {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Mutex;

    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn out_dir() -> PathBuf {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runtimes");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn once(key: &str, build: impl FnOnce() -> PathBuf) -> PathBuf {
        let mut built = BUILT.lock().unwrap();
        if let Some((_, p)) = built.iter().find(|(k, _)| k == key) {
            return p.clone();
        }
        let p = build();
        built.push((key.to_owned(), p.clone()));
        p
    }

    fn run(cmd: &mut Command, what: &str) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A WAT fixture of `tests/wasm/wat` (polygate loads `.wat` files as they are).
    pub fn wat(name: &str) -> PathBuf {
        let p = repo().join("tests/wasm/wat").join(format!("{name}.wat"));
        assert!(p.exists(), "{} is missing", p.display());
        p
    }

    /// A filter built from source by `scripts/wasm-filters.sh` (AssemblyScript, from npm):
    /// `as_filter` or `as_sdk_add_header`.
    pub fn wasm(name: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("wasm-filters");
        once("wasm-filters", || {
            run(
                Command::new("bash")
                    .arg(repo().join("scripts/wasm-filters.sh"))
                    .arg(&dir),
                "scripts/wasm-filters.sh",
            );
            dir.clone()
        });
        dir.join(format!("{name}.wasm"))
    }

    /// `examples/go/<pkg>` built with `go build -buildmode=c-shared` as `libffi_go_<pkg>.so`.
    pub fn go(pkg: &str) -> PathBuf {
        once(&format!("go:{pkg}"), || {
            let out = out_dir().join(format!("libffi_go_{pkg}.so"));
            run(
                Command::new("go")
                    .args(["build", "-buildmode=c-shared", "-o"])
                    .arg(&out)
                    .arg(format!("./{pkg}"))
                    .current_dir(repo().join("examples/go")),
                &format!("go build {pkg}"),
            );
            out
        })
    }

    /// A C runtime from `crates/polygate-ffi/tests/c`.
    pub fn c(name: &str) -> PathBuf {
        once(&format!("c:{name}"), || {
            let src = repo().join(format!("crates/polygate-ffi/tests/c/{name}.c"));
            let out = out_dir().join(format!("lib{name}.so"));
            run(
                Command::new("cc")
                    .args(["-shared", "-fPIC", "-O1", "-pthread", "-o"])
                    .arg(&out)
                    .arg(&src)
                    .arg("-I")
                    .arg(repo().join("include")),
                &format!("cc {name}"),
            );
            out
        })
    }

    /// polygate's Python loader (`cargo build -p polygate-python`, done by scripts/test.sh), in a
    /// directory of its own with `libresty_ffi_python.so` linked to it (lua-resty-ffi's other
    /// name for its Python loader). Returns that directory.
    pub fn python_dir() -> PathBuf {
        once("python", || {
            let exe = std::env::current_exe().unwrap();
            let target = exe.parent().and_then(Path::parent).unwrap();
            let lib = target.join("libffi_python3.so");
            assert!(
                lib.exists(),
                "{} is missing: run `cargo build -p polygate-python` first (scripts/test.sh does)",
                lib.display()
            );
            let dir = out_dir().join("python");
            std::fs::create_dir_all(&dir).unwrap();
            for name in ["libffi_python3.so", "libresty_ffi_python.so"] {
                let link = dir.join(name);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&lib, &link).unwrap();
            }
            dir
        })
    }

    /// The class path of the Java SDK, the Java examples and the Java test runtimes (built with
    /// Maven by scripts/test.sh).
    pub fn java_classpath() -> String {
        let jars = [
            "runtimes/java/sdk/target/polygate-ffi-0.1.0.jar",
            "examples/java/target/polygate-java-examples-0.1.0.jar",
            "tests/e2e/java/target/polygate-java-e2e-0.1.0.jar",
        ];
        jars.iter()
            .map(|j| {
                let p = repo().join(j);
                assert!(
                    p.exists(),
                    "{} is missing: build the Java SDK and runtimes with Maven first (scripts/test.sh does)",
                    p.display()
                );
                p.canonicalize().unwrap().display().to_string()
            })
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The directory of polygate's Java loader (`cargo build -p polygate-java`, done by
    /// scripts/test.sh).
    pub fn java_dir() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let target = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        assert!(
            target.join("libffi_java.so").exists(),
            "libffi_java.so is missing: run `cargo build -p polygate-java` first (scripts/test.sh does)"
        );
        target
    }

    /// The directory of polygate's Node.js loader (`runtimes/node/build.sh`, run by
    /// scripts/test.sh into `<target>/node`).
    pub fn node_dir() -> PathBuf {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../node");
        assert!(
            d.join("libffi_nodejs.so").exists(),
            "{}/libffi_nodejs.so is missing: scripts/test.sh builds it (scripts/libnode.sh, runtimes/node/build.sh)",
            d.display()
        );
        d.canonicalize().unwrap()
    }

    /// A directory of test runtimes under `tests/e2e`.
    pub fn test_dir(name: &str) -> PathBuf {
        repo().join("tests/e2e").join(name).canonicalize().unwrap()
    }

    /// The Rust example runtime (`cargo build -p ffi-rust-echo`, done by scripts/test.sh).
    pub fn rust_echo() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap();
        let p = dir.join("libffi_rust_echo.so");
        assert!(
            p.exists(),
            "{} is missing: run `cargo build -p ffi-rust-echo` first (scripts/test.sh does)",
            p.display()
        );
        p
    }
}

impl Gateway {
    /// The Admin API's port, from the "admin API on" log line.
    pub fn admin_port(&self) -> u16 {
        self.logged_port("admin API on http://")
    }

    /// The metrics listener's port, from the "metrics on" log line.
    pub fn metrics_port(&self) -> u16 {
        self.logged_port("metrics on http://")
    }

    /// The port of the address logged right after `marker`, waiting up to 10 s for the line:
    /// the side listeners are logged after the main listener accepts, so a test that starts
    /// right away can look before the line is written.
    fn logged_port(&self, marker: &str) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(p) = self.stderr().lines().find_map(|l| port_after(l, marker)) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no \"{marker}\" in the log:\n{}", self.stderr());
    }
}

/// The port of the address that follows `marker` in a log line (`listening on 127.0.0.1:80 (…`,
/// `metrics on http://127.0.0.1:9091/metrics`): the address ends at a space or a `/`.
fn port_after(line: &str, marker: &str) -> Option<u16> {
    let rest = line.split(marker).nth(1)?;
    let addr = rest.split(|c: char| c == '/' || c.is_whitespace()).next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// The key the Admin API tests use (the one APISIX's test harness uses).
pub const ADMIN_KEY: &str = "edd1c9f034335f136f87ad84b625c8f1";
/// A viewer key.
pub const VIEWER_KEY: &str = "4054f7cf07e344346cd3f287985e76a2";

/// A request to an Admin API with [`ADMIN_KEY`].
pub async fn admin(port: u16, method: &str, path: &str, body: &str) -> Resp {
    request(
        port,
        method,
        path,
        &[
            ("x-api-key", ADMIN_KEY),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

/// A real etcd (Debian's `etcd-server`) on loopback ports, with its data in a temporary
/// directory; killed on drop.
pub struct Etcd {
    child: Option<std::process::Child>,
    pub port: u16,
    peer: u16,
    dir: tempdir::Dir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            port: free_port(),
            peer: free_port(),
            dir: tempdir::Dir::new(),
        };
        e.run();
        e
    }

    fn run(&mut self) {
        let url = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--name",
                "polygate-test",
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("polygate-test={peer}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd (Debian's etcd-server) is needed: scripts/test.sh installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read as _, Write as _};
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.contains("\"health\":\"true\"") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd did not become healthy: {}",
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops etcd (SIGKILL), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// A client for this etcd (the one polygate uses).
    pub fn client(&self) -> polygate_etcd::Client {
        polygate_etcd::Client::new(&polygate_etcd::Config {
            endpoints: vec![self.url()],
            timeout: Duration::from_secs(5),
            user: None,
            password: None,
        })
        .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` until it returns true; how long that took, or `None` after `timeout`.
pub async fn until(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f().await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// redis-server options for a test server: no persistence, quiet logs.
pub const REDIS_EPHEMERAL: [&str; 6] =
    ["--save", "", "--appendonly", "no", "--loglevel", "warning"];

/// A real Redis (Debian's `redis-server`) on a free loopback port, without persistence.
pub struct Redis {
    child: Option<std::process::Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
        };
        r.run();
        r
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(REDIS_EPHEMERAL)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server) is needed: scripts/test.sh installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer PING on port {}", self.port);
    }

    /// Runs `redis-cli` against this server; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops it (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty).
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
