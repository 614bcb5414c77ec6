//! The per-peer thread: trust (`/trust`, proof, pin), health (`/health` with the
//! bearer), then a blocking read of the peer's `/sse` with a read timeout of 2.5
//! keep-alives. Every outcome is reported to the state owner; on failure it backs
//! off (jittered exponential) until told to dial now or to stop. It never touches
//! shared state. The health rule and the backoff schedule are plain functions.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Deserialize;

use crate::config::Timings;
use crate::node::Node;
use crate::proto;
use crate::sse;
use crate::state::{Counters, Event, PeerReport, SharedKeys};
use crate::tls::{self, Verifier};
use crate::util::{self, short};

/// Stack for threads that exist per peer: a Pi with 1 GB holds hundreds.
pub const PEER_STACK: usize = 512 * 1024;

/// Most bytes read from `/trust` or `/health`.
const SMALL_BODY_LIMIT: u64 = 64 * 1024;

/// What the state owner tells a peer thread.
#[derive(Debug)]
pub enum PeerCtl {
    /// Dial this address now (a fresh beacon; resets the backoff).
    DialNow {
        address: IpAddr,
        port: u16,
    },
    Stop,
}

/// What a peer thread needs, shared by all of them.
#[derive(Clone)]
pub struct PeerCtx {
    /// Who we are, for `X-Krill-Peer`.
    pub me_install_id: String,
    pub me_port: u16,
    pub state_dir: PathBuf,
    pub keys: SharedKeys,
    pub timings: Timings,
    pub tx: Sender<Event>,
    pub counters: Arc<Counters>,
}

/// A peer's `/health` as we read it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub install_id: String,
    pub session_id: String,
    pub name: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub platform: String,
    #[serde(default)]
    pub observed_address: Option<String>,
}

/// PROTOCOL §7: healthy = connected, or (answered within 5 min and success rate over
/// 50 %), or fewer than 5 attempts so far.
pub fn healthy(
    connected: bool,
    since_success: Option<Duration>,
    successes: u64,
    failures: u64,
) -> bool {
    connected
        || (since_success.is_some_and(|d| d < proto::HEALTHY_RECENT) && successes > failures)
        || successes + failures < proto::HEALTHY_MIN_ATTEMPTS
}

/// Reconnect delays: `min`, `2 min`, `4 min` ... capped at `max`, each jittered
/// by ±20 % (never past `max`) so a cluster that lost a peer does not redial in step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    /// The un-jittered delay of the next attempt.
    pub fn base(&self) -> Duration {
        self.min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = util::jitter(self.base(), 0.2).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

enum End {
    Stop,
    Failed { reason: String, was_connected: bool },
}

fn failed(reason: impl Into<String>) -> End {
    End::Failed {
        reason: reason.into(),
        was_connected: false,
    }
}

/// Starts the thread for one peer; it dials at once.
pub fn spawn(
    ctx: PeerCtx,
    install_id: String,
    name: String,
    generation: u64,
    address: IpAddr,
    port: u16,
) -> std::io::Result<Sender<PeerCtl>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name(format!("peer-{}", short(&install_id)))
        .stack_size(PEER_STACK)
        .spawn(move || {
            let mut t = PeerThread {
                ctx,
                install_id,
                name,
                generation,
                target: SocketAddr::new(address, port),
                last_event_id: None,
                last_trust_error: None,
                rx,
            };
            t.run();
        })?;
    Ok(tx)
}

struct PeerThread {
    ctx: PeerCtx,
    install_id: String,
    /// The name it had when the thread started, for log lines.
    name: String,
    generation: u64,
    target: SocketAddr,
    /// `id:` of the last event read, for `Last-Event-ID` on reconnect.
    last_event_id: Option<String>,
    last_trust_error: Option<String>,
    rx: Receiver<PeerCtl>,
}

impl PeerThread {
    fn report(&self, report: PeerReport) -> bool {
        self.ctx
            .tx
            .send(Event::Peer {
                install_id: self.install_id.clone(),
                generation: self.generation,
                report: Box::new(report),
            })
            .is_ok()
    }

