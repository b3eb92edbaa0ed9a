//! TLS with rustls: the certificates of APISIX's `ssls` resources chosen by the client's SNI
//! (exact, `*.suffix` and `*` names; several certificates per SNI, e.g. RSA and ECDSA, picked
//! by what the client can verify), per-certificate protocol versions and client certificate
//! verification (mTLS), session resumption shared across configuration commits, ALPN; and the
//! client side for upstreams (`scheme: https`/`grpcs`, health checks).
//!
//! A [`TlsStore`] belongs to one configuration snapshot: a handshake takes the store of the
//! snapshot current when the client's hello arrives, so a commit that swaps a certificate
//! changes what new handshakes get while established connections go on untouched.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use polygate_model::{ConfigErrors, Ssl, SslSettings, Upstream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// The crypto provider every TLS configuration of the process uses (ring), with AES-128-GCM
/// suites first: servers choose by this order (`ignore_client_order`), so a handshake hashes
/// with SHA-256 (hardware-accelerated) rather than SHA-384, which costs a new connection
/// about a sixth of its CPU on x86 with ring.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        // stable: AES-128 before AES-256 before ChaCha20, in each protocol version
        let rank = |s: &rustls::SupportedCipherSuite| {
            let name = format!("{:?}", s.suite());
            if name.contains("AES_128") {
                0
            } else if name.contains("AES_256") {
                1
            } else {
                2
            }
        };
        p.cipher_suites
            .sort_by_key(|s| (u8::from(s.version() != &rustls::version::TLS13), rank(s)));
        Arc::new(p)
    })
    .clone()
}

/// Session state shared by every server configuration of the process, so that a client can
/// resume a session across configuration commits: a session-id cache and a ticketer whose
/// keys rotate every 6 hours (the previous key still decrypts).
struct Resumption {
    cache: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

fn resumption() -> &'static Resumption {
    static R: OnceLock<Resumption> = OnceLock::new();
    R.get_or_init(|| Resumption {
        cache: rustls::server::ServerSessionMemoryCache::new(20_000),
        ticketer: match rustls::crypto::ring::Ticketer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("TLS session tickets unavailable: {e}");
                None
            }
        },
    })
}

/// The certificate chains and keys of one `ssls` entry.
#[derive(Debug)]
struct Certs(Vec<Arc<CertifiedKey>>);

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        self.0
            .iter()
            .find(|c| c.key.choose_scheme(schemes).is_some())
            .or(self.0.first())
            .cloned()
    }
}

/// One usable `ssls` entry: its server configurations (without and with `h2` in ALPN).
pub struct ServerEntry {
    /// The resource id (logs).
    pub id: Arc<str>,
    h1: Arc<ServerConfig>,
    h2: Arc<ServerConfig>,
    /// With `client.skip_mtls_uri_regex`: the handshake accepts clients without a
    /// certificate, and their requests must match one of these (else 400).
    pub skip_mtls: Option<regex::RegexSet>,
}

impl ServerEntry {
    /// The configuration for a listener with (`http2`) or without `h2` in ALPN.
    pub fn config(&self, http2: bool) -> Arc<ServerConfig> {
        if http2 {
            self.h2.clone()
        } else {
            self.h1.clone()
        }
    }
}

/// Certificates by server name, for one configuration snapshot.
#[derive(Default)]
pub struct TlsStore {
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `example.com`: one label in front, as APISIX matches.
    wildcard: HashMap<String, usize>,
    /// An entry for `*` (every name).
    any: Option<usize>,
    entries: Vec<Arc<ServerEntry>>,
    fallback_sni: Option<String>,
    /// Client certificates (`type: client` entries) by id, for upstream mTLS.
    client_certs: HashMap<String, (Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    /// Where upstream certificates' trust roots come from (`system` or a PEM file).
    trust_source: Option<String>,
    /// The roots, loaded on first use (the system store is read only when an upstream
    /// verifies).
    roots: OnceLock<Result<Arc<RootCertStore>, String>>,
}

/// The lower-case server name without a trailing dot, as APISIX normalises SNIs.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Parses PEM certificates; `path` names the key in errors.
fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(c) if c.is_empty() => Err("no PEM certificate found".into()),
        Ok(c) => Ok(c),
        Err(e) => Err(format!("invalid PEM certificate: {e}")),
    }
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("invalid PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"))
}

