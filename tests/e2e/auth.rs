//! jwt-auth through the real gateway with real signatures (HMAC, RSA from the openssl command,
//! ECDSA P-256 and Ed25519 from ring): APISIX's `t/plugin/jwt-auth*.t` and the plugin's docs.

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::KeyPair as _;

use crate::support::*;

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `header.payload` and the signing input.
fn unsigned(alg: &str, payload: serde_json::Value) -> String {
    format!(
        "{}.{}",
        b64(serde_json::json!({"alg": alg, "typ": "JWT"})
            .to_string()
            .as_bytes()),
        b64(payload.to_string().as_bytes())
    )
}

fn hs256(secret: &[u8], payload: serde_json::Value) -> String {
    let input = unsigned("HS256", payload);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b = STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_auth() {
    let u = Upstream::start("u").await;
    let dir = tempdir::Dir::new();
    // RSA with the openssl command (ring signs but does not make RSA keys)
    let key = dir.path().join("rsa.pem");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl genrsa");
    let rsa_pub = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    let rsa_pub = String::from_utf8(rsa_pub.stdout).unwrap();
    let rs256 = |payload: serde_json::Value| {
        let input = unsigned("RS256", payload);
        let f = dir.path().join("input");
        std::fs::write(&f, &input).unwrap();
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .arg(&f)
            .output()
            .unwrap();
        format!("{input}.{}", b64(&out.stdout))
    };
    // ECDSA P-256 and Ed25519 with ring
    let rng = ring::rand::SystemRandom::new();
    let ec_pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let ec = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        ec_pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let mut ec_spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    ec_spki.extend_from_slice(ec.public_key().as_ref());
    let es256 = |payload: serde_json::Value| {
        let input = unsigned("ES256", payload);
        let sig = ec.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    };
    let ed_pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed = ring::signature::Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).unwrap();
    let mut ed_spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    ed_spki.extend_from_slice(ed.public_key().as_ref());
    let eddsa = |payload: serde_json::Value| {
        let input = unsigned("EdDSA", payload);
        format!("{input}.{}", b64(ed.sign(input.as_bytes()).as_ref()))
    };
    let quote = |s: &str| serde_json::to_string(s).unwrap();
    let gw = Gateway::start(&format!(
        r#"
consumers:
  - username: jack
    plugins:
      jwt-auth: {{key: user-key, secret: my-secret-key}}
  - username: rsa
    plugins:
      jwt-auth: {{key: rsa-key, algorithm: RS256, public_key: {rsa}}}
  - username: ec
    plugins:
      jwt-auth: {{key: ec-key, algorithm: ES256, public_key: {ec}}}
  - username: ed
    plugins:
      jwt-auth: {{key: ed-key, algorithm: EdDSA, public_key: {ed}}}
  - username: b64
    plugins:
      jwt-auth: {{key: b64-key, secret: {b64s}, base64_secret: true, lifetime_grace_period: 60}}
routes:
  - uri: /hello
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      jwt-auth: {{}}
  - uri: /hidden
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      jwt-auth: {{hide_credentials: true, claims_to_verify: [exp]}}
"#,
        n = u.node(),
        rsa = quote(&rsa_pub),
        ec = quote(&pem("PUBLIC KEY", &ec_spki)),
        ed = quote(&pem("PUBLIC KEY", &ed_spki)),
        b64s = quote(&STANDARD.encode(b"binary\x00secret")),
    ));
    let p = gw.port;
    let good = hs256(
        b"my-secret-key",
        serde_json::json!({"key": "user-key", "exp": now() + 600}),
    );
    // t/plugin/jwt-auth.t: header with and without Bearer, query, cookie
    for (path, headers) in [
        (
            "/hello".to_owned(),
            vec![("authorization", format!("Bearer {good}"))],
        ),
        ("/hello".to_owned(), vec![("authorization", good.clone())]),
        (format!("/hello?jwt={good}"), vec![]),
        (
            "/hello".to_owned(),
            vec![("cookie", format!("a=1; jwt={good}"))],
        ),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get_h(p, &path, &h).await;
        assert_eq!(r.status, 200, "{path} {headers:?}: {}", r.body);
        assert_eq!(
            r.seen_header("x-consumer-username").as_deref(),
            Some("jack")
        );
    }
    let unauthorized = async |h: &[(&str, &str)], msg: &str| {
        let r = get_h(p, "/hello", h).await;
        assert_eq!(r.status, 401, "{h:?}");
        assert_eq!(r.body, format!("{{\"message\":\"{msg}\"}}\n"), "{h:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"jwt\""));
    };
    unauthorized(&[], "Missing JWT token in request").await;
    unauthorized(
        &[("authorization", "Bearer not.a.jwt")],
        "JWT token invalid",
    )
    .await;
    let no_key = hs256(b"my-secret-key", serde_json::json!({"exp": now() + 60}));
    unauthorized(
        &[("authorization", &no_key)],
        "missing user key in JWT token",
    )
    .await;
    let unknown = hs256(b"my-secret-key", serde_json::json!({"key": "nobody"}));
    unauthorized(
        &[("authorization", &unknown)],
        "Invalid user key in JWT token",
    )
    .await;
    let forged = hs256(b"wrong-secret", serde_json::json!({"key": "user-key"}));
    unauthorized(&[("authorization", &forged)], "failed to verify jwt").await;
    let expired = hs256(
        b"my-secret-key",
        serde_json::json!({"key": "user-key", "exp": now() - 10}),
    );
    unauthorized(&[("authorization", &expired)], "failed to verify jwt").await;
    let early = hs256(
        b"my-secret-key",
        serde_json::json!({"key": "user-key", "nbf": now() + 100}),
    );
    unauthorized(&[("authorization", &early)], "failed to verify jwt").await;
    // alg none and algorithm confusion are refused
    let none = format!(
        "{}.",
        unsigned("none", serde_json::json!({"key": "user-key"}))
    );
    unauthorized(&[("authorization", &none)], "failed to verify jwt").await;
    let confused = {
        let input = unsigned("HS256", serde_json::json!({"key": "rsa-key"}));
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, rsa_pub.as_bytes());
        format!(
            "{input}.{}",
            b64(ring::hmac::sign(&k, input.as_bytes()).as_ref())
        )
    };
    unauthorized(&[("authorization", &confused)], "failed to verify jwt").await;
    // public-key algorithms
    for (t, who) in [
        (rs256(serde_json::json!({"key": "rsa-key"})), "rsa"),
        (es256(serde_json::json!({"key": "ec-key"})), "ec"),
        (eddsa(serde_json::json!({"key": "ed-key"})), "ed"),
    ] {
        let r = get_h(p, "/hello", &[("authorization", &t)]).await;
        assert_eq!(r.status, 200, "{who}: {}", r.body);
        assert_eq!(r.seen_header("x-consumer-username").as_deref(), Some(who));
    }
    // base64_secret, and lifetime_grace_period lets a just-expired token through
    let b = hs256(
        b"binary\x00secret",
        serde_json::json!({"key": "b64-key", "exp": now() - 5}),
    );
    assert_eq!(
        get_h(p, "/hello", &[("authorization", &b)]).await.status,
        200
    );
    // hide_credentials; claims_to_verify [exp] requires exp
    let r = get_h(p, "/hidden", &[("authorization", &good)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("authorization"), None);
    let no_exp = hs256(b"my-secret-key", serde_json::json!({"key": "user-key"}));
    assert_eq!(
        get_h(p, "/hidden", &[("authorization", &no_exp)])
            .await
            .status,
        401
    );
    // an HS consumer without a secret is a configuration error naming the key path
    let (code, out) = validate(
        "consumers:\n  - username: x\n    plugins:\n      jwt-auth: {key: k}\nroutes: []\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(
        out.contains("consumers[0].plugins.jwt-auth.secret"),
        "{out}"
    );
}

