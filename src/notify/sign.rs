//! The generic format's signature: HMAC-SHA256 over `<timestamp>.<body>`, where `<timestamp>`
//! is the value of [`TIMESTAMP_HEADER`] (Unix seconds, decimal) and `<body>` the exact bytes
//! sent, hex-encoded (lower case) in [`SIGNATURE_HEADER`] as `sha256=<hex>`. Signing the
//! timestamp lets a receiver refuse replays: it checks the signature, then that the timestamp
//! is recent (e.g. within 5 minutes of its clock).

use hmac::Mac;

use crate::admission::stamp::hmac_sha256;

pub const SIGNATURE_HEADER: &str = "X-Portcullis-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Portcullis-Timestamp";
/// The shortest signing key accepted: shorter keys are guessable.
pub const MIN_KEY_BYTES: usize = 16;

/// A target's signing key (the bytes of the Secret's `signingKey`, as stored). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// `None` when the key is shorter than [`MIN_KEY_BYTES`].
    pub fn new(bytes: Vec<u8>) -> Option<SigningKey> {
        (bytes.len() >= MIN_KEY_BYTES).then_some(SigningKey(bytes))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// The bytes the signature covers: `<timestamp>.<body>`.
pub fn signed_bytes(timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{timestamp}.").into_bytes();
    out.extend_from_slice(body);
    out
}

/// The [`SIGNATURE_HEADER`] value for `body` sent at `timestamp`: `sha256=<hex>`.
pub fn signature(key: &SigningKey, timestamp: i64, body: &[u8]) -> String {
    let mac = hmac_sha256(&key.0, &signed_bytes(timestamp, body));
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// Whether `header` (a [`SIGNATURE_HEADER`] value) signs `body` at `timestamp` under `key`,
/// compared in constant time. What a receiver does (see the README's recipe).
pub fn verify(key: &SigningKey, timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(bytes) = header.strip_prefix("sha256=").and_then(unhex) else {
        return false;
    };
    hmac_sha256(&key.0, &signed_bytes(timestamp, body))
        .verify_slice(&bytes)
        .is_ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::new(b"0123456789abcdef0123456789abcdef".to_vec()).expect("long enough")
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        // Independently: HMAC-SHA256(key, "1700000000.{}") as any library computes it.
        let sig = signature(&key(), 1_700_000_000, b"{}");
        let expected = hmac_sha256(b"0123456789abcdef0123456789abcdef", b"1700000000.{}")
            .finalize()
            .into_bytes();
        assert_eq!(sig, format!("sha256={}", hex(&expected)));
        assert_eq!(sig.len(), "sha256=".len() + 64);
        assert!(verify(&key(), 1_700_000_000, b"{}", &sig));
    }

    #[test]
    fn a_changed_body_timestamp_or_key_does_not_verify() {
        let sig = signature(&key(), 1_700_000_000, b"{\"a\":1}");
        assert!(!verify(&key(), 1_700_000_000, b"{\"a\":2}", &sig));
        assert!(!verify(&key(), 1_700_000_001, b"{\"a\":1}", &sig));
        let other = SigningKey::new(b"0123456789abcdef0123456789abcdeF".to_vec()).expect("key");
        assert!(!verify(&other, 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(&key(), 1_700_000_000, b"{\"a\":1}", "sha256=zz"));
        assert!(!verify(&key(), 1_700_000_000, b"{\"a\":1}", &sig[7..]));
    }

    #[test]
    fn short_keys_are_refused_and_keys_never_print() {
        assert!(SigningKey::new(vec![7; MIN_KEY_BYTES - 1]).is_none());
        assert!(SigningKey::new(vec![7; MIN_KEY_BYTES]).is_some());
        assert_eq!(format!("{:?}", key()), "SigningKey(<redacted>)");
    }
}
