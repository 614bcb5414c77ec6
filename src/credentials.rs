//! The cluster secret (PROTOCOL §2): validation, PBKDF2, derived keys, and the
//! `pin_derived_key` / `pin_hash` files. The secret itself is never stored or logged.

use std::fs;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::proto;
use crate::util::{self, hex, unhex};

/// Everything a server derives from the cluster secret.
#[derive(Clone)]
pub struct Keys {
    /// `lowercase hex(derived_key)`: the HTTP bearer token.
    pub bearer: String,
    /// Authenticates beacons (`clusterToken`).
    pub beacon_key: [u8; 32],
    /// Authenticates `/trust` proofs.
    pub trust_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Keys {
    pub fn from_derived(derived: &[u8; 32]) -> Keys {
        Keys {
            bearer: hex(derived),
            beacon_key: hmac_sha256(derived, &[proto::BEACON_KEY_INFO]),
            trust_key: hmac_sha256(derived, &[proto::TRUST_KEY_INFO]),
        }
    }

    /// Runs the KDF. Slow on purpose (600 000 rounds by default): only when the secret is set.
    pub fn derive(secret: &str, cluster: &str, iterations: u32) -> Keys {
        let salt = format!("{}{cluster}", proto::KDF_SALT_PREFIX);
        Keys::from_derived(&pbkdf2_sha256(
            secret.as_bytes(),
            salt.as_bytes(),
            iterations,
        ))
    }
}

pub fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// Accepts a 4-digit PIN or a passphrase of 12 to 128 characters.
pub fn validate_secret(s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(());
    }
    if (proto::PASSPHRASE_MIN_CHARS..=proto::PASSPHRASE_MAX_CHARS).contains(&n) {
        if s.chars().any(char::is_control) {
            return Err("the passphrase must not contain control characters".into());
        }
        return Ok(());
    }
    Err(format!(
        "the cluster PIN must be exactly 4 digits (0-9), or a passphrase of {} to {} characters",
        proto::PASSPHRASE_MIN_CHARS,
        proto::PASSPHRASE_MAX_CHARS
    ))
}

/// `pbkdf2-sha256$<iterations>$<base64 salt>$<base64 hash>` with a fresh random salt.
pub fn pin_hash(secret: &str, iterations: u32) -> String {
    let mut salt = [0u8; proto::PIN_HASH_SALT_BYTES];
    util::random_bytes(&mut salt);
    let hash = pbkdf2_sha256(secret.as_bytes(), &salt, iterations);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "pbkdf2-sha256${iterations}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

/// Checks `secret` against a `pin_hash` line.
pub fn verify_pin_hash(secret: &str, line: &str) -> Result<bool, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let parts: Vec<&str> = line.trim().split('$').collect();
    let [scheme, iters, salt, hash] = parts[..] else {
        return Err("pin_hash is not scheme$iterations$salt$hash".into());
    };
    if scheme != "pbkdf2-sha256" {
        return Err(format!("pin_hash has unknown scheme {scheme:?}"));
    }
    let iters: u32 = iters
        .parse()
        .map_err(|_| "pin_hash has a bad iteration count".to_string())?;
    let salt = b64
        .decode(salt)
        .map_err(|_| "pin_hash has a bad salt".to_string())?;
    let hash = b64
        .decode(hash)
        .map_err(|_| "pin_hash has a bad hash".to_string())?;
    Ok(util::ct_eq(
        &pbkdf2_sha256(secret.as_bytes(), &salt, iters),
        &hash,
    ))
}

/// Reads `pin_derived_key` from `dir`. `Ok(None)` when no PIN has been set.
pub fn load(dir: &Path) -> Result<Option<Keys>, String> {
    let path = dir.join(proto::PIN_DERIVED_KEY_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let bytes = unhex(text.trim())
        .filter(|b| b.len() == 32)
        .ok_or_else(|| format!("{} is not 64 hex characters", path.display()))?;
    let mut derived = [0u8; 32];
    derived.copy_from_slice(&bytes);
    Ok(Some(Keys::from_derived(&derived)))
}

/// Writes both credential files (mode 0400) into `dir` (mode 0700, created when
/// missing). As root, on a system with a `krill` user, both are given to `krill`.
pub fn store(dir: &Path, keys: &Keys, hash_line: &str) -> Result<(), String> {
    let ctx = |what: &str, p: &Path, e: io::Error| format!("cannot {what} {}: {e}", p.display());
    util::ensure_dir(dir, 0o700).map_err(|e| ctx("create directory", dir, e))?;
    for (name, content) in [
        (proto::PIN_DERIVED_KEY_FILE, &keys.bearer),
        (proto::PIN_HASH_FILE, &hash_line.to_string()),
    ] {
        let p = dir.join(name);
        util::write_atomic(&p, format!("{content}\n").as_bytes(), 0o400)
            .map_err(|e| ctx("write", &p, e))?;
    }
    if let Some((uid, gid)) = krill_user() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            for p in [
                dir.to_path_buf(),
                dir.join(proto::PIN_DERIVED_KEY_FILE),
                dir.join(proto::PIN_HASH_FILE),
            ] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(|e| ctx("chown to krill", &p, e))?;
            }
        }
    }
    Ok(())
}

