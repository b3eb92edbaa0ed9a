//! TLS through the real binary: certificates chosen by SNI from `ssls` (exact, wildcard, RSA
//! and ECDSA on one name, the fallback for clients without SNI), HTTP/1.1 and HTTP/2 by ALPN,
//! mTLS with `client.ca`, a certificate swapped by a reload while an HTTP/2 connection stays
//! up, session resumption, configuration errors at their key paths; and TLS to upstreams
//! (verification against a configured CA, self-signed refused unless `tls.verify: false`,
//! client certificates).
//!
//! Sources: APISIX `apisix/ssl/router/radixtree_sni.lua` (SNIs lower-cased without a trailing
//! dot; an exact name before `*.suffix`, which covers exactly one label; `*` for every name;
//! several certificates per entry through `certs`/`keys`; `client.ca`/`depth` for client
//! verification) and `apisix/schema_def.lua` (the `ssl` schema); `apisix.ssl.fallback_sni` and
//! `ssl_trusted_certificate` are APISIX's `config.yaml` names.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::support::*;

/// A test CA and the certificates it issues.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Leaf {
    pub fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert.as_bytes())
            .unwrap()
            .to_vec()
    }
}

fn rsa_key() -> KeyPair {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("openssl");
    let pem = String::from_utf8(out.stdout).unwrap();
    KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap()
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Pki {
            ca: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn issue_with(&self, names: &[&str], key: KeyPair) -> Leaf {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = p.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// An ECDSA P-256 certificate for `names` (and 127.0.0.1).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        self.issue_with(names, KeyPair::generate().unwrap())
    }

    /// An RSA 2048 certificate.
    pub fn issue_rsa(&self, names: &[&str]) -> Leaf {
        self.issue_with(names, rsa_key())
    }
}

/// YAML block scalar of a PEM text, indented for `key: |` at `indent`.
pub fn pem_block(pem: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut s = String::from("|\n");
    for l in pem.trim_end().lines() {
        s.push_str(&pad);
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Takes any server certificate; the tests compare the one presented byte for byte.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn client_config(alpn: &[&[u8]], client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert));
    let mut c = match client {
        Some(l) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(l.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// A TLS connection to the gateway; `sni: None` connects by IP, which sends no SNI.
pub async fn connect_with(
    port: u16,
    sni: Option<&str>,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_owned()).unwrap(),
        None => ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
    };
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

pub async fn connect(port: u16, sni: Option<&str>) -> std::io::Result<TlsStream<TcpStream>> {
    connect_with(port, sni, client_config(&[b"http/1.1"], None)).await
}

fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 GET over an established TLS stream: (status, body).
pub async fn h1_get(s: TlsStream<TcpStream>, host: &str, path: &str) -> (u16, String) {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn gateway_yaml(extra_gateway: &str, resources: &str) -> String {
    format!(
        "gateway:\n  listeners:\n    - {{addr: \"127.0.0.1:0\"}}\n    - {{addr: \"127.0.0.1:0\", tls: true, http2: true}}\n  worker_threads: 2\n  watch_interval: 0.2\n{extra_gateway}{resources}\n#END\n"
    )
}

fn ssl_entry(id: &str, snis: &[&str], leaf: &Leaf, extra: &str) -> String {
    format!(
        "  - id: \"{id}\"\n    snis: [{}]\n    cert: {}    key: {}{extra}",
        snis.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", "),
        pem_block(&leaf.cert, 6),
        pem_block(&leaf.key, 6),
    )
}

fn route_to(up: &Upstream) -> String {
    format!(
        "routes:\n  - id: r1\n    uri: /*\n    upstream:\n      nodes: [{{host: \"127.0.0.1\", port: {}, weight: 1}}]\n",
        up.addr.port()
    )
}

#[tokio::test]
async fn certificates_by_sni_exact_wildcard_and_fallback() {
    let up = Upstream::start("u").await;
    let pki = Pki::new("polygate test CA");
    let a = pki.issue(&["a.test"]);
    let wild = pki.issue(&["*.wild.test"]);
    let dflt = pki.issue(&["default.test"]);
    let ssls = format!(
        "ssls:\n{}{}{}",
        ssl_entry("1", &["a.test"], &a, "\n"),
        ssl_entry("2", &["*.wild.test"], &wild, "\n"),
        ssl_entry("3", &["default.test"], &dflt, "\n"),
    );
    let gw = Gateway::start_text(&gateway_yaml(
        "  ssl:\n    fallback_sni: default.test\n",
        &format!("{}{ssls}", route_to(&up)),
    ));
    let tls_port = gw.ports()[1];

    // each SNI gets its own certificate, and the request goes through
    let s = connect(tls_port, Some("a.test")).await.unwrap();
    assert_eq!(peer_cert(&s), a.der());
    let (st, body) = h1_get(s, "a.test", "/x").await;
    assert_eq!(st, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-proto"], "https", "{body}");
    assert_eq!(j["headers"]["x-forwarded-port"], tls_port.to_string());

    // SNIs are matched without case; a wildcard covers one label (radixtree-sni.t)
    let s = connect(tls_port, Some("A.TEST")).await.unwrap();
    assert_eq!(peer_cert(&s), a.der());
    let s = connect(tls_port, Some("www.wild.test")).await.unwrap();
    assert_eq!(peer_cert(&s), wild.der());
    assert!(
        connect(tls_port, Some("a.b.wild.test")).await.is_err(),
        "*.wild.test must not match two labels"
    );
    assert!(connect(tls_port, Some("other.test")).await.is_err());
    assert!(
        gw.stderr()
            .contains("failed to find any SSL certificate by SNI: other.test")
    );

    // no SNI: the fallback name's certificate
    let s = connect(tls_port, None).await.unwrap();
    assert_eq!(peer_cert(&s), dflt.der());
    let (st, _) = h1_get(s, "x", "/").await;
    assert_eq!(st, 200);
}

/// `openssl s_client`'s report of a handshake offering only the signature algorithms
/// `sigalgs`.
fn s_client(port: u16, sni: &str, sigalgs: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", sni, "-sigalgs", sigalgs])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn rsa_and_ecdsa_on_one_name_and_h2_by_alpn() {
    let up = Upstream::start("u").await;
    let pki = Pki::new("polygate test CA");
    let ec = pki.issue(&["both.test"]);
    let rsa = pki.issue_rsa(&["both.test"]);
    let ssls = format!(
        "ssls:\n  - id: \"1\"\n    snis: [both.test]\n    cert: {}    key: {}    certs:\n      - {}    keys:\n      - {}",
        pem_block(&rsa.cert, 6),
        pem_block(&rsa.key, 6),
        pem_block(&ec.cert, 8),
        pem_block(&ec.key, 8),
    );
    let gw = Gateway::start_text(&gateway_yaml("", &format!("{}{ssls}", route_to(&up))));
    let tls_port = gw.ports()[1];

    // a client that verifies ECDSA gets the first usable certificate (RSA is listed first)
    let s = connect(tls_port, Some("both.test")).await.unwrap();
    assert_eq!(peer_cert(&s), rsa.der());

    // a client that only takes ECDSA (RSA) signatures gets the ECDSA (RSA) certificate
    let text = s_client(tls_port, "both.test", "ECDSA+SHA256");
    assert!(
        text.contains("Server public key is 256 bit"),
        "expected the ECDSA certificate:\n{text}"
    );
    let text = s_client(tls_port, "both.test", "RSA-PSS+SHA256");
    assert!(
        text.contains("Server public key is 2048 bit"),
        "expected the RSA certificate:\n{text}"
    );

    // HTTP/2 by ALPN, several requests on one connection
    let s = connect_with(
        tls_port,
        Some("both.test"),
        client_config(&[b"h2", b"http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::get(format!("https://both.test/h2/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let r = tx.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), http::Version::HTTP_2);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["uri"], format!("/h2/{i}"));
        assert_eq!(j["headers"]["host"], "both.test");
    }
}

#[tokio::test]
async fn mtls_accepted_and_refused() {
    let up = Upstream::start("u").await;
    let pki = Pki::new("polygate test CA");
    let clients = Pki::new("client CA");
    let server = pki.issue(&["mtls.test"]);
    let good = clients.issue(&["client-one"]);
    let stranger = Pki::new("other CA").issue(&["client-two"]);
    let extra = format!(
        "    client:\n      ca: {}      depth: 1\n",
        pem_block(&clients.ca_pem(), 8)
    );
    let ssls = format!(
        "ssls:\n{}",
        ssl_entry("1", &["mtls.test"], &server, &format!("\n{extra}"))
    );
    let routes = format!(
        "routes:\n  - id: r1\n    uri: /*\n    plugins:\n      response-rewrite:\n        headers:\n          set:\n            x-client-verify: $ssl_client_verify\n            x-sni: $ssl_server_name\n    upstream:\n      nodes: [{{host: \"127.0.0.1\", port: {}, weight: 1}}]\n",
        up.addr.port()
    );
    let gw = Gateway::start_text(&gateway_yaml("", &format!("{routes}{ssls}")));
    let tls_port = gw.ports()[1];

    let s = connect_with(tls_port, Some("mtls.test"), client_config(&[], Some(&good)))
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = tx
        .send_request(
            Request::get("/m")
                .header("host", "mtls.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-client-verify"], "SUCCESS");
    assert_eq!(r.headers()["x-sni"], "mtls.test");

    // without a certificate, or with one from another CA: no request gets through
    for client in [None, Some(&stranger)] {
        let refused = match connect_with(tls_port, Some("mtls.test"), client_config(&[], client))
            .await
        {
            Err(_) => true,
            // TLS 1.3: the server's verdict arrives after the client's handshake completes
            Ok(s) => {
                let r =
                    hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s)).await;
                match r {
                    Err(_) => true,
                    Ok((mut tx, conn)) => {
                        tokio::spawn(conn);
                        tx.send_request(
                            Request::get("/m")
                                .header("host", "mtls.test")
                                .body(Empty::new())
                                .unwrap(),
                        )
                        .await
                        .is_err()
                    }
                }
            }
        };
        assert!(refused, "a client without a valid certificate got through");
    }
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn certificate_swapped_by_reload_keeps_h2_connection() {
    let up = Upstream::start("u").await;
    let pki = Pki::new("polygate test CA");
    let old = pki.issue(&["swap.test"]);
    let new = pki.issue(&["swap.test"]);
    let cfg = |leaf: &Leaf| {
        gateway_yaml(
            "",
            &format!(
                "{}ssls:\n{}",
                route_to(&up),
                ssl_entry("1", &["swap.test"], leaf, "\n")
            ),
        )
    };
    let gw = Gateway::start_text(&cfg(&old));
    let tls_port = gw.ports()[1];

    let s = connect_with(tls_port, Some("swap.test"), client_config(&[b"h2"], None))
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), old.der());
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = |tx: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>| {
        tx.send_request(
            Request::get("https://swap.test/live")
                .body(Empty::new())
                .unwrap(),
        )
    };
    assert_eq!(get(&mut tx).await.unwrap().status(), 200);

    // a second client, with a session to resume
    let resuming = client_config(&[b"h2"], None);
    let s = connect_with(tls_port, Some("swap.test"), resuming.clone())
        .await
        .unwrap();
    let _ = h1_or_nothing(s).await;
    let s = connect_with(tls_port, Some("swap.test"), resuming.clone())
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the second handshake resumes the session"
    );

    gw.write_config(&cfg(&new));
    let swapped = gw
        .eventually(Duration::from_secs(10), || async {
            let s = connect(tls_port, Some("swap.test")).await.unwrap();
            peer_cert(&s) == new.der()
        })
        .await;
    assert!(
        swapped,
        "the new certificate was not served:\n{}",
        gw.stderr()
    );
    // the connection opened before the swap goes on
    for _ in 0..3 {
        assert_eq!(get(&mut tx).await.unwrap().status(), 200);
    }
    assert!(!conn.is_finished());
}

/// Reads what the server sends first (TLS 1.3 tickets arrive after the handshake).
async fn h1_or_nothing(s: TlsStream<TcpStream>) -> Option<()> {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    let _ = tx
        .send_request(
            Request::get("/")
                .header("host", "swap.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await;
    Some(())
}

#[test]
fn bad_certificates_name_their_key_path() {
    let pki = Pki::new("polygate test CA");
    let a = pki.issue(&["a.test"]);
    let b = pki.issue(&["b.test"]);
    let base = "gateway:\n  listeners: [{addr: \"127.0.0.1:0\", tls: true}]\n";
    // not PEM
    let text = format!(
        "{base}ssls:\n  - id: \"1\"\n    sni: a.test\n    cert: \"garbage\"\n    key: {}",
        pem_block(&a.key, 6)
    );
    let (code, out) = validate(&format!("{text}\n#END\n"), "yaml");
    assert_ne!(code, 0);
    assert!(out.contains("ssls[0].cert"), "{out}");
    // a key that belongs to another certificate
    let text = format!(
        "{base}ssls:\n  - id: \"1\"\n    sni: a.test\n    cert: {}    key: {}",
        pem_block(&a.cert, 6),
        pem_block(&b.key, 6)
    );
    let (code, out) = validate(&format!("{text}\n#END\n"), "yaml");
    assert_ne!(code, 0);
    assert!(
        out.contains("ssls[0].key") && out.contains("does not match"),
        "{out}"
    );
    // a protocol rustls does not have, alone
    let text = format!(
        "{base}ssls:\n  - id: \"1\"\n    sni: a.test\n    ssl_protocols: [TLSv1.1]\n    cert: {}    key: {}",
        pem_block(&a.cert, 6),
        pem_block(&a.key, 6)
    );
    let (code, out) = validate(&format!("{text}\n#END\n"), "yaml");
    assert_ne!(code, 0);
    assert!(out.contains("ssls[0].ssl_protocols"), "{out}");
}

/// A TLS upstream answering `{"sni", "client_cert"}`; with `client_ca`, it requires a client
/// certificate issued by it.
pub struct TlsUpstream {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    pub async fn start(leaf: &Leaf, client_ca: Option<&str>) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let b = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                b.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .unwrap(),
                )
            }
            None => b.with_no_client_auth(),
        };
        let cfg = b
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let c = s.get_ref().1;
                    let info = serde_json::json!({
                        "sni": c.server_name(),
                        "client_cert": c.peer_certificates().is_some(),
                    })
                    .to_string();
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let info = info.clone();
                        async move { Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(info)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        TlsUpstream { port, task }
    }
}

#[tokio::test]
async fn upstream_tls_verification_and_client_certificates() {
    let pki = Pki::new("upstream CA");
    let dir = tempdir::Dir::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, pki.ca_pem()).unwrap();
    let trusted = TlsUpstream::start(&pki.issue(&["up.test"]), None).await;
    let selfsigned = {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["up.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        TlsUpstream::start(
            &Leaf {
                cert: cert.pem(),
                key: key.serialize_pem(),
            },
            None,
        )
        .await
    };
    let clients = Pki::new("client CA");
    let client = clients.issue(&["polygate"]);
    let mtls = TlsUpstream::start(&pki.issue(&["up.test"]), Some(&clients.ca_pem())).await;

    let route = |id: &str, port: u16, tls: &str| {
        format!(
            "  - id: {id}\n    uri: /{id}\n    upstream:\n      scheme: https\n      pass_host: rewrite\n      upstream_host: up.test\n      nodes: [{{host: \"127.0.0.1\", port: {port}, weight: 1}}]\n{tls}"
        )
    };
    let client_tls = format!(
        "      tls:\n        client_cert: {}        client_key: {}",
        pem_block(&client.cert, 10),
        pem_block(&client.key, 10)
    );
    let routes = [
        route("verified", trusted.port, ""),
        route("selfsigned", selfsigned.port, ""),
        route(
            "noverify",
            selfsigned.port,
            "      tls:\n        verify: false\n",
        ),
        route("mtls", mtls.port, &client_tls),
        route("nocert", mtls.port, ""),
    ]
    .concat();
    let text = format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  ssl:\n    ssl_trusted_certificate: \"{}\"\nroutes:\n{routes}\n#END\n",
        ca_file.display()
    );
    let gw = Gateway::start_text(&text);

    let r = get(gw.port, "/verified").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    let j = r.json();
    assert_eq!(j["sni"], "up.test", "the upstream host goes out as SNI");
    assert_eq!(j["client_cert"], false);
    // a connection from the pool serves the next request
    assert_eq!(get(gw.port, "/verified").await.status, 200);

    let r = get(gw.port, "/selfsigned").await;
    assert_eq!(
        r.status, 502,
        "a self-signed upstream certificate is refused"
    );
    assert!(gw.stderr().contains("TLS handshake"), "{}", gw.stderr());
    let r = get(gw.port, "/noverify").await;
    assert_eq!(r.status, 200, "verify: false takes it");

    let r = get(gw.port, "/mtls").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    assert_eq!(r.json()["client_cert"], true);
    let r = get(gw.port, "/nocert").await;
    assert_eq!(r.status, 502, "the upstream requires a client certificate");
}