    fn run(&mut self) {
        let t = &self.ctx.timings;
        let mut backoff = Backoff::new(t.backoff_min, t.backoff_max);
        let mut wait = Duration::ZERO;
        loop {
            match self.rx.recv_timeout(wait) {
                Ok(PeerCtl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(PeerCtl::DialNow { address, port }) => {
                    self.target = SocketAddr::new(address, port);
                    backoff.reset();
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !self.report(PeerReport::Dialing) {
                return;
            }
            match self.session() {
                End::Stop => return,
                End::Failed {
                    reason,
                    was_connected,
                } => {
                    if !self.report(PeerReport::Failed {
                        reason,
                        was_connected,
                    }) {
                        return;
                    }
                    if was_connected {
                        backoff.reset();
                    }
                    wait = backoff.next_delay();
                }
            }
        }
    }

    /// `name (id prefix, address)`, as the state owner's log lines name peers.
    fn label(&self) -> String {
        format!(
            "{} ({}, {})",
            self.name,
            short(&self.install_id),
            self.target
        )
    }

    fn trust_error(&mut self, msg: String) -> End {
        if self.last_trust_error.as_deref() != Some(msg.as_str()) {
            log::error!("trust failed for peer {}: {msg}", self.label());
            self.last_trust_error = Some(msg.clone());
        }
        failed(format!("trust: {msg}"))
    }

    /// Fetches `/trust` over `agent` (whose verifier pins the first certificate it
    /// sees), checks it names the server that beaconed, and pins it on disk.
    fn trust(
        &mut self,
        agent: &ureq::Agent,
        verifier: &Verifier,
        trust_key: &[u8],
    ) -> Result<(), End> {
        let url = format!("https://{}/trust", self.target);
        let body = get(agent, &url, &[])
            .and_then(|(_, r)| read_small(r))
            .map_err(failed)?;
        let t = match check_trust(&body, verifier, trust_key) {
            Ok(t) => t,
            Err(TrustError::Bad(msg)) => return Err(failed(msg)),
            Err(TrustError::Refused(msg)) => return Err(self.trust_error(msg)),
        };
        if t.install_id != self.install_id {
            return Err(self.trust_error(format!(
                "it answers as {}, not the server we know at this address",
                short(&t.install_id)
            )));
        }
        let dir = &self.ctx.state_dir;
        match tls::load_pin(dir, &self.install_id) {
            Some(p) if p == t.der => {}
            old => {
                if old.is_some() {
                    log::warn!(
                        "peer {} presents a new certificate with a valid proof (reinstalled?); pinned the new one",
                        self.label()
                    );
                } else {
                    log::info!("pinned the certificate of peer {}", self.label());
                }
                if let Err(e) = tls::save_pin(dir, &self.install_id, &t.cert_pem) {
                    log::error!("{e}");
                }
            }
        }
        self.last_trust_error = None;
        Ok(())
    }

    /// Our identity for the peer (`X-Krill-Peer`), so it can dial us back at once.
    fn whoami(&self) -> (&'static str, String) {
        (
            PEER_HEADER,
            format!("{} {}", self.ctx.me_install_id, self.ctx.me_port),
        )
    }

    /// Reads the peer's `/network/peers` and reports it (peer exchange).
    fn exchange(&self, agent: &ureq::Agent, bearer: &str) {
        let url = format!("https://{}/network/peers", self.target);
        let auth = format!("Bearer {bearer}");
        // A second connection (the first carries the stream): closed after the answer,
        // so it does not hold a server thread until its idle timeout.
        let close = ("Connection", "close".to_string());
        let r = get(
            agent,
            &url,
            &[("Authorization", auth), self.whoami(), close],
        )
        .and_then(|(_, r)| read_small_limited(r, EXCHANGE_BODY_LIMIT))
        .and_then(|b| {
            serde_json::from_str::<Exchange>(&b).map_err(|e| format!("bad /network/peers: {e}"))
        });
        match r {
            Ok(x) => {
                let _ = self.report(PeerReport::Exchange(x.peers));
            }
            Err(e) => log::debug!("peer exchange with {} failed: {e}", self.label()),
        }
    }

    fn session(&mut self) -> End {
        let Some(keys) = self.ctx.keys.read().clone() else {
            return failed("no cluster PIN set");
        };
        // One client for the whole session: /trust, /health and /sse share one
        // kept-alive connection (one TCP and TLS handshake per attempt, which
        // matters on lossy Wi-Fi), and any new connection must present the
        // certificate /trust proved.
        let t = self.ctx.timings.clone();
        let verifier = Verifier::first_seen();
        let agent = tls::agent(verifier.clone(), t.dial_timeout, t.sse_dead_after());
        if let Err(e) = self.trust(&agent, &verifier, &keys.trust_key) {
            return e;
        }
        let base = format!("https://{}", self.target);
        let auth = format!("Bearer {}", keys.bearer);
        let health = match get(
            &agent,
            &format!("{base}/health"),
            &[("Authorization", auth.clone()), self.whoami()],
        )
        .and_then(|(_, r)| read_small(r))
        .and_then(|b| serde_json::from_str::<Health>(&b).map_err(|e| format!("bad /health: {e}")))
        {
            Ok(h) => h,
            Err(e) => return failed(e),
        };
        if health.install_id != self.install_id {
            return failed(format!("/health names {}", short(&health.install_id)));
        }
        let mut headers = vec![("Authorization", auth), self.whoami()];
        if let Some(id) = self
            .last_event_id
            .as_deref()
            .filter(|id| sse::parse_event_id(id).is_some_and(|(s, _)| s == health.session_id))
        {
            headers.push(("Last-Event-ID", id.to_string()));
        }
        let resp = match get(&agent, &format!("{base}/sse"), &headers) {
            Ok((200, r)) => r,
            Ok((status, _)) => return failed(format!("/sse answered {status}")),
            Err(e) => return failed(e),
        };
        if !self.report(PeerReport::Connected(health)) {
            return End::Stop;
        }
        // Peer exchange: on connect, then every few minutes (on a second connection
        // of the same client, so the stream keeps flowing).
        self.exchange(&agent, &keys.bearer);
        // The handshakes and the exchange are the deepest this thread goes; the
        // reading loop below needs a fraction of that stack.
        util::release_stack();
        let mut next_exchange = Instant::now() + t.peer_exchange_interval;
        let mut reader = sse::Reader::new(resp.into_reader());
        let mut counted = 0;
        loop {
            let ev = reader.next_event();
            self.ctx
                .counters
                .add(&self.ctx.counters.data_received, reader.bytes - counted);
            counted = reader.bytes;
            // Between events: a stop, or a move to a new address, ends the stream.
            while let Ok(ctl) = self.rx.try_recv() {
                match ctl {
                    PeerCtl::Stop => return End::Stop,
                    PeerCtl::DialNow { address, port } => {
                        let to = SocketAddr::new(address, port);
                        if to != self.target {
                            self.target = to;
                            return End::Failed {
                                reason: format!("moved to {to}"),
                                was_connected: true,
                            };
                        }
                    }
                }
            }
            let lost = |reason: String| End::Failed {
                reason,
                was_connected: true,
            };
            let ev = match ev {
                Ok(Some(ev)) => ev,
                Ok(None) => return lost("stream closed".into()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return lost(format!("silent for {} ms", t.sse_dead_after().as_millis()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return lost("connection closed".into());
                }
                Err(e) => return lost(format!("stream error: {e}")),
            };
            if Instant::now() >= next_exchange {
                self.exchange(&agent, &keys.bearer);
                util::release_stack();
                next_exchange = Instant::now() + t.peer_exchange_interval;
            }
            let report = match ev.event.as_str() {
                "snapshot" => {
                    #[derive(Deserialize)]
                    struct Snap {
                        nodes: Vec<Node>,
                    }
                    serde_json::from_str::<Snap>(&ev.data).map(|s| PeerReport::Snapshot(s.nodes))
                }
                "node" => serde_json::from_str::<Node>(&ev.data).map(PeerReport::Node),
                "delete" => {
                    #[derive(Deserialize)]
                    struct Del {
                        id: String,
                    }
                    serde_json::from_str::<Del>(&ev.data).map(|d| PeerReport::Delete(d.id))
                }
                _ => continue,
            };
            if ev.id.is_some() {
                self.last_event_id = ev.id;
            }
            match report {
                Ok(r) => {
                    if !self.report(r) {
                        return End::Stop;
                    }
                }
                Err(e) => log::debug!("peer {}: bad {} event: {e}", self.label(), ev.event),
            }
        }
    }
}

/// The header a peer thread sends on its authenticated requests: `<installId> <port>`.
/// The receiver dials the sender back at the request's source address at once, as
/// for a fresh beacon: the way across routers, and for servers without beacons.
pub const PEER_HEADER: &str = "X-Krill-Peer";

/// Most bytes read from a peer's `/network/peers` (256 peers fit easily).
const EXCHANGE_BODY_LIMIT: u64 = 1024 * 1024;

/// One row of a peer's `/network/peers`, as far as peer exchange needs it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeEntry {
    pub install_id: String,
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: String,
}

#[derive(Deserialize)]
struct Exchange {
    peers: Vec<ExchangeEntry>,
}

/// Parses `X-Krill-Peer: <installId> <port>`.
pub fn parse_peer_header(v: &str) -> Option<(String, u16)> {
    let (id, port) = v.trim().split_once(' ')?;
    let port: u16 = port.trim().parse().ok().filter(|p| *p > 0)?;
    util::is_uuid(id).then(|| (id.to_ascii_lowercase(), port))
}

/// A `/trust` answer that checked out.
pub struct Trusted {
    pub install_id: String,
    pub cert_pem: String,
    pub der: Vec<u8>,
}

pub enum TrustError {
    /// Not a usable answer (not JSON, ...): an ordinary failed dial.
    Bad(String),
    /// A well-formed answer that must not be trusted: logged at error.
    Refused(String),
}

/// Checks a `/trust` body: it names the certificate `verifier` saw in the handshake,
/// and its proof is right for `trust_key`.
pub fn check_trust(
    body: &str,
    verifier: &Verifier,
    trust_key: &[u8],
) -> Result<Trusted, TrustError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct TrustBody {
        install_id: String,
        cert_pem: String,
        proof: String,
    }
    let tb: TrustBody = serde_json::from_str(body)
        .map_err(|e| TrustError::Bad(format!("/trust answer is not valid: {e}")))?;
    let der = tls::pem_to_der(&tb.cert_pem)
        .ok_or_else(|| TrustError::Refused("certPem holds no certificate".into()))?;
    if verifier.seen().as_deref() != Some(der.as_slice()) {
        return Err(TrustError::Refused(
            "certPem is not the certificate presented in the handshake".into(),
        ));
    }
    if !tls::check_proof(trust_key, &tb.install_id, &der, &tb.proof) {
        return Err(TrustError::Refused(
            "bad proof (another cluster PIN, or an impostor)".into(),
        ));
    }
    Ok(Trusted {
        install_id: tb.install_id.to_ascii_lowercase(),
        cert_pem: tb.cert_pem,
        der,
    })
}

/// Identifies a static peer (`host:port`): resolves it and checks its `/trust`.
/// Runs on a worker (DNS and TLS block). Returns its installId and address.
pub fn probe(spec: &str, trust_key: &[u8], dial: Duration) -> Result<(String, SocketAddr), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = spec
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {spec}: {e}"))?
        .collect();
    let mut last = format!("{spec} resolves to no address");
    for addr in addrs {
        let verifier = Verifier::first_seen();
        let agent = tls::agent(verifier.clone(), dial, dial.max(Duration::from_secs(3)));
        let body = match get(&agent, &format!("https://{addr}/trust"), &[])
            .and_then(|(_, r)| read_small(r))
        {
            Ok(b) => b,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        return match check_trust(&body, &verifier, trust_key) {
            Ok(t) => Ok((t.install_id, addr)),
            Err(TrustError::Bad(e) | TrustError::Refused(e)) => Err(format!("{addr}: {e}")),
        };
    }
    Err(last)
}

/// POSTs `body` to `path` on the server `install_id` at `to`, over its pinned
/// certificate, with the bearer. The status and the body (at most 64 KiB).
pub fn post_pinned(
    state_dir: &std::path::Path,
    install_id: &str,
    to: SocketAddr,
    path: &str,
    body: &str,
    bearer: &str,
    dial: Duration,
) -> Result<(u16, String), String> {
    let der = tls::load_pin(state_dir, install_id).ok_or("no pinned certificate")?;
    let agent = tls::agent(Verifier::pinned(der), dial, Duration::from_secs(5));
    let r = agent
        .post(&format!("https://{to}{path}"))
        .set("Authorization", &format!("Bearer {bearer}"))
        .set("Content-Type", "application/json")
        .send_string(body);
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
    };
    let status = resp.status();
    Ok((status, read_small(resp)?))
}

/// A GET with extra headers. Any HTTP status comes back as `Ok((status,
/// response))`; 401 and 429 become errors that say what they mean.
pub fn get(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(&str, String)],
) -> Result<(u16, ureq::Response), String> {
    let mut req = agent.get(url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    match req.call() {
        Ok(r) => Ok((r.status(), r)),
        Err(ureq::Error::Status(401, _)) => {
            Err("refused our bearer token (another cluster PIN?)".into())
        }
        Err(ureq::Error::Status(429, _)) => Err("rate limited us (429)".into()),
        Err(ureq::Error::Status(s, r)) => Ok((s, r)),
        Err(ureq::Error::Transport(t)) => Err(t.to_string()),
    }
}

/// Reads a small body (at most 64 KiB).
pub fn read_small(r: ureq::Response) -> Result<String, String> {
    read_small_limited(r, SMALL_BODY_LIMIT)
}

fn read_small_limited(r: ureq::Response, limit: u64) -> Result<String, String> {
    let mut s = String::new();
    r.into_reader()
        .take(limit)
        .read_to_string(&mut s)
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn peer_header() {
        let id = "11111111-2222-4333-8444-555555555555";
        assert_eq!(
            parse_peer_header(&format!("{id} 8442")),
            Some((id.to_string(), 8442))
        );
        assert_eq!(
            parse_peer_header(&format!(" {} 1 ", id.to_uppercase())),
            Some((id.to_string(), 1))
        );
        assert_eq!(parse_peer_header(&format!("{id} 0")), None);
        assert_eq!(parse_peer_header(&format!("{id} 70000")), None);
        assert_eq!(parse_peer_header("not-a-uuid 8442"), None);
        assert_eq!(parse_peer_header(id), None);
    }

    #[test]
    fn health_rules() {
        assert!(healthy(true, None, 0, 100), "connected is healthy");
        assert!(healthy(false, None, 0, 4), "fewer than 5 attempts");
        assert!(!healthy(false, None, 0, 5), "5 failures, never answered");
        assert!(healthy(false, Some(60 * S), 6, 5), "recent and over 50 %");
        assert!(
            !healthy(false, Some(60 * S), 5, 5),
            "exactly 50 % is not over"
        );
        assert!(
            !healthy(false, Some(301 * S), 10, 1),
            "answered too long ago"
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(S, 30 * S);
        let bases: Vec<u64> = (0..8)
            .map(|_| {
                let base = b.base().as_secs();
                let d = b.next_delay();
                assert!(d <= 30 * S);
                assert!(
                    d.as_secs_f64() >= base as f64 * 0.8 - 1e-9,
                    "{d:?} vs {base}"
                );
                base
            })
            .collect();
        assert_eq!(bases, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.base(), S);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.base(), 30 * S, "no overflow after many attempts");
    }
}
