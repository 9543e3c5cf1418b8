//! Login tokens: HMAC-SHA256 over user, device and expiry, verified locally.
//!
//! Token text: `v1.<user>.<device>.<expiry_unix_s>.<mac>` where `mac` is the unpadded
//! base64url HMAC-SHA256 of everything before the last dot, under the 32-byte key. No database
//! is consulted. During key rotation the previous key stays valid. Pure: the clock is passed in.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::ids::{DeviceId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// Length of a signing key, in bytes.
pub const KEY_BYTES: usize = 32;

/// Why a token was refused. All are the client's fault.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the `v1.user.device.expiry.mac` form.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// The MAC matches no current key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token was minted for another user or device.
    #[error("token was issued for user {user} device {device}")]
    WrongSubject {
        /// User in the token.
        user: u64,
        /// Device in the token.
        device: u32,
    },
    /// Expired at the given Unix second.
    #[error("token expired at {0} (unix seconds)")]
    Expired(u64),
}

/// Errors loading key material; these stop the server at start.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// Which file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key is not 64 hex digits.
    #[error("key {what} must be {KEY_BYTES} bytes as 64 hex digits")]
    BadKey {
        /// Where it came from.
        what: String,
    },
}

/// The current signing key and, during rotation, the previous one.
#[derive(Clone)]
pub struct TokenKeys {
    current: [u8; KEY_BYTES],
    previous: Option<[u8; KEY_BYTES]>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(<redacted>)")
    }
}

/// Parses a key written as 64 hex digits (surrounding whitespace ignored).
pub fn parse_key_hex(text: &str, what: &str) -> Result<[u8; KEY_BYTES], KeyError> {
    let t = text.trim();
    let bad = || KeyError::BadKey {
        what: what.to_string(),
    };
    if t.len() != KEY_BYTES * 2 {
        return Err(bad());
    }
    let mut key = [0u8; KEY_BYTES];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a key file; if `create` and the file does not exist, writes a new random key there
/// with mode 0600 (the embedded-defaults path: the first `gatehouse run` or `gatehouse token`
/// on a fresh data directory makes one).
pub fn load_or_create_key_file(path: &Path, create: bool) -> Result<[u8; KEY_BYTES], KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key_hex(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut key = [0u8; KEY_BYTES];
            getrandom::getrandom(&mut key).map_err(|e| io(std::io::Error::other(e.to_string())))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match &mut f {
                Ok(f) => {
                    f.write_all(format!("{}\n", hex(&key)).as_bytes())
                        .map_err(io)?;
                    f.sync_all().map_err(io)?;
                    Ok(key)
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_key_file(path, false)
                }
                Err(_) => Err(io(f.expect_err("error arm"))),
            }
        }
        Err(e) => Err(io(e)),
    }
}

impl TokenKeys {
    /// Keys from raw bytes.
    pub fn new(current: [u8; KEY_BYTES], previous: Option<[u8; KEY_BYTES]>) -> TokenKeys {
        TokenKeys { current, previous }
    }

    fn mac(key: &[u8; KEY_BYTES], signed: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(signed);
        mac
    }

    /// Mints a token for `user` on `device`, valid until `expiry_unix_s`.
    pub fn mint(&self, user: UserId, device: DeviceId, expiry_unix_s: u64) -> String {
        let signed = format!("v1.{}.{}.{}", user.0, device.0, expiry_unix_s);
        let tag = Self::mac(&self.current, signed.as_bytes())
            .finalize()
            .into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Verifies `token` for `user` on `device` at `now_unix_s`. The MAC comparison is
    /// constant-time.
    pub fn verify(
        &self,
        token: &[u8],
        user: UserId,
        device: DeviceId,
        now_unix_s: u64,
    ) -> Result<(), TokenError> {
        let text = std::str::from_utf8(token).map_err(|_| TokenError::Malformed("not UTF-8"))?;
        let (signed, tag_b64) = text
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("missing signature"))?;
        let mut parts = signed.split('.');
        if parts.next() != Some("v1") {
            return Err(TokenError::Malformed("unknown version (want v1)"));
        }
        let mut num = |what| {
            parts
                .next()
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or(TokenError::Malformed(what))
        };
        let t_user = num("bad user field")?;
        let t_device = num("bad device field")?;
        let expiry = num("bad expiry field")?;
        if parts.next().is_some() {
            return Err(TokenError::Malformed("too many fields"));
        }
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let ok = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|key| Self::mac(key, signed.as_bytes()).verify_slice(&tag).is_ok());
        if !ok {
            return Err(TokenError::BadSignature);
        }
        if t_user != user.0 || u64::from(device.0) != t_device {
            return Err(TokenError::WrongSubject {
                user: t_user,
                device: t_device as u32,
            });
        }
        if now_unix_s >= expiry {
            return Err(TokenError::Expired(expiry));
        }
        Ok(())
    }
}

