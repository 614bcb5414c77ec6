//! Beacons (PROTOCOL §3): the wire format, the field-binding rolling token, the
//! clock-independent replay guard (all pure), and the thin socket shell: a receiver
//! thread that forwards accepted beacons to the state owner, and a sender the state
//! owner drives from its timers.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use crate::credentials::hmac_sha256;
use crate::proto;
use crate::state::{Counters, Event, SharedKeys};
use crate::util::{self, hex};

pub const STATE_UP: &str = "up";
pub const STATE_LEAVING: &str = "leaving";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Beacon {
    pub v: u64,
    pub timestamp: u64,
    pub install_id: String,
    pub session_id: String,
    pub host: String,
    pub port: u16,
    pub name: String,
    pub platform: String,
    pub state: String,
    pub cluster_token: String,
}

/// `clusterToken`: first 8 bytes of HMAC(beacon_key, step || every field), hex.
pub fn token(beacon_key: &[u8], b: &Beacon) -> String {
    let step = (b.timestamp / proto::TOKEN_STEP_MS).to_be_bytes();
    let text = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
        b.v, b.install_id, b.session_id, b.host, b.port, b.name, b.platform, b.state, b.timestamp
    );
    let mac = hmac_sha256(beacon_key, &[&step, text.as_bytes()]);
    hex(&mac[..proto::TOKEN_BYTES])
}

impl Beacon {
    /// A signed beacon for this server, stamped with the current time.
    pub fn new_signed(beacon_key: &[u8], me: &Me, state: &str) -> Beacon {
        let mut b = Beacon {
            v: proto::PROTOCOL_VERSION,
            timestamp: util::now_ms(),
            install_id: me.install_id.clone(),
            session_id: me.session_id.clone(),
            host: me.host.clone(),
            port: me.port,
            name: me.name.clone(),
            platform: proto::PLATFORM.to_string(),
            state: state.to_string(),
            cluster_token: String::new(),
        };
        b.cluster_token = token(beacon_key, &b);
        b
    }

    pub fn leaving(&self) -> bool {
        self.state == STATE_LEAVING
    }
}

/// What this server says about itself in beacons.
#[derive(Clone, Debug)]
pub struct Me {
    pub install_id: String,
    pub session_id: String,
    pub host: String,
    pub name: String,
    pub port: u16,
}

/// Parses one datagram; `Err` says why it was dropped (logged at debug).
pub fn parse(data: &[u8]) -> Result<Beacon, String> {
    if data.len() > proto::MAX_BEACON_BYTES {
        return Err(format!("{} bytes, over the limit", data.len()));
    }
    let b: Beacon = serde_json::from_slice(data).map_err(|e| format!("not a beacon: {e}"))?;
    if b.v != proto::PROTOCOL_VERSION {
        return Err(format!("protocol version {}", b.v));
    }
    if !util::is_uuid(&b.install_id) || !util::is_uuid(&b.session_id) {
        return Err("installId or sessionId is not a UUID".into());
    }
    if b.state != STATE_UP && b.state != STATE_LEAVING {
        return Err(format!("unknown state {:?}", b.state));
    }
    if b.port == 0 || b.cluster_token.len() != 2 * proto::TOKEN_BYTES {
        return Err("bad port or token".into());
    }
    Ok(b)
}

/// True when the token is right for this key (constant-time compare).
pub fn verify(beacon_key: &[u8], b: &Beacon) -> bool {
    util::ct_eq(token(beacon_key, b).as_bytes(), b.cluster_token.as_bytes())
}

/// How an accepted beacon relates to what we knew of its sender.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Freshness {
    /// First beacon ever seen from this installId.
    First,
    /// A new session (the peer restarted).
    NewSession,
    /// A later beacon of the session we know.
    Same,
}

#[derive(Debug, Default)]
struct PeerReplay {
    session: String,
    last_ts: u64,
    superseded: VecDeque<String>,
}

