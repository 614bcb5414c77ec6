//! Configuration: defaults, `KRILL_*` environment, the TOML file and flags, in
//! rising precedence (flag > file > environment > default). Every timing knob is in
//! [`Timings`], each default documented with why it has that value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto;

/// Where the daemon's config file lives unless `--config` says otherwise.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/krill/krill.toml";

/// All timings in one place (after HashiCorp memberlist's `Config`).
#[derive(Clone, Debug, PartialEq)]
pub struct Timings {
    /// Beacon period (`beacon_interval_ms`, 5 s). Beacons find new servers and notice
    /// moved ones; 5 s keeps multicast chatter negligible on a home LAN while a new
    /// server is still found at once, because every server answers a new beacon.
    pub beacon_interval: Duration,
    /// SSE keep-alive (`sse_keepalive_ms`, 1 s, cluster-wide). A reader declares a
    /// stream dead after 2.5 keep-alives of silence, so 1 s detects a silent failure
    /// (cable pulled, board frozen) in 2.5 s: under the 3 s promise, faster than
    /// gossip protocols' suspicion timeouts, at one ~30-byte TLS record a second.
    pub sse_keepalive: Duration,
    /// TCP connect and TLS handshake to a peer (`dial_timeout_ms`, 1 s). A LAN answers
    /// in milliseconds; longer would only delay the next attempt to a dead address.
    pub dial_timeout: Duration,
    /// A disconnected peer with no beacon and no successful dial for this long leaves
    /// the active table (`peer_ttl_s`, 1 h): long enough to ride out a reboot or a
    /// maintenance window without losing its entry.
    pub peer_ttl: Duration,
    /// First reconnect delay after a failed dial (1 s): quick to recover from a blip.
    pub backoff_min: Duration,
    /// Longest reconnect delay (30 s): a dead peer costs one dial per 30 s; a
    /// returning one is dialled at once anyway, by its fresh beacon.
    pub backoff_max: Duration,
    /// Peer exchange period (5 min): membership changes slowly; each connect also
    /// exchanges, so this only repairs what was missed.
    pub peer_exchange_interval: Duration,
    /// With zero connected peers, dial all static and known peers this often (30 s).
    pub rebootstrap_interval: Duration,
    /// Saved peers older than this leave `known_peers.json` (24 h).
    pub known_peers_max_age: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            beacon_interval: Duration::from_millis(5000),
            sse_keepalive: Duration::from_millis(1000),
            dial_timeout: Duration::from_millis(1000),
            peer_ttl: Duration::from_secs(3600),
            backoff_min: proto::BACKOFF_MIN,
            backoff_max: proto::BACKOFF_MAX,
            peer_exchange_interval: Duration::from_secs(300),
            rebootstrap_interval: Duration::from_secs(30),
            known_peers_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl Timings {
    /// Silence after which an SSE reader treats its stream as dead.
    pub fn sse_dead_after(&self) -> Duration {
        self.sse_keepalive * proto::SSE_DEAD_FACTOR_TENTHS / 10
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub credentials_dir: PathBuf,
    pub bind: IpAddr,
    pub port: u16,
    pub name: String,
    pub cluster: String,
    pub kdf_iterations: u32,
    pub beacon_group: Ipv4Addr,
    pub beacon_port: u16,
    /// Interface name or IPv4 address; `None` = the one with the route to the group.
    pub beacon_interface: Option<String>,
    pub beacons: bool,
    /// Static peers, `host:port`.
    pub peers: Vec<String>,
    /// Requests authenticated and routed at once. Each connection is served on a
    /// thread of its own; waiting for the disk or another server holds no slot.
    pub http_threads: usize,
    pub max_nodes: usize,
    pub log_level: log::LevelFilter,
    pub timings: Timings,
    /// The file this came from (read again on SIGHUP).
    pub file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/krill"),
            credentials_dir: PathBuf::from("/etc/krill/credentials"),
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: proto::DEFAULT_HTTP_PORT,
            name: crate::util::hostname(),
            cluster: proto::DEFAULT_CLUSTER.to_string(),
            kdf_iterations: proto::DEFAULT_KDF_ITERATIONS,
            beacon_group: proto::DEFAULT_BEACON_GROUP.parse().expect("valid constant"),
            beacon_port: proto::DEFAULT_BEACON_PORT,
            beacon_interface: None,
            beacons: true,
            peers: Vec::new(),
            http_threads: 4,
            max_nodes: proto::DEFAULT_MAX_NODES,
            log_level: log::LevelFilter::Info,
            timings: Timings::default(),
            file: PathBuf::from(DEFAULT_CONFIG_FILE),
        }
    }
}