/// Parses a duration such as `90s`, `15m`, `1h`, `7d` (or bare seconds), for `--ttl`.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        Some('d') => (&t[..t.len() - 1], 86_400),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {text:?} (use e.g. 90s, 15m, 1h, 7d)"))?;
    n.checked_mul(mult)
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("duration {text:?} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new([7; KEY_BYTES], None)
    }

    #[test]
    fn mint_then_verify() {
        let k = keys();
        let t = k.mint(UserId(42), DeviceId(1), 1000);
        assert!(t.starts_with("v1.42.1.1000."));
        assert_eq!(k.verify(t.as_bytes(), UserId(42), DeviceId(1), 999), Ok(()));
        assert_eq!(
            k.verify(t.as_bytes(), UserId(42), DeviceId(1), 1000),
            Err(TokenError::Expired(1000))
        );
        assert_eq!(
            k.verify(t.as_bytes(), UserId(43), DeviceId(1), 0),
            Err(TokenError::WrongSubject {
                user: 42,
                device: 1
            })
        );
    }

    #[test]
    fn forged_and_garbage_tokens_fail() {
        let k = keys();
        let t = k.mint(UserId(42), DeviceId(1), 1000);
        let forged = t.replace("v1.42.1.1000", "v1.42.1.9999");
        assert_eq!(
            k.verify(forged.as_bytes(), UserId(42), DeviceId(1), 0),
            Err(TokenError::BadSignature)
        );
        let other = TokenKeys::new([8; KEY_BYTES], None).mint(UserId(42), DeviceId(1), 1000);
        assert_eq!(
            k.verify(other.as_bytes(), UserId(42), DeviceId(1), 0),
            Err(TokenError::BadSignature)
        );
        for junk in [
            "",
            "v1",
            "v2.1.1.1.xx",
            "v1.a.1.1.xx",
            "v1.1.1.1.!!",
            "\u{ff}",
        ] {
            assert!(
                matches!(
                    k.verify(junk.as_bytes(), UserId(1), DeviceId(1), 0),
                    Err(TokenError::Malformed(_))
                ),
                "{junk}"
            );
        }
    }

    #[test]
    fn previous_key_stays_valid_during_rotation() {
        let old = TokenKeys::new([1; KEY_BYTES], None);
        let t = old.mint(UserId(5), DeviceId(0), 100);
        let rotated = TokenKeys::new([2; KEY_BYTES], Some([1; KEY_BYTES]));
        assert_eq!(
            rotated.verify(t.as_bytes(), UserId(5), DeviceId(0), 1),
            Ok(())
        );
        let after = TokenKeys::new([2; KEY_BYTES], None);
        assert_eq!(
            after.verify(t.as_bytes(), UserId(5), DeviceId(0), 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/token.key");
        let a = load_or_create_key_file(&p, true).unwrap();
        let b = load_or_create_key_file(&p, true).unwrap();
        assert_eq!(a, b);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(load_or_create_key_file(&dir.path().join("missing"), false).is_err());
        std::fs::write(dir.path().join("bad"), "abc").unwrap();
        assert!(matches!(
            load_or_create_key_file(&dir.path().join("bad"), false),
            Err(KeyError::BadKey { .. })
        ));
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("x").is_err());
    }
}