/// Replay rules, per installId, that do not need clocks to agree: within a session
/// timestamps must rise; a new session is accepted unless already superseded (the
/// last few are kept); `leaving` counts only for the current session.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    peers: HashMap<String, PeerReplay>,
}

impl ReplayGuard {
    pub fn check(&mut self, b: &Beacon) -> Result<Freshness, &'static str> {
        let Some(p) = self.peers.get_mut(&b.install_id) else {
            // A first beacon may be a goodbye from a peer we only know through its
            // connection: the state owner accepts it only for the session the peer's
            // /health reported.
            if self.peers.len() >= proto::MAX_PEERS {
                return Err("peer table full");
            }
            self.peers.insert(
                b.install_id.clone(),
                PeerReplay {
                    session: b.session_id.clone(),
                    last_ts: b.timestamp,
                    superseded: VecDeque::new(),
                },
            );
            return Ok(Freshness::First);
        };
        if b.session_id == p.session {
            if b.timestamp <= p.last_ts {
                return Err("replayed or reordered beacon (timestamp not rising)");
            }
            p.last_ts = b.timestamp;
            return Ok(Freshness::Same);
        }
        if b.leaving() {
            return Err("leaving beacon for a session that is not current");
        }
        if p.superseded.contains(&b.session_id) {
            return Err("beacon of a superseded session");
        }
        let old = std::mem::replace(&mut p.session, b.session_id.clone());
        p.superseded.push_back(old);
        while p.superseded.len() > proto::SUPERSEDED_SESSIONS_KEPT {
            p.superseded.pop_front();
        }
        p.last_ts = b.timestamp;
        Ok(Freshness::NewSession)
    }

    /// Forgets a peer (it left the peer table).
    pub fn forget(&mut self, install_id: &str) {
        self.peers.remove(install_id);
    }
}

/// Opens the shared beacon port (`SO_REUSEADDR` + `SO_REUSEPORT`, so several servers
/// and tools on one host can listen), with multicast TTL 1 and loop on.
pub fn open_socket(port: u16) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_multicast_ttl_v4(proto::BEACON_TTL)?;
    s.set_multicast_loop_v4(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    Ok(s.into())
}

/// The receiver thread: parse, authenticate, replay-check, forward.
pub fn spawn_receiver(
    sock: UdpSocket,
    own_install_id: String,
    keys: SharedKeys,
    counters: Arc<Counters>,
    tx: Sender<Event>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("beacon-rx".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut guard = ReplayGuard::default();
            let mut skew_warned: HashMap<String, Instant> = HashMap::new();
            let mut buf = vec![0u8; proto::MAX_BEACON_BYTES + 1];
            loop {
                let (n, from) = match sock.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("beacon socket receive failed: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                let reject = |why: &str| {
                    counters.inc(&counters.beacons_rejected);
                    log::debug!("dropped beacon from {from}: {why}");
                };
                let b = match parse(&buf[..n]) {
                    Ok(b) => b,
                    Err(e) => {
                        reject(&e);
                        continue;
                    }
                };
                if b.install_id == own_install_id {
                    continue;
                }
                let Some(k) = keys.read().clone() else {
                    reject("no cluster PIN set");
                    continue;
                };
                if !verify(&k.beacon_key, &b) {
                    reject("bad cluster token (another PIN, or forged)");
                    continue;
                }
                let fresh = match guard.check(&b) {
                    Ok(f) => f,
                    Err(e) => {
                        reject(e);
                        continue;
                    }
                };
                counters.inc(&counters.beacons_received);
                let skew = b.timestamp.abs_diff(util::now_ms());
                if skew > proto::CLOCK_SKEW_WARN_MS
                    && skew_warned
                        .get(&b.install_id)
                        .is_none_or(|t| t.elapsed() > proto::CLOCK_SKEW_WARN_EVERY)
                {
                    skew_warned.insert(b.install_id.clone(), Instant::now());
                    log::warn!(
                        "peer {} ({}, {}) clock differs from ours by {} s (no time server?)",
                        b.name,
                        util::short(&b.install_id),
                        from.ip(),
                        skew / 1000
                    );
                }
                if tx
                    .send(Event::Beacon {
                        beacon: Box::new(b),
                        from: from.ip(),
                        fresh,
                    })
                    .is_err()
                {
                    return;
                }
            }
        })
        .map(|_| ())
}