/// A certificate chain with its key, checked to belong together.
fn certified(
    cert: &str,
    key: &str,
    path: &str,
    cert_key: &str,
    key_key: &str,
    errs: &mut ConfigErrors,
) -> Option<Arc<CertifiedKey>> {
    let certs = match parse_certs(cert) {
        Ok(c) => c,
        Err(e) => {
            errs.push(format!("{path}.{cert_key}"), e);
            return None;
        }
    };
    let key = match parse_key(key) {
        Ok(k) => k,
        Err(e) => {
            errs.push(format!("{path}.{key_key}"), e);
            return None;
        }
    };
    let signing = match provider().key_provider.load_private_key(key) {
        Ok(k) => k,
        Err(e) => {
            errs.push(
                format!("{path}.{key_key}"),
                format!("unusable private key: {e}"),
            );
            return None;
        }
    };
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) => Some(Arc::new(ck)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Some(Arc::new(ck))
        }
        Err(e) => {
            errs.push(
                format!("{path}.{key_key}"),
                format!("the private key does not match the certificate: {e}"),
            );
            None
        }
    }
}

/// `client.depth` of nginx: how many certificates may stand between the client's certificate
/// and a trusted CA (1: signed by the CA itself).
#[derive(Debug)]
struct DepthLimited {
    inner: Arc<dyn ClientCertVerifier>,
    depth: usize,
}