fn http_date(t: i64) -> String {
    polygate_core::time::format_time(t, polygate_core::time::TimeFmt::Http)
}

#[tokio::test(flavor = "multi_thread")]
async fn hmac_auth() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
consumers:
  - username: jack
    plugins:
      hmac-auth: {{key_id: my-access-key, secret_key: my-secret-key}}
routes:
  - uri: /hello
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      hmac-auth: {{}}
  - uri: /body
    methods: [POST]
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      hmac-auth: {{validate_request_body: true, hide_credentials: true, signed_headers: [date, x-custom]}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let sign =
        |alg: ring::hmac::Algorithm, method: &str, target: &str, headers: &[(&str, &str)]| {
            let mut s = "my-access-key\n".to_owned();
            for (k, v) in headers {
                s.push_str(&format!("{k}: {v}\n"));
            }
            if !target.is_empty() {
                s = format!(
                    "my-access-key\n{method} {target}\n{}",
                    &s["my-access-key\n".len()..]
                );
            }
            let k = ring::hmac::Key::new(alg, b"my-secret-key");
            STANDARD.encode(ring::hmac::sign(&k, s.as_bytes()).as_ref())
        };
    let date = http_date(now());
    // docs: "@request-target date", hmac-sha256
    let sig = sign(
        ring::hmac::HMAC_SHA256,
        "GET",
        "/hello?x=1",
        &[("date", &date)],
    );
    let auth = format!(
        r#"Signature keyId="my-access-key",algorithm="hmac-sha256",headers="@request-target date",signature="{sig}""#
    );
    let r = get_h(
        p,
        "/hello?x=1",
        &[("authorization", &auth), ("date", &date)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.seen_header("x-consumer-username").as_deref(),
        Some("jack")
    );
    assert_eq!(
        r.seen_header("authorization").as_deref(),
        Some(auth.as_str())
    );
    // another target with the same signature: refused
    let r = get_h(
        p,
        "/hello?x=2",
        &[("authorization", &auth), ("date", &date)],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.body,
        "{\"message\":\"client request can't be validated\"}\n"
    );
    assert_eq!(r.header("www-authenticate"), Some("hmac realm=\"hmac\""));
    // no Authorization; not a Signature
    let r = get(p, "/hello").await;
    assert_eq!(
        r.body,
        "{\"message\":\"client request can't be validated: missing Authorization header\"}\n"
    );
    let r = get_h(p, "/hello", &[("authorization", "Basic x")]).await;
    assert_eq!(
        r.body,
        "{\"message\":\"client request can't be validated: Authorization header does not start with 'Signature'\"}\n"
    );
    // clock skew: a Date 10 minutes old
    let old = http_date(now() - 600);
    let sig = sign(ring::hmac::HMAC_SHA256, "GET", "/hello", &[("date", &old)]);
    let auth_old = format!(
        r#"Signature keyId="my-access-key",algorithm="hmac-sha256",headers="@request-target date",signature="{sig}""#
    );
    assert_eq!(
        get_h(p, "/hello", &[("authorization", &auth_old), ("date", &old)])
            .await
            .status,
        401
    );
    // the date must be signed (signed_headers default)
    let sig = sign(ring::hmac::HMAC_SHA512, "GET", "/hello", &[]);
    let unsigned_date = format!(
        r#"Signature keyId="my-access-key",algorithm="hmac-sha512",headers="@request-target",signature="{sig}""#
    );
    assert_eq!(
        get_h(
            p,
            "/hello",
            &[("authorization", &unsigned_date), ("date", &date)]
        )
        .await
        .status,
        401
    );
    // body digest and hide_credentials
    let body = r#"{"name":"polygate"}"#;
    let digest = format!(
        "SHA-256={}",
        STANDARD.encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref())
    );
    let sig = sign(
        ring::hmac::HMAC_SHA256,
        "",
        "",
        &[("date", &date), ("x-custom", "v")],
    );
    let auth = format!(
        r#"Signature keyId="my-access-key",algorithm="hmac-sha256",headers="date x-custom",signature="{sig}""#
    );
    let hdrs = [
        ("authorization", auth.as_str()),
        ("date", date.as_str()),
        ("x-custom", "v"),
        ("digest", digest.as_str()),
    ];
    let r = request(p, "POST", "/body", &hdrs, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.seen_header("authorization"), None, "hidden");
    assert_eq!(r.json()["body"], body, "the body still goes upstream");
    let r = request(p, "POST", "/body", &hdrs, "tampered").await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn forward_auth() {
    // the authorization service: a real upstream that answers /status/<code> with that status
    // and echoes what it received (t/plugin/forward-auth.t runs a Lua one on the test server)
    let auth = Upstream::start("auth").await;
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /ok
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      forward-auth:
        uri: "http://{a}/status/200"
        request_headers: [Authorization]
        extra_headers: {{X-Client: "$remote_addr"}}
        upstream_headers: [X-Upstream]
  - uri: /deny
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      forward-auth:
        uri: "http://{a}/status/403"
        client_headers: [X-Upstream]
  - uri: /down
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      forward-auth: {{uri: "http://127.0.0.1:1/auth", timeout: 500}}
  - uri: /down-soft
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      forward-auth: {{uri: "http://127.0.0.1:1/auth", allow_degradation: true}}
  - uri: /post
    methods: [POST]
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      forward-auth: {{uri: "http://{a}/status/403", request_method: POST}}
"#,
        n = u.node(),
        a = auth.node()
    ));
    let p = gw.port;
    let r = get_h(p, "/ok?x=1", &[("authorization", "Bearer t")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.upstream(), "u");
    // the auth answer's X-Upstream header ("auth") goes upstream
    assert_eq!(r.seen_header("x-upstream").as_deref(), Some("auth"));
    assert_eq!(auth.hits(), 1);
    // denied: the service's status and body, its client_headers
    let r = get(p, "/deny").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-upstream"), Some("auth"));
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["headers"]["x-forwarded-uri"], "/deny");
    assert_eq!(seen["headers"]["x-forwarded-method"], "GET");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(u.hits(), 1, "a denied request never reaches the upstream");
    // the service unreachable: status_on_error, or let through with allow_degradation
    assert_eq!(get(p, "/down").await.status, 403);
    assert_eq!(get(p, "/down-soft").await.status, 200);
    // POST forwards the body
    let r = request(p, "POST", "/post", &[], "secret-body").await;
    assert_eq!(r.status, 403);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body"], "secret-body");
}