/// Sends beacons for the state owner: follows the interface, keeps the rate limit.
pub struct BeaconSender {
    send: UdpSocket,
    /// The receiving socket, for group membership on the current interface.
    recv: UdpSocket,
    group: Ipv4Addr,
    port: u16,
    iface: Option<String>,
    current: Option<Ipv4Addr>,
    last_sent: Option<Instant>,
    complained: bool,
}

impl BeaconSender {
    pub fn new(
        recv: &UdpSocket,
        group: Ipv4Addr,
        port: u16,
        iface: Option<String>,
    ) -> io::Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_multicast_ttl_v4(proto::BEACON_TTL)?;
        s.set_multicast_loop_v4(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())?;
        let mut me = BeaconSender {
            send: s.into(),
            recv: recv.try_clone()?,
            group,
            port,
            iface,
            current: None,
            last_sent: None,
            complained: false,
        };
        me.refresh_interface();
        Ok(me)
    }

    /// Looks the interface up again (called every interval) and follows a change.
    pub fn refresh_interface(&mut self) {
        let found = match &self.iface {
            Some(i) => i.parse::<Ipv4Addr>().ok().or_else(|| iface_addr(i)),
            None => route_iface(self.group).and_then(|n| iface_addr(&n)),
        };
        if found.is_some() && found == self.current {
            return;
        }
        if let Some(old) = self.current.take() {
            let _ = self.recv.leave_multicast_v4(&self.group, &old);
        }
        let Some(addr) = found else {
            if !self.complained {
                log::warn!(
                    "no network interface for beacons ({}); will keep looking",
                    self.iface.as_deref().unwrap_or("no route to the group")
                );
                self.complained = true;
            }
            return;
        };
        let sock = socket2::SockRef::from(&self.send);
        if let Err(e) = sock.set_multicast_if_v4(&addr) {
            log::warn!("cannot beacon on {addr}: {e}");
            return;
        }
        if let Err(e) = self.recv.join_multicast_v4(&self.group, &addr) {
            log::warn!("cannot join {} on {addr}: {e}", self.group);
            return;
        }
        log::info!("beaconing on {addr} to {}:{}", self.group, self.port);
        self.current = Some(addr);
        self.complained = false;
    }

    /// Whether an interface to beacon on was found.
    pub fn has_interface(&self) -> bool {
        self.current.is_some()
    }

    /// When the next beacon may go out under the one-per-second limit.
    pub fn allowed_at(&self) -> Instant {
        self.last_sent
            .map(|t| t + proto::MIN_BEACON_GAP)
            .unwrap_or_else(Instant::now)
    }

    /// Sends `b`; `exempt` skips the rate limit (the `leaving` beacon).
    /// `Ok(false)` = rate limited or no interface, try later.
    pub fn send(&mut self, b: &Beacon, exempt: bool) -> io::Result<bool> {
        let limited = self
            .last_sent
            .is_some_and(|t| t.elapsed() < proto::MIN_BEACON_GAP);
        if limited && !exempt {
            return Ok(false);
        }
        if self.current.is_none() {
            return Ok(false);
        }
        let data = serde_json::to_vec(b).map_err(io::Error::other)?;
        if data.len() > proto::MAX_BEACON_BYTES {
            return Err(io::Error::other(format!(
                "beacon is {} bytes, over {} (name or host too long)",
                data.len(),
                proto::MAX_BEACON_BYTES
            )));
        }
        let to = SocketAddr::V4(SocketAddrV4::new(self.group, self.port));
        self.send.send_to(&data, to)?;
        self.last_sent = Some(Instant::now());
        Ok(true)
    }
}