impl ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if intermediates.len() >= self.depth.max(1) {
            return Err(rustls::Error::General(format!(
                "client certificate chain longer than client.depth {}",
                self.depth
            )));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn versions(
    list: Option<&Vec<String>>,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Vec<&'static rustls::SupportedProtocolVersion>> {
    let Some(list) = list else {
        return Some(vec![&rustls::version::TLS13, &rustls::version::TLS12]);
    };
    let mut out = Vec::new();
    for (i, v) in list.iter().enumerate() {
        match v.as_str() {
            "TLSv1.3" => out.push(&rustls::version::TLS13),
            "TLSv1.2" => out.push(&rustls::version::TLS12),
            // accepted as APISIX accepts them; rustls has no TLS 1.0/1.1 (docs/compatibility.md)
            "TLSv1" | "TLSv1.1" => {}
            other => errs.push(
                format!("{path}.ssl_protocols[{i}]"),
                format!("{other:?} must be one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"),
            ),
        }
    }
    if out.is_empty() {
        errs.push(
            format!("{path}.ssl_protocols"),
            "no protocol polygate serves (TLSv1.2, TLSv1.3) is listed",
        );
        return None;
    }
    Some(out)
}

fn client_verifier(
    client: &serde_json::Value,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<(Arc<dyn ClientCertVerifier>, Option<regex::RegexSet>)> {
    let Some(obj) = client.as_object() else {
        errs.push(format!("{path}.client"), "must be an object");
        return None;
    };
    let Some(ca) = obj.get("ca").and_then(|v| v.as_str()) else {
        errs.push(format!("{path}.client.ca"), "property \"ca\" is required");
        return None;
    };
    let depth = match obj.get("depth") {
        None => 1,
        Some(d) => match d.as_u64() {
            Some(d) => d as usize,
            None => {
                errs.push(format!("{path}.client.depth"), "must be an integer >= 0");
                return None;
            }
        },
    };
    let skip = match obj.get("skip_mtls_uri_regex") {
        None => None,
        Some(serde_json::Value::Array(a)) => {
            let mut pats = Vec::new();
            for (i, p) in a.iter().enumerate() {
                match p.as_str() {
                    Some(s) => pats.push(s.to_owned()),
                    None => errs.push(
                        format!("{path}.client.skip_mtls_uri_regex[{i}]"),
                        "must be a string",
                    ),
                }
            }
            match regex::RegexSet::new(&pats) {
                Ok(s) => Some(s),
                Err(e) => {
                    errs.push(format!("{path}.client.skip_mtls_uri_regex"), e.to_string());
                    return None;
                }
            }
        }
        Some(_) => {
            errs.push(
                format!("{path}.client.skip_mtls_uri_regex"),
                "must be an array of regular expressions",
            );
            return None;
        }
    };
    let cas = match parse_certs(ca) {
        Ok(c) => c,
        Err(e) => {
            errs.push(format!("{path}.client.ca"), e);
            return None;
        }
    };
    let mut roots = RootCertStore::empty();
    for c in cas {
        if let Err(e) = roots.add(c) {
            errs.push(
                format!("{path}.client.ca"),
                format!("unusable CA certificate: {e}"),
            );
            return None;
        }
    }
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if skip.is_some() {
        b = b.allow_unauthenticated();
    }
    match b.build() {
        Ok(v) => Some((Arc::new(DepthLimited { inner: v, depth }), skip)),
        Err(e) => {
            errs.push(format!("{path}.client.ca"), e.to_string());
            None
        }
    }
}

fn server_entry(s: &Ssl, path: &str, errs: &mut ConfigErrors) -> Option<ServerEntry> {
    let before = errs.0.len();
    let mut keys = Vec::new();
    if let (Some(c), Some(k)) = (&s.cert, &s.key)
        && let Some(ck) = certified(c, k, path, "cert", "key", errs)
    {
        keys.push(ck);
    }
    for (i, (c, k)) in s
        .certs
        .iter()
        .flatten()
        .zip(s.keys.iter().flatten())
        .enumerate()
    {
        if let Some(ck) = certified(
            c,
            k,
            path,
            &format!("certs[{i}]"),
            &format!("keys[{i}]"),
            errs,
        ) {
            keys.push(ck);
        }
    }
    let versions = versions(s.ssl_protocols.as_ref(), path, errs);
    let client = s.client.as_ref().map(|c| client_verifier(c, path, errs));
    if errs.0.len() > before || keys.is_empty() {
        return None;
    }
    let versions = versions?;
    let (verifier, skip_mtls) = match client {
        Some(v) => {
            let (v, skip) = v?;
            (Some(v), skip)
        }
        None => (None, None),
    };
    let resolver = Arc::new(Certs(keys));
    let build = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, rustls::Error> {
        let b =
            ServerConfig::builder_with_provider(provider()).with_protocol_versions(&versions)?;
        let mut cfg = match &verifier {
            Some(v) => b.with_client_cert_verifier(v.clone()),
            None => b.with_no_client_auth(),
        }
        .with_cert_resolver(resolver.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let r = resumption();
        cfg.session_storage = r.cache.clone();
        if let Some(t) = &r.ticketer
            && session_tickets()
        {
            cfg.ticketer = t.clone();
        }
        cfg.ignore_client_order = true;
        Ok(Arc::new(cfg))
    };
    match (build(&[b"http/1.1"]), build(&[b"h2", b"http/1.1"])) {
        (Ok(h1), Ok(h2)) => Some(ServerEntry {
            id: Arc::from(s.id.as_ref().map_or("", |i| i.0.as_str())),
            h1,
            h2,
            skip_mtls,
        }),
        (Err(e), _) | (_, Err(e)) => {
            errs.push(path.to_owned(), e.to_string());
            None
        }
    }
}

fn session_tickets() -> bool {
    polygate_core::plugin::preparing()
        .and_then(|g| g.ssl.session_tickets)
        .unwrap_or(true)
}

impl TlsStore {
    /// Builds the store of `ssls`; problems are reported at their key paths.
    pub fn build(ssls: &[Ssl], settings: &SslSettings, errs: &mut ConfigErrors) -> TlsStore {
        let mut store = TlsStore {
            fallback_sni: settings.fallback_sni.as_deref().map(normalise),
            ..TlsStore::default()
        };
        store.trust_source = settings.ssl_trusted_certificate.clone();
        // a configured file is read now, so a bad one is a configuration error; the system
        // store only when an upstream needs it
        if store.trust_source.as_deref().unwrap_or("system") != "system"
            && let Err(e) = store.roots()
        {
            errs.push("gateway.ssl.ssl_trusted_certificate", e);
        }
        for (i, s) in ssls.iter().enumerate() {
            let path = format!("ssls[{i}]");
            if s.ssl_type.as_deref() == Some("client") {
                let (Some(c), Some(k)) = (&s.cert, &s.key) else {
                    continue;
                };
                let before = errs.0.len();
                let certs = parse_certs(c).map_err(|e| errs.push(format!("{path}.cert"), e));
                let key = parse_key(k).map_err(|e| errs.push(format!("{path}.key"), e));
                if let (Ok(certs), Ok(key), Some(id)) = (certs, key, &s.id)
                    && errs.0.len() == before
                {
                    store
                        .client_certs
                        .insert(id.0.clone(), (certs, Arc::new(key)));
                }
                continue;
            }
            let Some(entry) = server_entry(s, &path, errs) else {
                continue;
            };
            if s.status == Some(0) {
                continue;
            }
            let idx = store.entries.len();
            store.entries.push(Arc::new(entry));
            let names = s
                .snis
                .iter()
                .flatten()
                .map(String::as_str)
                .chain(s.sni.as_deref());
            for name in names {
                let name = normalise(name);
                if name == "*" {
                    store.any.get_or_insert(idx);
                } else if let Some(rest) = name.strip_prefix("*.") {
                    store.wildcard.entry(rest.to_owned()).or_insert(idx);
                } else {
                    store.exact.entry(name).or_insert(idx);
                }
            }
        }
        store
    }

    /// True when no server certificate is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for a client's SNI: an exact name, then `*.` plus the name without its first
    /// label, then `*`. Without SNI, `gateway.ssl.fallback_sni` is looked up instead.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&Arc<ServerEntry>> {
        let name = match sni {
            Some(s) => normalise(s),
            None => self.fallback_sni.clone()?,
        };
        let idx = self
            .exact
            .get(&name)
            .or_else(|| {
                name.split_once('.')
                    .and_then(|(_, rest)| self.wildcard.get(rest))
            })
            .copied()
            .or(self.any)?;
        self.entries.get(idx)
    }

    /// The trust roots for upstream certificates (loaded once).
    fn roots(&self) -> Result<Arc<RootCertStore>, String> {
        self.roots
            .get_or_init(|| trust_roots(self.trust_source.as_deref()))
            .clone()
    }

    /// A client configuration for `https` health probes: verified against the trust roots
    /// unless `verify` is false; `None` when verification is asked and no roots exist.
    pub fn probe_config(&self, verify: bool) -> Option<Arc<ClientConfig>> {
        let mut c = self.client_builder(verify).ok()?.with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(Arc::new(c))
    }

    /// A client configuration builder offering TLS 1.3 and 1.2 and verifying the server
    /// against the trust roots, or not at all when `verify` is false. An error comes with the
    /// key below `upstream` it concerns (`tls`, `tls.verify`).
    fn client_builder(
        &self,
        verify: bool,
    ) -> Result<
        rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
        (&'static str, String),
    > {
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ("tls", e.to_string()))?;
        Ok(if verify {
            b.with_root_certificates(self.roots().map_err(|e| ("tls.verify", e))?)
        } else {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        })
    }

    /// A client certificate of a `type: client` entry (`upstream.tls.client_cert_id`).
    fn client_cert(
        &self,
        id: &str,
    ) -> Option<&(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)> {
        self.client_certs.get(id)
    }
}

/// Trust roots for upstream certificates: the system store, or a PEM file. Loaded once per
/// source for the life of the process.
fn trust_roots(source: Option<&str>) -> Result<Arc<RootCertStore>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<RootCertStore>>>> = OnceLock::new();
    let source = source.unwrap_or("system");
    let cache = CACHE.get_or_init(Default::default);
    if let Some(r) = cache.lock().get(source) {
        return Ok(r.clone());
    }
    let mut roots = RootCertStore::empty();
    if source == "system" {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(format!(
                "no CA certificates in the system trust store ({} errors)",
                found.errors.len()
            ));
        }
    } else {
        let pem = std::fs::read_to_string(source).map_err(|e| format!("{source}: {e}"))?;
        for c in parse_certs(&pem).map_err(|e| format!("{source}: {e}"))? {
            roots
                .add(c)
                .map_err(|e| format!("{source}: unusable CA certificate: {e}"))?;
        }
    }
    let roots = Arc::new(roots);
    cache.lock().insert(source.to_owned(), roots.clone());
    Ok(roots)
}

