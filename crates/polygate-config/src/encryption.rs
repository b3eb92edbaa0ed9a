//! APISIX's data encryption (`apisix.data_encryption`): SSL private keys and plugins'
//! `encrypt_fields` (key-auth's `key`) are stored in etcd encrypted with the first key of a
//! keyring, AES-CBC (a 16-byte key selects AES-128, 32 bytes AES-256) with the key as its own
//! IV, PKCS#7 padding, base64 (`apisix/core/data_encryption.lua`). polygate decrypts what it
//! reads from etcd and encrypts what its Admin API writes, with the same keyring, so data
//! written by either is served by both.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use crate::Kind;

/// Fields each plugin stores encrypted (APISIX's `encrypt_fields` of the plugins polygate has).
pub const ENCRYPT_FIELDS: &[(&str, &[&str])] = &[
    ("key-auth", &["key"]),
    ("basic-auth", &["password"]),
    ("jwt-auth", &["secret"]),
    ("hmac-auth", &["secret_key"]),
    ("csrf", &["key"]),
    ("limit-count", &["redis_password"]),
    ("limit-req", &["redis_password"]),
    ("limit-conn", &["redis_password"]),
];

/// A keyring: the first key encrypts, every key is tried to decrypt.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<Vec<u8>>,
    /// Whether plugins' `encrypt_fields` are encrypted (SSL keys are whenever there is a key).
    pub fields: bool,
}

impl Keyring {
    /// A keyring of `keys` (entries that are not 16 or 32 bytes long are ignored, logged).
    pub fn new(keys: &[String], fields: bool) -> Keyring {
        let keys = keys
            .iter()
            .filter(|k| {
                let ok = matches!(k.len(), 16 | 32);
                if !ok {
                    tracing::error!(
                        "ignored data_encryption keyring entry: expected a 16 or 32 byte key, got {} bytes",
                        k.len()
                    );
                }
                ok
            })
            .map(|k| k.as_bytes().to_vec())
            .collect();
        Keyring { keys, fields }
    }

    /// `plain` encrypted with the first key, base64; `None` without keys.
    pub fn encrypt(&self, plain: &str) -> Option<String> {
        let k = self.keys.first()?;
        let ct = match k.len() {
            16 => cbc::Encryptor::<aes::Aes128>::new_from_slices(k, k)
                .ok()?
                .encrypt_padded_vec_mut::<Pkcs7>(plain.as_bytes()),
            _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(k, &k[..16])
                .ok()?
                .encrypt_padded_vec_mut::<Pkcs7>(plain.as_bytes()),
        };
        Some(B64.encode(ct))
    }

    /// `b64` decrypted with the first key that can; `None` when none can.
    pub fn decrypt(&self, b64: &str) -> Option<String> {
        let ct = B64.decode(b64.trim()).ok()?;
        self.keys.iter().find_map(|k| {
            let pt = match k.len() {
                16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(k, k)
                    .ok()?
                    .decrypt_padded_vec_mut::<Pkcs7>(&ct)
                    .ok()?,
                _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(k, &k[..16])
                    .ok()?
                    .decrypt_padded_vec_mut::<Pkcs7>(&ct)
                    .ok()?,
            };
            String::from_utf8(pt).ok()
        })
    }

    /// Decrypts a resource's encrypted fields in place (values that do not decrypt are left
    /// as they are: data written without encryption).
    pub fn decrypt_resource(&self, kind: Kind, v: &mut Value) {
        if self.keys.is_empty() {
            return;
        }
        self.each_field(kind, v, &mut |s: &mut String, pem: bool| {
            let looks_plain = if pem { s.starts_with("---") } else { false };
            if !looks_plain && let Some(p) = self.decrypt(s) {
                *s = p;
            }
        });
    }

    /// Encrypts a resource's fields in place, as APISIX stores them.
    pub fn encrypt_resource(&self, kind: Kind, v: &mut Value) {
        if self.keys.is_empty() {
            return;
        }
        self.each_field(kind, v, &mut |s: &mut String, pem: bool| {
            // only PEM keys are encrypted (an encrypted one passes through)
            if (!pem || s.starts_with("---"))
                && let Some(c) = self.encrypt(s)
            {
                *s = c;
            }
        });
    }