/// IPv4 address of a named interface.
pub fn iface_addr(name: &str) -> Option<Ipv4Addr> {
    ipv4_addrs()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a)
}

/// Every (interface, IPv4 address) of this host.
pub fn ipv4_addrs() -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; fields are valid or null.
        unsafe {
            let ifa = &*p;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                out.push((name, addr));
            }
            p = ifa.ifa_next;
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The interface of the best route to `dest` in `/proc/net/route` (the default
/// route counts, with prefix 0).
pub fn route_iface(dest: Ipv4Addr) -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    best_route(&text, dest)
}

/// Longest-prefix match over the text of `/proc/net/route`.
pub fn best_route(table: &str, dest: Ipv4Addr) -> Option<String> {
    let d = u32::from(dest);
    let mut best: Option<(u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // The kernel prints each address as a host-order u32 of network-order bytes.
        let parse = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
        };
        let (Some(net), Some(mask)) = (parse(f[1]), parse(f[7])) else {
            continue;
        };
        let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
        if flags & 1 == 0 || d & mask != net & mask {
            continue;
        }
        if best.as_ref().is_none_or(|(m, _)| mask.count_ones() > *m) {
            best = Some((mask.count_ones(), f[0].to_string()));
        }
    }
    best.map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "fef44873d3c7c97893ffcd5420ee6f560c4bcf23066ddf6631dc95a24d72cad7";

    fn sample() -> Beacon {
        Beacon {
            v: 1,
            timestamp: 1_764_000_000_123,
            install_id: "11111111-2222-4333-8444-555555555555".into(),
            session_id: "66666666-7777-4888-9999-aaaaaaaaaaaa".into(),
            host: "pi-kitchen".into(),
            port: 8442,
            name: "pi-kitchen".into(),
            platform: "LINUX".into(),
            state: "up".into(),
            cluster_token: String::new(),
        }
    }

    fn key() -> Vec<u8> {
        util::unhex(KEY).unwrap()
    }

    fn signed(f: impl FnOnce(&mut Beacon)) -> Beacon {
        let mut b = sample();
        f(&mut b);
        b.cluster_token = token(&key(), &b);
        b
    }

    #[test]
    fn token_known_answer() {
        // Computed independently with Python's hmac/hashlib from PROTOCOL §3.
        assert_eq!(token(&key(), &sample()), "aedd9fdbaf40a99b");
    }

    #[test]
    fn token_binds_every_field_and_rolls() {
        let base = token(&key(), &sample());
        type Change = Box<dyn Fn(&mut Beacon)>;
        let changes: Vec<Change> = vec![
            Box::new(|b| b.host = "evil".into()),
            Box::new(|b| b.port = 8443),
            Box::new(|b| b.name = "x".into()),
            Box::new(|b| b.state = "leaving".into()),
            Box::new(|b| b.platform = "MAC".into()),
            Box::new(|b| b.session_id = "66666666-7777-4888-9999-aaaaaaaaaaab".into()),
            Box::new(|b| b.install_id = "11111111-2222-4333-8444-555555555556".into()),
            Box::new(|b| b.timestamp += 1),
        ];
        for c in changes {
            let mut b = sample();
            c(&mut b);
            assert_ne!(token(&key(), &b), base);
        }
        let mut other_key = key();
        other_key[0] ^= 1;
        assert_ne!(token(&other_key, &sample()), base);
    }

    #[test]
    fn parse_and_verify_round_trip() {
        let b = signed(|_| {});
        let wire = serde_json::to_vec(&b).unwrap();
        let text = String::from_utf8(wire.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"v":1,"timestamp":1764000000123,"installId":"#),
            "{text}"
        );
        let back = parse(&wire).unwrap();
        assert_eq!(back, b);
        assert!(verify(&key(), &back));
        let mut forged = back.clone();
        forged.port = 1;
        assert!(!verify(&key(), &forged));
    }

    #[test]
    fn parse_drops_bad_datagrams() {
        let good = serde_json::to_value(signed(|_| {})).unwrap();
        let with = |k: &str, v: serde_json::Value| {
            let mut o = good.clone();
            o[k] = v;
            serde_json::to_vec(&o).unwrap()
        };
        assert!(parse(b"not json").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(&vec![b' '; 1025]).is_err());
        assert!(parse(&with("v", 2.into())).is_err());
        assert!(parse(&with("state", "down".into())).is_err());
        assert!(parse(&with("port", 70000.into())).is_err());
        assert!(parse(&with("installId", "x".into())).is_err());
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("name");
        assert!(parse(&serde_json::to_vec(&missing).unwrap()).is_err());
        // Unknown fields are ignored.
        assert!(parse(&with("extra", "field".into())).is_ok());
    }

    #[test]
    fn replay_rules_need_no_clock() {
        let mut g = ReplayGuard::default();
        let b1 = signed(|_| {});
        assert_eq!(g.check(&b1), Ok(Freshness::First));
        assert!(g.check(&b1).is_err(), "exact replay");
        let b2 = signed(|b| b.timestamp += 5000);
        assert_eq!(g.check(&b2), Ok(Freshness::Same));
        assert!(g.check(&b1).is_err(), "older beacon of the same session");
        // A restart with a clock far in the past is still accepted.
        let s2 = "66666666-7777-4888-9999-bbbbbbbbbbbb";
        let r = signed(|b| {
            b.session_id = s2.into();
            b.timestamp = 1000;
        });
        assert_eq!(g.check(&r), Ok(Freshness::NewSession));
        // The old session is superseded now, even with a later timestamp.
        let old = signed(|b| b.timestamp += 999_999);
        assert!(g.check(&old).is_err());
        // Leaving counts only for the current session.
        let leave_old = signed(|b| {
            b.state = "leaving".into();
            b.timestamp += 1_000_000;
        });
        assert!(g.check(&leave_old).is_err());
        let leave = signed(|b| {
            b.session_id = s2.into();
            b.timestamp = 2000;
            b.state = "leaving".into();
        });
        assert_eq!(g.check(&leave), Ok(Freshness::Same));
    }

    #[test]
    fn superseded_sessions_are_bounded() {
        let mut g = ReplayGuard::default();
        let sess = |i: u32| format!("66666666-7777-4888-9999-{i:012}");
        for i in 0..20 {
            let b = signed(|b| b.session_id = sess(i));
            assert!(g.check(&b).is_ok());
        }
        assert!(g.check(&signed(|b| b.session_id = sess(15))).is_err());
        // Sessions older than the last 8 are forgotten (bounded memory).
        assert!(g.check(&signed(|b| b.session_id = sess(2))).is_ok());
    }

    #[test]
    fn first_beacon_may_be_a_goodbye_but_not_twice() {
        let mut g = ReplayGuard::default();
        let leave = signed(|b| b.state = "leaving".into());
        assert_eq!(g.check(&leave), Ok(Freshness::First));
        assert!(g.check(&leave).is_err(), "replayed");
    }

    #[test]
    fn route_lookup_prefers_longest_prefix() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
wlan0\t000000E0\t00000000\t0001\t0\t0\t0\t000000F0\t0\t0\t0\n";
        assert_eq!(
            best_route(table, "239.255.0.69".parse().unwrap()).as_deref(),
            Some("wlan0")
        );
        assert_eq!(
            best_route(table, "192.168.1.7".parse().unwrap()).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            best_route(table, "8.8.8.8".parse().unwrap()).as_deref(),
            Some("eth0")
        );
        assert_eq!(best_route("Iface\n", "8.8.8.8".parse().unwrap()), None);
    }
}