/// Every key, its kind, and a one-line help for `--help` and errors.
pub const KEYS: &[(&str, &str)] = &[
    (
        "state_dir",
        "directory for install_id, tls/, peers/, nodes.json",
    ),
    (
        "credentials_dir",
        "directory for pin_derived_key and pin_hash",
    ),
    ("bind", "HTTPS listen address"),
    ("port", "HTTPS port"),
    ("name", "name shown to peers and people"),
    ("cluster", "cluster name (part of the KDF salt)"),
    ("kdf_iterations", "PBKDF2 rounds, the same on every member"),
    ("beacon_group", "IPv4 multicast group for beacons"),
    ("beacon_port", "UDP port for beacons"),
    (
        "beacon_interface",
        "interface name or IPv4 address to beacon on",
    ),
    ("beacon_interval_ms", "milliseconds between beacons"),
    ("beacons", "discovery by multicast (true/false)"),
    ("peers", "static peers, host:port"),
    (
        "sse_keepalive_ms",
        "SSE keep-alive, the same on every member",
    ),
    ("dial_timeout_ms", "TCP connect and TLS handshake timeout"),
    (
        "peer_ttl_s",
        "seconds before a vanished peer leaves the table",
    ),
    (
        "http_threads",
        "requests routed at once (each connection has its own thread)",
    ),
    ("max_nodes", "most nodes this server owns"),
    ("log_level", "error, warn, info, debug or trace"),
];

/// Where a value came from, for error messages.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "in {}", p.display()),
            Source::Env(v) => write!(f, "in environment variable {v}"),
            Source::Flag(fl) => write!(f, "in flag {fl}"),
        }
    }
}

/// A raw value: typed from TOML, or text from a flag or the environment.
#[derive(Clone, Debug)]
pub enum Raw {
    Toml(toml::Value),
    Text(String),
}

/// A config problem: one line naming the key and where it was set.
#[derive(Debug, PartialEq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(key: &str, src: &Source, what: impl fmt::Display) -> ConfigError {
    ConfigError(format!("config key '{key}' {src}: {what}"))
}

fn shown(raw: &Raw) -> String {
    match raw {
        Raw::Toml(v) => v.to_string(),
        Raw::Text(s) => format!("{s:?}"),
    }
}

fn get_str(key: &str, raw: &Raw, src: &Source) -> Result<String, ConfigError> {
    match raw {
        Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => Ok(s.clone()),
        other => Err(err(
            key,
            src,
            format!("expected a string, got {}", shown(other)),
        )),
    }
}

fn get_int(key: &str, raw: &Raw, src: &Source, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n = match raw {
        Raw::Toml(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
        Raw::Text(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(err(
            key,
            src,
            format!(
                "expected an integer from {min} to {max}, got {}",
                shown(raw)
            ),
        )),
    }
}

fn get_bool(key: &str, raw: &Raw, src: &Source) -> Result<bool, ConfigError> {
    match raw {
        Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
        Raw::Text(s) if s == "true" => Ok(true),
        Raw::Text(s) if s == "false" => Ok(false),
        other => Err(err(
            key,
            src,
            format!("expected true or false, got {}", shown(other)),
        )),
    }
}

fn get_list(key: &str, raw: &Raw, src: &Source) -> Result<Vec<String>, ConfigError> {
    match raw {
        Raw::Toml(toml::Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(err(
                    key,
                    src,
                    format!("expected a list of strings, got an item {other}"),
                )),
            })
            .collect(),
        Raw::Text(s) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()),
        other => Err(err(
            key,
            src,
            format!("expected a list of strings, got {}", shown(other)),
        )),
    }
}

fn nonempty(key: &str, s: String, src: &Source, max: usize) -> Result<String, ConfigError> {
    if s.trim().is_empty() || s.chars().count() > max || s.chars().any(char::is_control) {
        return Err(err(
            key,
            src,
            format!("expected 1 to {max} printable characters, got {s:?}"),
        ));
    }
    Ok(s)
}

/// Checks a static peer address (`host:port`).
pub fn check_peer_addr(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} has no valid port")),
    }
}