/// The uid and gid of the `krill` system user, when it exists.
fn krill_user() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("krill").ok()?;
    // SAFETY: getpwnam takes a NUL-terminated name and returns NULL or a valid entry.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        None
    } else {
        // SAFETY: pw is non-null and points to a passwd entry.
        Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
    }
}

/// The permission bits of `path` (for tests and diagnostics).
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.mode() & 0o777)
}

/// Reads one line from stdin (for `--pin-stdin`), without its line ending.
pub fn read_secret_stdin() -> Result<String, String> {
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the PIN from stdin: {e}"))?;
    if line.is_empty() {
        return Err("no PIN on stdin (expected one line)".into());
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Asks for the secret on the terminal without echo.
pub fn read_secret_tty(prompt: &str) -> Result<String, String> {
    let tty = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| format!("no terminal to ask for the PIN ({e}); use --pin-stdin"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tty);
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut term) } != 0 {
        return Err("cannot read terminal settings; use --pin-stdin".into());
    }
    let saved = term;
    term.c_lflag &= !libc::ECHO;
    term.c_lflag |= libc::ECHONL;
    // SAFETY: fd is a terminal and term a valid termios.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &term) };
    let mut w = &tty;
    let _ = w.write_all(prompt.as_bytes());
    let _ = w.flush();
    let mut line = String::new();
    let r = io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    r.map_err(|e| format!("cannot read the PIN: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_known_answers() {
        // Published PBKDF2-HMAC-SHA256 test vectors (password "password", salt "salt").
        assert_eq!(
            hex(&pbkdf2_sha256(b"password", b"salt", 1)),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
        assert_eq!(
            hex(&pbkdf2_sha256(b"password", b"salt", 2)),
            "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"
        );
        assert_eq!(
            hex(&pbkdf2_sha256(b"password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn cluster_keys_known_answers() {
        // Computed independently with Python's hashlib.pbkdf2_hmac and hmac.
        let k = Keys::derive("1234", "krill", 1000);
        assert_eq!(k.bearer, KAT_BEARER);
        assert_eq!(hex(&k.beacon_key), KAT_BEACON_KEY);
        assert_eq!(hex(&k.trust_key), KAT_TRUST_KEY);
        // The cluster name is part of the salt.
        assert_ne!(Keys::derive("1234", "other", 1000).bearer, k.bearer);
    }

    pub const KAT_BEARER: &str = "3ee1a94e6909ac0b0b21f7c78970ca3e223d5a049e4718e199d673e8e2fa8bf3";
    pub const KAT_BEACON_KEY: &str =
        "fef44873d3c7c97893ffcd5420ee6f560c4bcf23066ddf6631dc95a24d72cad7";
    pub const KAT_TRUST_KEY: &str =
        "7e34f239a1cbbd501b1e78303f46af7523e956768386bd88356cbfe7a98d33e1";

    #[test]
    fn secrets_are_validated() {
        assert!(validate_secret("0042").is_ok());
        assert!(validate_secret("correct horse battery").is_ok());
        assert!(
            validate_secret("ÄÖÜäöüßÄÖÜäö").is_ok(),
            "12 characters, more bytes"
        );
        for bad in [
            "",
            "123",
            "12345",
            "12a4",
            "short phr",
            " 1234",
            &"x".repeat(129),
        ] {
            assert!(validate_secret(bad).is_err(), "{bad:?}");
        }
        assert!(validate_secret("twelve chars\u{7}").is_err());
    }

    #[test]
    fn pin_hash_round_trip() {
        let h = pin_hash("1234", 1000);
        assert!(h.starts_with("pbkdf2-sha256$1000$"), "{h}");
        assert_eq!(verify_pin_hash("1234", &h), Ok(true));
        assert_eq!(verify_pin_hash("1235", &h), Ok(false));
        assert_ne!(pin_hash("1234", 1000), h, "fresh salt each time");
        assert!(verify_pin_hash("1234", "md5$x").is_err());
    }

    #[test]
    fn store_and_load() {
        let dir = std::env::temp_dir().join(format!("krill-cred-{}", util::uuid_v4()));
        let keys = Keys::derive("4321", "krill", 10);
        store(&dir, &keys, &pin_hash("4321", 10)).unwrap();
        assert_eq!(mode_of(&dir), Some(0o700));
        assert_eq!(mode_of(&dir.join(proto::PIN_DERIVED_KEY_FILE)), Some(0o400));
        assert_eq!(mode_of(&dir.join(proto::PIN_HASH_FILE)), Some(0o400));
        let loaded = load(&dir).unwrap().unwrap();
        assert_eq!(loaded.bearer, keys.bearer);
        assert_eq!(loaded.beacon_key, keys.beacon_key);
        // Storing again over read-only files works (rename, not rewrite).
        store(
            &dir,
            &Keys::derive("9999", "krill", 10),
            &pin_hash("9999", 10),
        )
        .unwrap();
        assert_ne!(load(&dir).unwrap().unwrap().bearer, keys.bearer);
        fs::remove_dir_all(&dir).unwrap();
        assert!(load(&dir).unwrap().is_none());
    }
}
