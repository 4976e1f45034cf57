//! Stamps: who created an object, as the admission webhook saw it, signed with a key only the
//! operator holds, so that the controller can tell a stamp the webhook wrote from one a client
//! wrote itself.

/// The HMAC key that signs stamps (at least 32 bytes).
#[derive(Clone)]
pub struct StampKey(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("the stamp key is {0} bytes; it needs at least 32")]
    KeyTooShort(usize),
}

impl StampKey {
    pub fn new(bytes: Vec<u8>) -> Result<StampKey, StampError> {
        if bytes.len() < 32 {
            return Err(StampError::KeyTooShort(bytes.len()));
        }
        Ok(StampKey(bytes))
    }

    /// A fresh random key (32 bytes from the OS).
    pub fn generate() -> Result<StampKey, getrandom::Error> {
        let mut bytes = vec![0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(StampKey(bytes))
    }

    /// The key's bytes, for storing it in a Secret.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for StampKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StampKey(<redacted>)")
    }
}