    /// Calls `f` on every encrypted string field of a resource (`pem`: an SSL key).
    fn each_field(&self, kind: Kind, v: &mut Value, f: &mut dyn FnMut(&mut String, bool)) {
        if kind == Kind::Ssl {
            if let Some(Value::String(k)) = v.get_mut("key") {
                f(k, true);
            }
            if let Some(Value::Array(ks)) = v.get_mut("keys") {
                for k in ks {
                    if let Value::String(k) = k {
                        f(k, true);
                    }
                }
            }
            return;
        }
        if !self.fields {
            return;
        }
        let Some(Value::Object(plugins)) = v.get_mut("plugins") else {
            return;
        };
        for (name, fields) in ENCRYPT_FIELDS {
            if let Some(Value::Object(conf)) = plugins.get_mut(*name) {
                for field in *fields {
                    if let Some(Value::String(s)) = conf.get_mut(*field) {
                        f(s, false);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn apisix_default() -> Keyring {
        Keyring::new(
            &["qeddd145sfvddff3".into(), "edd1c9f0985e76a2".into()],
            true,
        )
    }

    /// `t/node/data_encrypt.t` TEST 1: "bar" with the keyring `[edd1c9f0985e76a2]` is stored as
    /// `77+NmbYqNfN+oLm0aX5akg==`.
    #[test]
    fn apisix_ciphertext() {
        let k = Keyring::new(&["edd1c9f0985e76a2".into()], true);
        assert_eq!(
            k.encrypt("bar").as_deref(),
            Some("77+NmbYqNfN+oLm0aX5akg==")
        );
        assert_eq!(
            k.decrypt("77+NmbYqNfN+oLm0aX5akg==").as_deref(),
            Some("bar")
        );
    }

    #[test]
    fn round_trip_and_older_keys_still_decrypt() {
        let k = apisix_default();
        let c = k.encrypt("auth-one").unwrap();
        assert_ne!(c, "auth-one");
        assert_eq!(k.decrypt(&c).as_deref(), Some("auth-one"));
        // written with the second (older) key: still read
        let old = Keyring::new(&["edd1c9f0985e76a2".into()], true);
        assert_eq!(k.decrypt(&old.encrypt("x").unwrap()).as_deref(), Some("x"));
        let k256 = Keyring::new(&["0123456789abcdef0123456789abcdef".into()], true);
        assert_eq!(
            k256.decrypt(&k256.encrypt("y").unwrap()).as_deref(),
            Some("y")
        );
        assert_eq!(k.decrypt("not base64!"), None);
    }

    #[test]
    fn resources_encrypt_their_fields_only() {
        let k = apisix_default();
        let mut c = json!({"username": "jack", "plugins": {"key-auth": {"key": "auth-one"}, "proxy-rewrite": {"uri": "/x"}}});
        k.encrypt_resource(Kind::Consumer, &mut c);
        assert_ne!(c["plugins"]["key-auth"]["key"], json!("auth-one"));
        assert_eq!(c["plugins"]["proxy-rewrite"]["uri"], json!("/x"));
        k.decrypt_resource(Kind::Consumer, &mut c);
        assert_eq!(c["plugins"]["key-auth"]["key"], json!("auth-one"));
        // a plain value (written without encryption) is left as it is
        let mut plain = json!({"plugins": {"key-auth": {"key": "auth-two"}}});
        k.decrypt_resource(Kind::Consumer, &mut plain);
        assert_eq!(plain["plugins"]["key-auth"]["key"], json!("auth-two"));
        let mut ssl = json!({"cert": "-----BEGIN CERTIFICATE-----", "key": "-----BEGIN PRIVATE KEY-----\nabc", "keys": ["-----BEGIN EC"]});
        k.encrypt_resource(Kind::Ssl, &mut ssl);
        assert!(!ssl["key"].as_str().unwrap().starts_with("---"));
        assert_eq!(ssl["cert"], json!("-----BEGIN CERTIFICATE-----"));
        k.decrypt_resource(Kind::Ssl, &mut ssl);
        assert_eq!(ssl["key"], json!("-----BEGIN PRIVATE KEY-----\nabc"));
        assert_eq!(ssl["keys"][0], json!("-----BEGIN EC"));
    }
}
