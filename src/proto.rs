//! Protocol constants: every fixed number and name of the wire contract
//! (`docs/protocol.md`, PROTOCOL.md) in one place. Tunable timings that a user
//! may change live in [`crate::config::Timings`] instead.

use std::time::Duration;

/// Wire protocol version carried in every beacon (`v`).
pub const PROTOCOL_VERSION: u64 = 1;

/// Default multicast group and port for beacons.
pub const DEFAULT_BEACON_GROUP: &str = "239.255.0.69";
pub const DEFAULT_BEACON_PORT: u16 = 45317;
/// Default HTTPS port.
pub const DEFAULT_HTTP_PORT: u16 = 8442;
/// Beacons never leave the link.
pub const BEACON_TTL: u32 = 1;
/// Largest beacon datagram accepted or sent.
pub const MAX_BEACON_BYTES: usize = 1024;
/// The beacon token rolls every 30 s (`step = floor(timestamp / 30000)`).
pub const TOKEN_STEP_MS: u64 = 30_000;
/// Bytes of the HMAC kept in `clusterToken` (16 hex characters).
pub const TOKEN_BYTES: usize = 8;
/// Superseded sessions remembered per peer, so an old session's beacons can't be replayed.
pub const SUPERSEDED_SESSIONS_KEPT: usize = 8;
/// A peer whose beacon timestamps differ from ours by more than this gets a clock-skew warning.
pub const CLOCK_SKEW_WARN_MS: u64 = 90_000;
/// ...at most once per peer per this long.
pub const CLOCK_SKEW_WARN_EVERY: Duration = Duration::from_secs(3600);
/// Never more than one beacon per this long (the `leaving` beacon is exempt).
pub const MIN_BEACON_GAP: Duration = Duration::from_secs(1);
/// Beacon interval jitter, as a fraction of the interval (±10 %).
pub const BEACON_JITTER: f64 = 0.10;

/// KDF salt prefix: `salt = "krill-cluster-v1:" + cluster name`.
pub const KDF_SALT_PREFIX: &str = "krill-cluster-v1:";
pub const DEFAULT_KDF_ITERATIONS: u32 = 600_000;
/// Messages that derive the beacon and trust keys from the derived key.
pub const BEACON_KEY_INFO: &[u8] = b"krill beacon v1";
pub const TRUST_KEY_INFO: &[u8] = b"krill trust v1";
/// Length of the random salt in `pin_hash`.
pub const PIN_HASH_SALT_BYTES: usize = 16;
/// A passphrase (instead of a 4-digit PIN) has this many characters, inclusive.
pub const PASSPHRASE_MIN_CHARS: usize = 12;
pub const PASSPHRASE_MAX_CHARS: usize = 128;
/// Default cluster name (part of the KDF salt).
pub const DEFAULT_CLUSTER: &str = "krill";

/// Credential file names inside `credentials_dir`.
pub const PIN_DERIVED_KEY_FILE: &str = "pin_derived_key";
pub const PIN_HASH_FILE: &str = "pin_hash";
/// File names inside `state_dir`.
pub const INSTALL_ID_FILE: &str = "install_id";
pub const TLS_DIR: &str = "tls";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const PEERS_DIR: &str = "peers";
pub const NODES_FILE: &str = "nodes.json";
pub const KNOWN_PEERS_FILE: &str = "known_peers.json";

/// Request body limit (413 past it).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most values in one `POST /values` batch (a krill extension, docs/protocol.md): a
/// full batch of small values fits well inside `MAX_BODY_BYTES`, and the state owner
/// spends well under a millisecond on it.
pub const MAX_BATCH_VALUES: usize = 1000;
/// Longest SSE line a reader accepts before it drops the stream.
pub const MAX_SSE_LINE_BYTES: usize = 1024 * 1024;
/// Most peers in the table.
pub const MAX_PEERS: usize = 256;
/// Most concurrent SSE subscribers (503 with `Retry-After` past it).
pub const MAX_SSE_SUBSCRIBERS: usize = 64;
pub const SSE_RETRY_AFTER_S: u64 = 5;
pub const DEFAULT_MAX_NODES: usize = 10_000;
/// Events kept for `Last-Event-ID` resume.
pub const SSE_RING_EVENTS: usize = 4096;
/// Events queued for one subscriber before it is dropped as too slow.
pub const SSE_SUBSCRIBER_QUEUE: usize = 4096;
/// A reader that got nothing for `keepalive * 2.5` treats the stream as dead.
pub const SSE_DEAD_FACTOR_TENTHS: u32 = 25;

/// Online guessing limit: this many failed bearer checks from one address...
pub const AUTH_MAX_FAILURES: usize = 5;
/// ...within this window...
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);
/// ...locks that address out of authenticated routes for this long.
pub const AUTH_LOCKOUT: Duration = Duration::from_secs(60);

/// Reconnect backoff after a failed dial: jittered exponential, from..to.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Health rule (PROTOCOL §7): "answered within the last 5 min".
pub const HEALTHY_RECENT: Duration = Duration::from_secs(300);
/// Health rule: fewer attempts than this count as healthy (benefit of the doubt).
pub const HEALTHY_MIN_ATTEMPTS: u64 = 5;

/// How a mirrored node looks while its owner is gone.
pub const STATE_STALE: &str = "STALE";
/// Platform string this build reports.
pub const PLATFORM: &str = "LINUX";
/// The version reported to peers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