impl Config {
    /// Sets one key from a raw value, validating it.
    pub fn set(&mut self, key: &str, raw: &Raw, src: &Source) -> Result<(), ConfigError> {
        let ms = |lo, hi| get_int(key, raw, src, lo, hi).map(Duration::from_millis);
        match key {
            "state_dir" => {
                self.state_dir = PathBuf::from(nonempty(key, get_str(key, raw, src)?, src, 4096)?)
            }
            "credentials_dir" => {
                self.credentials_dir =
                    PathBuf::from(nonempty(key, get_str(key, raw, src)?, src, 4096)?)
            }
            "bind" => {
                let s = get_str(key, raw, src)?;
                self.bind = s
                    .parse()
                    .map_err(|_| err(key, src, format!("expected an IP address, got {s:?}")))?
            }
            "port" => self.port = get_int(key, raw, src, 1, 65535)? as u16,
            "name" => self.name = nonempty(key, get_str(key, raw, src)?, src, 64)?,
            "cluster" => self.cluster = nonempty(key, get_str(key, raw, src)?, src, 64)?,
            "kdf_iterations" => {
                self.kdf_iterations = get_int(key, raw, src, 1, 100_000_000)? as u32
            }
            "beacon_group" => {
                let s = get_str(key, raw, src)?;
                match s.parse::<Ipv4Addr>() {
                    Ok(ip) if ip.is_multicast() => self.beacon_group = ip,
                    _ => {
                        return Err(err(
                            key,
                            src,
                            format!("expected an IPv4 multicast address (224.0.0.0/4), got {s:?}"),
                        ));
                    }
                }
            }
            "beacon_port" => self.beacon_port = get_int(key, raw, src, 1, 65535)? as u16,
            "beacon_interface" => {
                let s = get_str(key, raw, src)?;
                self.beacon_interface = if s.is_empty() {
                    None
                } else {
                    Some(nonempty(key, s, src, 64)?)
                }
            }
            "beacon_interval_ms" => self.timings.beacon_interval = ms(1000, 3_600_000)?,
            "beacons" => self.beacons = get_bool(key, raw, src)?,
            "peers" => {
                let list = get_list(key, raw, src)?;
                for p in &list {
                    check_peer_addr(p).map_err(|e| err(key, src, e))?;
                }
                self.peers = list;
            }
            "sse_keepalive_ms" => self.timings.sse_keepalive = ms(100, 60_000)?,
            "dial_timeout_ms" => self.timings.dial_timeout = ms(50, 60_000)?,
            "peer_ttl_s" => {
                self.timings.peer_ttl = Duration::from_secs(get_int(key, raw, src, 1, 30 * 86_400)?)
            }
            "http_threads" => self.http_threads = get_int(key, raw, src, 1, 64)? as usize,
            "max_nodes" => self.max_nodes = get_int(key, raw, src, 1, 1_000_000)? as usize,
            "log_level" => {
                let s = get_str(key, raw, src)?;
                self.log_level = parse_level(&s).ok_or_else(|| {
                    err(
                        key,
                        src,
                        format!("expected error, warn, info, debug or trace, got {s:?}"),
                    )
                })?
            }
            _ => return Err(ConfigError(format!("unknown config key '{key}' {src}"))),
        }
        Ok(())
    }

    /// Builds the config: defaults, then `env` (`KRILL_*`), then the file, then `flags`.
    /// A missing file is fine (every key has a default); an unreadable or broken one is not.
    pub fn load(
        file: &Path,
        env: &BTreeMap<String, String>,
        flags: &[(String, Raw, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config {
            file: file.to_path_buf(),
            ..Config::default()
        };
        for (key, _) in KEYS {
            let var = format!("KRILL_{}", key.to_ascii_uppercase());
            if let Some(v) = env.get(&var) {
                cfg.set(key, &Raw::Text(v.clone()), &Source::Env(var))?;
            }
        }
        match std::fs::read_to_string(file) {
            Ok(text) => cfg.apply_toml(&text, file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ConfigError(format!(
                    "cannot read config file {}: {e}",
                    file.display()
                )));
            }
        }
        for (key, raw, flag) in flags {
            cfg.set(key, raw, &Source::Flag(flag.clone()))?;
        }
        Ok(cfg)
    }

    fn apply_toml(&mut self, text: &str, file: &Path) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let msg = e.message().to_string();
            let at = e
                .span()
                .map(|s| format!(" at line {}", text[..s.start].lines().count().max(1)))
                .unwrap_or_default();
            ConfigError(format!(
                "config file {} is not valid TOML{at}: {msg}",
                file.display()
            ))
        })?;
        let src = Source::File(file.to_path_buf());
        for (key, value) in table {
            self.set(&key, &Raw::Toml(value), &src)?;
        }
        Ok(())
    }
}

pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "error" => log::LevelFilter::Error,
        "warn" | "warning" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("krill-cfg-{}.toml", crate::util::uuid_v4()));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let p = tmpfile(text);
        let r = Config::load(&p, &BTreeMap::new(), &[]);
        std::fs::remove_file(&p).unwrap();
        r
    }

    #[test]
    fn missing_and_empty_files_give_defaults() {
        let c = Config::load(Path::new("/nonexistent/krill.toml"), &BTreeMap::new(), &[]).unwrap();
        assert_eq!(c.port, 8442);
        assert_eq!(c.kdf_iterations, 600_000);
        assert_eq!(c.timings, Timings::default());
        let c = load_text("").unwrap();
        assert_eq!(c.beacon_port, 45317);
        assert!(c.beacons);
    }

    #[test]
    fn file_values_are_read() {
        let c = load_text(
            "port = 9000\nbeacons = false\npeers = [\"10.0.0.1:8442\"]\nbeacon_interval_ms = 2000\nlog_level = \"debug\"\n",
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert!(!c.beacons);
        assert_eq!(c.peers, vec!["10.0.0.1:8442"]);
        assert_eq!(c.timings.beacon_interval, Duration::from_secs(2));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let e = load_text("prot = 1\n").unwrap_err().0;
        assert!(e.contains("unknown config key 'prot'"), "{e}");
        assert!(e.contains("krill-cfg-"), "{e}");
    }

    #[test]
    fn wrong_type_and_range_name_key() {
        let e = load_text("port = \"high\"\n").unwrap_err().0;
        assert!(
            e.contains("'port'") && e.contains("integer from 1 to 65535"),
            "{e}"
        );
        let e = load_text("port = 70000\n").unwrap_err().0;
        assert!(e.contains("'port'"), "{e}");
        let e = load_text("beacons = 1\n").unwrap_err().0;
        assert!(
            e.contains("'beacons'") && e.contains("true or false"),
            "{e}"
        );
        let e = load_text("beacon_group = \"10.0.0.1\"\n").unwrap_err().0;
        assert!(e.contains("multicast"), "{e}");
        let e = load_text("peers = [\"nohost\"]\n").unwrap_err().0;
        assert!(e.contains("'peers'") && e.contains("host:port"), "{e}");
        let e = load_text("log_level = \"loud\"\n").unwrap_err().0;
        assert!(e.contains("'log_level'"), "{e}");
    }

    #[test]
    fn broken_toml_is_one_line_with_file() {
        let e = load_text("port = = 3\n").unwrap_err().0;
        assert!(e.contains("not valid TOML at line 1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn precedence_flag_over_file_over_env() {
        let p = tmpfile("port = 9001\n");
        let mut env = BTreeMap::new();
        env.insert("KRILL_PORT".to_string(), "9002".to_string());
        env.insert("KRILL_CLUSTER".to_string(), "lab".to_string());
        env.insert("KRILL_PEERS".to_string(), "a:1, b:2".to_string());
        let c = Config::load(&p, &env, &[]).unwrap();
        assert_eq!(c.port, 9001, "file beats environment");
        assert_eq!(c.cluster, "lab", "environment beats default");
        assert_eq!(c.peers, vec!["a:1", "b:2"]);
        let flags = vec![(
            "port".to_string(),
            Raw::Text("9003".into()),
            "--port".to_string(),
        )];
        let c = Config::load(&p, &env, &flags).unwrap();
        assert_eq!(c.port, 9003, "flag beats file");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn env_and_flag_errors_name_their_source() {
        let mut env = BTreeMap::new();
        env.insert("KRILL_BEACONS".to_string(), "yes".to_string());
        let e = Config::load(Path::new("/nonexistent"), &env, &[])
            .unwrap_err()
            .0;
        assert!(e.contains("KRILL_BEACONS"), "{e}");
        let flags = vec![(
            "port".to_string(),
            Raw::Text("0".into()),
            "--port".to_string(),
        )];
        let e = Config::load(Path::new("/nonexistent"), &BTreeMap::new(), &flags)
            .unwrap_err()
            .0;
        assert!(e.contains("flag --port"), "{e}");
    }

    #[test]
    fn dead_after_is_two_and_a_half_keepalives() {
        assert_eq!(
            Timings::default().sse_dead_after(),
            Duration::from_millis(2500)
        );
    }
}