/// Accepts any server certificate (`tls.verify: false`); signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client side of one upstream.
pub struct UpstreamTls {
    /// The rustls configuration (verification, client certificate, ALPN).
    pub config: Arc<ClientConfig>,
    /// What sets this configuration apart, for the connection pool key.
    pub tag: Arc<str>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.tag)
    }
}

/// The client configuration for `u` when its scheme is `https` or `grpcs` (else `None`);
/// `alpn` is offered (`h2` for gRPC, `http/1.1` otherwise). Errors name the key below
/// `path`.
pub fn upstream_tls(
    u: &Upstream,
    store: &TlsStore,
    alpn: &[&[u8]],
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Arc<UpstreamTls>> {
    let tls = u.tls.as_ref().and_then(|t| t.as_object());
    let verify = match tls.and_then(|t| t.get("verify")) {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            errs.push(format!("{path}.tls.verify"), "must be a boolean");
            return None;
        }
    };
    let str_field = |k: &str| tls.and_then(|t| t.get(k)).and_then(|v| v.as_str());
    let client = match (
        str_field("client_cert"),
        str_field("client_key"),
        str_field("client_cert_id"),
    ) {
        (Some(c), Some(k), _) => {
            let certs = parse_certs(c).map_err(|e| errs.push(format!("{path}.tls.client_cert"), e));
            let key = parse_key(k).map_err(|e| errs.push(format!("{path}.tls.client_key"), e));
            match (certs, key) {
                (Ok(c), Ok(k)) => Some((c, k)),
                _ => return None,
            }
        }
        (Some(_), None, _) => {
            errs.push(
                format!("{path}.tls.client_key"),
                "required with client_cert",
            );
            return None;
        }
        (None, Some(_), _) => {
            errs.push(
                format!("{path}.tls.client_cert"),
                "required with client_key",
            );
            return None;
        }
        (None, None, Some(id)) => match store.client_cert(id) {
            Some((c, k)) => Some((c.clone(), k.clone_key())),
            None => {
                errs.push(
                    format!("{path}.tls.client_cert_id"),
                    format!("no ssls entry of type client with id {id:?}"),
                );
                return None;
            }
        },
        (None, None, None) => None,
    };
    let b = match store.client_builder(verify) {
        Ok(b) => b,
        Err((key, e)) => {
            errs.push(format!("{path}.{key}"), e);
            return None;
        }
    };
    let mut tag = format!("v{}", u8::from(verify));
    let mut cfg = match client {
        Some((certs, key)) => {
            tag.push_str(&format!(
                "|c{:016x}",
                fnv(certs.first().map_or(&[][..], |c| c.as_ref()))
            ));
            match b.with_client_auth_cert(certs, key) {
                Ok(c) => c,
                Err(e) => {
                    errs.push(format!("{path}.tls.client_key"), e.to_string());
                    return None;
                }
            }
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(256);
    Some(Arc::new(UpstreamTls {
        config: Arc::new(cfg),
        tag: Arc::from(tag.as_str()),
    }))
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}
