//! The state owner: the only thread that holds the node store, the peer table and
//! the SSE subscriber list. Every other thread sends it an [`Event`] (with a reply
//! channel when it needs an answer). It also runs the timers (beacons, peer
//! housekeeping) with `select!` over `at` channels: no timer threads.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::RwLock;
use serde_json::{Value, json};

use crate::automation::{self, Edge, Invoker, Op};
use crate::beacon::{self, Beacon, BeaconSender, Freshness, Me};
use crate::config::Config;
use crate::credentials::Keys;
use crate::known::{self, Known, KnownPeer};
use crate::node::{self, Node, Ref};
use crate::peer::{self, ExchangeEntry, PeerCtl, PeerCtx};
use crate::proto;
use crate::sse::{self, Frame};
use crate::store::{self, Job};
use crate::util::{self, short};
use crate::worker::Worker;

/// The cluster keys, replaced on SIGHUP; `None` while no PIN is set.
pub type SharedKeys = Arc<RwLock<Option<Keys>>>;

/// Counters any thread may bump (plain atomics; not part of the model).
#[derive(Default, Debug)]
pub struct Counters {
    pub data_sent: AtomicU64,
    pub data_received: AtomicU64,
    pub beacons_sent: AtomicU64,
    pub beacons_received: AtomicU64,
    pub beacons_rejected: AtomicU64,
}

impl Counters {
    pub fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// An answer to an HTTP call.
#[derive(Debug)]
pub enum Reply {
    Json {
        status: u16,
        body: String,
    },
    /// Another server owns the node: the HTTP worker forwards `body` to `path` there.
    Forward {
        install_id: String,
        name: String,
        address: IpAddr,
        port: u16,
        path: String,
        body: String,
    },
}

impl Reply {
    pub fn json(status: u16, v: &impl serde::Serialize) -> Reply {
        Reply::Json {
            status,
            body: serde_json::to_string(v).expect("JSON values serialize"),
        }
    }
    pub fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply::json(status, &json!({ "error": msg.into() }))
    }
}

/// What HTTP workers ask of the state owner.
#[derive(Debug)]
pub enum Call {
    Health {
        observed: String,
    },
    Nodes {
        host: Option<String>,
    },
    Node {
        id: String,
    },
    Put {
        id: String,
        body: Value,
    },
    Delete {
        id: String,
    },
    SetValue {
        id: String,
        value: Value,
        hops: u32,
    },
    /// `POST /values`: several own data points at once, all or none.
    SetValues {
        items: Vec<(String, Value)>,
    },
    Invoke {
        id: String,
        hops: u32,
        invoker: Option<Invoker>,
    },
    Peers {
        healthy_only: bool,
    },
    Stats,
}

/// The state owner's answer to a subscription.
pub enum SubReply {
    Ok {
        id: u64,
        initial: Vec<Arc<Frame>>,
        rx: Receiver<Arc<Frame>>,
    },
    TooMany,
}

/// What a peer thread reports.
#[derive(Debug)]
pub enum PeerReport {
    Dialing,
    Connected(peer::Health),
    Snapshot(Vec<Node>),
    Node(Node),
    Delete(String),
    /// The attempt or the stream ended; `was_connected` tells which.
    Failed {
        reason: String,
        was_connected: bool,
    },
    /// The peer's `/network/peers` (peer exchange).
    Exchange(Vec<ExchangeEntry>),
}

/// Settings SIGHUP can change without a restart.
pub struct Reload {
    pub keys: Option<Keys>,
    pub log_level: log::LevelFilter,
}

pub enum Event {
    Beacon {
        /// Boxed, like the other large payloads, to keep `Event` small: the
        /// channel's slots are allocated up front.
        beacon: Box<Beacon>,
        from: IpAddr,
        fresh: Freshness,
    },
    Peer {
        install_id: String,
        generation: u64,
        report: Box<PeerReport>,
    },
    Call {
        call: Box<Call>,
        reply: util::OneTx<Reply>,
    },
    Subscribe {
        scope_all: bool,
        last_event_id: Option<String>,
        reply: util::OneTx<SubReply>,
    },
    Unsubscribe(u64),
    /// An authenticated request named its sender (`X-Krill-Peer`).
    Inbound {
        install_id: String,
        address: IpAddr,
        port: u16,
    },
    /// A static peer was probed (on the worker).
    Probed {
        spec: String,
        result: Result<(String, SocketAddr), String>,
    },
    /// The store thread finished the write it was given: its result.
    Persisted(Result<(), String>),
    /// A webhook call finished (on the webhook worker): the HTTP status, or why not.
    WebhookDone {
        id: String,
        result: Result<u16, String>,
    },
    Reload(Box<Reload>),
    /// Graceful stop; the reply is sent once state is flushed.
    Shutdown(Sender<()>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PeerStatus {
    Discovered,
    Connecting,
    Connected,
    Disconnected,
    Left,
}

impl PeerStatus {
    fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Discovered => "discovered",
            PeerStatus::Connecting => "connecting",
            PeerStatus::Connected => "connected",
            PeerStatus::Disconnected => "disconnected",
            PeerStatus::Left => "left",
        }
    }
}

/// One row of the peer table.
struct Peer {
    install_id: String,
    session_id: String,
    name: String,
    model: String,
    version: String,
    os: String,
    platform: String,
    address: IpAddr,
    port: u16,
    status: PeerStatus,
    source: &'static str,
    /// Epoch ms of the last beacon or successful contact.
    last_seen: u64,
    connected_since: Option<u64>,
    success_count: u64,
    failure_count: u64,
    last_success: Option<Instant>,
    /// Last beacon or successful dial (for `peer_ttl`).
    last_activity: Instant,
    thread: Option<(u64, Sender<PeerCtl>)>,
}

impl Peer {
    fn new(install_id: &str, name: &str, address: IpAddr, port: u16, source: &'static str) -> Peer {
        Peer {
            install_id: install_id.to_string(),
            session_id: String::new(),
            name: name.to_string(),
            model: String::new(),
            version: String::new(),
            os: String::new(),
            platform: String::new(),
            address,
            port,
            status: PeerStatus::Discovered,
            source,
            last_seen: util::now_ms(),
            connected_since: None,
            success_count: 0,
            failure_count: 0,
            last_success: None,
            last_activity: Instant::now(),
            thread: None,
        }
    }

    fn label(&self) -> String {
        format!(
            "{} ({}, {}:{})",
            self.name,
            short(&self.install_id),
            self.address,
            self.port
        )
    }

    fn healthy(&self) -> bool {
        peer::healthy(
            self.status == PeerStatus::Connected,
            self.last_success.map(|t| t.elapsed()),
            self.success_count,
            self.failure_count,
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "installId": self.install_id, "sessionId": self.session_id,
            "address": self.address.to_string(), "port": self.port, "name": self.name,
            "model": self.model, "version": self.version, "os": self.os,
            "platform": self.platform, "status": self.status.as_str(),
            "healthy": self.healthy(), "source": self.source, "lastSeen": self.last_seen,
            "connectedSince": self.connected_since, "successCount": self.success_count,
            "failureCount": self.failure_count,
        })
    }
}

struct Subscriber {
    id: u64,
    all: bool,
    tx: Sender<Arc<Frame>>,
}

/// Facts about this host shown in `/health` and the Server node.
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub model: String,
    pub os: String,
}

impl HostInfo {
    pub fn read() -> HostInfo {
        let model = std::fs::read_to_string("/proc/device-tree/model")
            .map(|s| s.trim_end_matches('\0').trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| "Linux".to_string());
        HostInfo { model, os }
    }
}

pub struct State {
    me: Me,
    cfg: Config,
    info: HostInfo,
    started: Instant,
    keys: SharedKeys,
    counters: Arc<Counters>,
    peer_ctx: PeerCtx,
    own: BTreeMap<String, Node>,
    mirrors: BTreeMap<String, BTreeMap<String, Node>>,
    stale_hosts: HashSet<String>,
    peers: BTreeMap<String, Peer>,
    peer_gen: u64,
    peer_table_full_warned: bool,
    seq: u64,
    ring: VecDeque<Arc<Frame>>,
    subs: Vec<Subscriber>,
    next_sub: u64,
    beacon: Option<BeaconSender>,
    next_beacon: Instant,
    reply_pending: bool,
    store: Sender<Job>,
    dirty: bool,
    persist_busy: bool,
    /// Answers waiting for the next write of the node store.
    pending_acks: Vec<Ack>,
    /// Answers waiting for the write the store thread is doing now.
    acks_in_flight: Vec<Ack>,
    /// Static peers from the config, and what each was found to be.
    statics: Vec<StaticPeer>,
    /// `known_peers.json`, kept current and saved when it changes.
    known: Known,
    known_dirty: bool,
    known_refreshed: Instant,
    last_rebootstrap: Instant,
    /// Our own address as peers see it (their `/health` `observedAddress`).
    observed: Option<String>,
    worker: Worker,
    /// Webhook calls: a pool of their own, so a dead target never holds up probes
    /// or forwarded writes.
    webhooks: Worker,
    /// Which own triggers and computes watch a node (rebuilt when they change).
    deps: HashMap<Ref, Vec<String>>,
    /// Peers already warned about for sending more than `max_nodes` nodes.
    mirror_full_warned: HashSet<String>,
}

struct StaticPeer {
    spec: String,
    /// The installId it answered with, once probed.
    identified: Option<String>,
    probing: bool,
    last_probe: Option<Instant>,
    complained: bool,
}

/// Everything the state owner is made of.
pub struct Parts {
    pub me: Me,
    pub cfg: Config,
    pub keys: SharedKeys,
    pub counters: Arc<Counters>,
    pub peer_ctx: PeerCtx,
    pub own_nodes: Vec<Node>,
    pub known: Known,
    pub beacon: Option<BeaconSender>,
    pub store: Sender<Job>,
    pub worker: Worker,
    pub webhooks: Worker,
}

type Ack = store::Done;

fn ack_with(reply: util::OneTx<Reply>, ok: Reply) -> Ack {
    Box::new(move |r| {
        let _ = reply.send(match r {
            Ok(()) => ok,
            Err(e) => Reply::error(500, format!("change applied but not stored: {e}")),
        });
    })
}

impl State {
    pub fn new(parts: Parts) -> State {
        let Parts {
            me,
            cfg,
            keys,
            counters,
            peer_ctx,
            own_nodes,
            known,
            beacon,
            store,
            worker,
            webhooks,
        } = parts;
        let info = HostInfo::read();
        let statics = cfg
            .peers
            .iter()
            .map(|spec| StaticPeer {
                spec: spec.clone(),
                identified: None,
                probing: false,
                last_probe: None,
                complained: false,
            })
            .collect();
        let mut s = State {
            me,
            cfg,
            info,
            started: Instant::now(),
            keys,
            counters,
            peer_ctx,
            own: BTreeMap::new(),
            mirrors: BTreeMap::new(),
            stale_hosts: HashSet::new(),
            peers: BTreeMap::new(),
            peer_gen: 0,
            peer_table_full_warned: false,
            seq: 0,
            ring: VecDeque::new(),
            subs: Vec::new(),
            next_sub: 1,
            beacon,
            next_beacon: Instant::now(),
            reply_pending: false,
            store,
            dirty: false,
            persist_busy: false,
            pending_acks: Vec::new(),
            acks_in_flight: Vec::new(),
            statics,
            known,
            known_dirty: false,
            known_refreshed: Instant::now(),
            last_rebootstrap: Instant::now(),
            observed: None,
            worker,
            webhooks,
            deps: HashMap::new(),
            mirror_full_warned: HashSet::new(),
        };
        for mut n in own_nodes {
            if n.kind == node::SERVER || n.id == s.me.install_id {
                continue;
            }
            n.host = s.me.install_id.clone();
            s.own.insert(n.id.clone(), n);
        }
        s.rebuild_deps();
        let server = s.server_node();
        s.own.insert(server.id.clone(), server);
        s
    }

    fn server_node(&self) -> Node {
        Node {
            id: self.me.install_id.clone(),
            host: self.me.install_id.clone(),
            parent: None,
            kind: node::SERVER.into(),
            name: self.me.name.clone(),
            state: "OK".into(),
            meta: json!({
                "name": self.me.name, "port": self.me.port, "model": self.info.model,
                "version": proto::VERSION, "os": self.info.os, "platform": proto::PLATFORM,
            }),
            timestamp: util::now_ms(),
            version: 1,
            hops: 0,
        }
    }

    /// Runs until shutdown.
    pub fn run(mut self, rx: Receiver<Event>) {
        self.bootstrap();
        // The watchdog is pinged from this thread: if it hangs, systemd restarts us.
        let watchdog = crate::systemd::watchdog_interval();
        let mut pinged = Instant::now();
        let tick = watchdog.map_or(Duration::from_secs(1), |w| w.min(Duration::from_secs(1)));
        let housekeeping = crossbeam_channel::tick(tick);
        loop {
            let deadline = self.next_deadline();
            crossbeam_channel::select! {
                recv(rx) -> ev => match ev {
                    Ok(Event::Shutdown(done)) => {
                        self.shutdown(&rx);
                        let _ = done.send(());
                        return;
                    }
                    Ok(ev) => self.handle(ev),
                    Err(_) => return,
                },
                recv(crossbeam_channel::at(deadline)) -> _ => self.beacon_timer(),
                recv(housekeeping) -> _ => {
                    self.housekeeping();
                    if watchdog.is_some_and(|w| pinged.elapsed() >= w) {
                        crate::systemd::notify("WATCHDOG=1");
                        pinged = Instant::now();
                    }
                }
            }
            self.maybe_persist();
        }
    }

    fn beacons_on(&self) -> bool {
        self.beacon.is_some() && self.keys.read().is_some()
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        if !self.beacons_on() {
            return far;
        }
        let mut d = self.next_beacon;
        if self.reply_pending {
            if let Some(b) = &self.beacon {
                d = d.min(b.allowed_at());
            }
        }
        d
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Beacon {
                beacon,
                from,
                fresh,
            } => self.on_beacon(*beacon, from, fresh),
            Event::Peer {
                install_id,
                generation,
                report,
            } => self.on_peer_report(&install_id, generation, *report),
            Event::Call { call, reply } => self.on_call(*call, reply),
            Event::Subscribe {
                scope_all,
                last_event_id,
                reply,
            } => {
                let r = self.subscribe(scope_all, last_event_id.as_deref());
                let _ = reply.send(r);
            }
            Event::Unsubscribe(id) => self.subs.retain(|s| s.id != id),
            Event::Inbound {
                install_id,
                address,
                port,
            } => self.on_inbound(&install_id, address, port),
            Event::Probed { spec, result } => self.on_probed(&spec, result),
            Event::Persisted(r) => {
                self.persist_busy = false;
                // The next write starts before the answers go out: waking each
                // waiting connection costs about as much as the write, and done
                // one after the other on the store thread it held the next write
                // back (one value per request: 4.4k -> see scripts/bench).
                let acks = std::mem::take(&mut self.acks_in_flight);
                self.maybe_persist();
                for a in acks {
                    a(r.clone());
                }
            }
            Event::WebhookDone { id, result } => self.webhook_done(&id, result),
            Event::Reload(r) => self.reload(*r),
            Event::Shutdown(_) => unreachable!("handled in run"),
        }
    }

    // ---- beacons ------------------------------------------------------------

    fn send_beacon(&mut self, state: &str) {
        let Some(keys) = self.keys.read().clone() else {
            return;
        };
        let Some(sender) = self.beacon.as_mut() else {
            return;
        };
        let b = Beacon::new_signed(&keys.beacon_key, &self.me, state);
        let leaving = state == beacon::STATE_LEAVING;
        match sender.send(&b, leaving) {
            Ok(true) => self.counters.inc(&self.counters.beacons_sent),
            Ok(false) => {}
            Err(e) => log::warn!("sending a beacon failed: {e}"),
        }
    }

    fn beacon_timer(&mut self) {
        if !self.beacons_on() {
            return;
        }
        let now = Instant::now();
        if now >= self.next_beacon {
            if let Some(b) = self.beacon.as_mut() {
                b.refresh_interface();
            }
            self.reply_pending = false;
            self.send_beacon(beacon::STATE_UP);
            self.next_beacon =
                now + util::jitter(self.cfg.timings.beacon_interval, proto::BEACON_JITTER);
        } else if self.reply_pending && self.beacon.as_ref().is_some_and(|b| now >= b.allowed_at())
        {
            self.reply_pending = false;
            self.send_beacon(beacon::STATE_UP);
        }
    }

    fn on_beacon(&mut self, b: Beacon, from: IpAddr, fresh: Freshness) {
        if b.leaving() {
            // A goodbye counts only for the session the peer runs now (the one its
            // /health reported, or its beacons did).
            let current = self
                .peers
                .get(&b.install_id)
                .is_some_and(|p| p.session_id == b.session_id);
            if !current {
                self.counters.inc(&self.counters.beacons_rejected);
                log::debug!(
                    "dropped a leaving beacon of {} for a session that is not current",
                    short(&b.install_id)
                );
                return;
            }
            if let Some(p) = self.peers.get_mut(&b.install_id) {
                if p.status != PeerStatus::Left {
                    log::info!("peer left: {}", p.label());
                }
                p.status = PeerStatus::Left;
                p.connected_since = None;
                p.last_seen = util::now_ms();
                if let Some((_, ctl)) = p.thread.take() {
                    let _ = ctl.send(PeerCtl::Stop);
                }
                let id = b.install_id.clone();
                self.set_stale(&id, true);
            }
            return;
        }
        if !self.room_for(&b.install_id) {
            return;
        }
        let now_ms = util::now_ms();
        let p = self.peers.entry(b.install_id.clone()).or_insert_with(|| {
            log::info!(
                "discovered peer {} ({}, {from}:{})",
                b.name,
                short(&b.install_id),
                b.port
            );
            let mut p = Peer::new(&b.install_id, &b.name, from, b.port, "beacon");
            p.session_id = b.session_id.clone();
            p
        });
        let moved = p.address != from || p.port != b.port;
        if moved && fresh != Freshness::First {
            log::info!(
                "peer {} ({}) moved from {}:{} to {from}:{}",
                p.name,
                short(&p.install_id),
                p.address,
                p.port,
                b.port
            );
        }
        if fresh == Freshness::NewSession {
            log::info!(
                "peer restarted: {} (new session {})",
                p.label(),
                short(&b.session_id)
            );
            p.session_id = b.session_id.clone();
        }
        p.address = from;
        p.port = b.port;
        p.name = b.name.clone();
        p.platform = b.platform.clone();
        p.last_seen = now_ms;
        p.last_activity = Instant::now();
        if p.status == PeerStatus::Left && fresh == Freshness::Same {
            // A late beacon of a session that said goodbye: stay gone.
            return;
        }
        let connected = p.status == PeerStatus::Connected;
        let dial = !connected || moved || fresh == Freshness::NewSession;
        if dial {
            if p.status == PeerStatus::Left || p.status == PeerStatus::Discovered {
                p.status = PeerStatus::Connecting;
            }
            let id = p.install_id.clone();
            self.dial(&id);
        }
        if !connected || fresh != Freshness::Same {
            self.reply_pending = true;
        }
    }

    /// Makes sure a peer thread exists and tells it to dial now.
    fn dial(&mut self, install_id: &str) {
        let Some(p) = self.peers.get_mut(install_id) else {
            return;
        };
        let ctl = PeerCtl::DialNow {
            address: p.address,
            port: p.port,
        };
        if let Some((_, tx)) = &p.thread {
            if tx.send(ctl).is_ok() {
                return;
            }
        }
        self.peer_gen += 1;
        let generation = self.peer_gen;
        match peer::spawn(
            self.peer_ctx.clone(),
            install_id.to_string(),
            p.name.clone(),
            generation,
            p.address,
            p.port,
        ) {
            Ok(tx) => p.thread = Some((generation, tx)),
            Err(e) => log::error!("cannot start a thread for peer {}: {e}", p.label()),
        }
    }

    // ---- peer reports -------------------------------------------------------

    fn on_peer_report(&mut self, install_id: &str, generation: u64, report: PeerReport) {
        let Some(p) = self.peers.get_mut(install_id) else {
            return;
        };
        if p.thread.as_ref().map(|t| t.0) != Some(generation) {
            return; // a stopped thread's last words
        }
        match report {
            PeerReport::Dialing => {
                if p.status != PeerStatus::Connected {
                    p.status = PeerStatus::Connecting;
                }
            }
            PeerReport::Connected(h) => {
                let observed = h
                    .observed_address
                    .clone()
                    .filter(|o| o.parse::<IpAddr>().is_ok());
                p.status = PeerStatus::Connected;
                p.connected_since = Some(util::now_ms());
                p.success_count += 1;
                p.last_success = Some(Instant::now());
                p.last_activity = Instant::now();
                p.last_seen = util::now_ms();
                p.session_id = h.session_id;
                p.name = h.name;
                p.model = h.model;
                p.version = h.version;
                p.os = h.os;
                p.platform = h.platform;
                log::info!("peer connected: {}", p.label());
                self.known.insert(
                    install_id.to_string(),
                    KnownPeer {
                        install_id: install_id.to_string(),
                        address: p.address,
                        port: p.port,
                        name: p.name.clone(),
                        last_seen: util::now_ms(),
                        success_count: p.success_count,
                        failure_count: p.failure_count,
                    },
                );
                self.known_dirty = true;
                if let Some(obs) = observed.filter(|o| self.observed.as_ref() != Some(o)) {
                    log::info!("peers see this server at {obs}");
                    self.observed = Some(obs);
                }
                self.set_stale(install_id, false);
            }
            PeerReport::Snapshot(nodes) => self.apply_snapshot(install_id, nodes),
            PeerReport::Exchange(entries) => self.on_exchange(install_id, entries),
            PeerReport::Node(n) => {
                if n.host == install_id && node::valid_id(&n.id) {
                    self.upsert_mirror(n);
                }
            }
            PeerReport::Delete(id) => {
                let removed = self
                    .mirrors
                    .get_mut(install_id)
                    .and_then(|m| m.remove(&id))
                    .is_some();
                if removed {
                    self.emit_delete(&id, install_id, false);
                    self.source_changed(install_id, &id, 0);
                }
            }
            PeerReport::Failed {
                reason,
                was_connected,
            } => {
                if was_connected {
                    if p.status != PeerStatus::Left {
                        p.status = PeerStatus::Disconnected;
                        log::info!("peer disconnected: {} ({reason})", p.label());
                    }
                    p.connected_since = None;
                    self.set_stale(install_id, true);
                } else {
                    p.failure_count += 1;
                    if p.status != PeerStatus::Left {
                        p.status = PeerStatus::Disconnected;
                    }
                    log::debug!("dial to peer {} failed: {reason}", p.label());
                }
            }
        }
    }

    fn present(&self, n: &Node) -> Node {
        let mut n = n.clone();
        if self.stale_hosts.contains(&n.host) {
            n.state = proto::STATE_STALE.into();
        }
        n
    }

    fn upsert_mirror(&mut self, n: Node) {
        let host = n.host.clone();
        let m = self.mirrors.entry(host).or_default();
        if m.get(&n.id) == Some(&n) {
            return;
        }
        // A peer may own no more nodes than we would: its extra ones are not mirrored.
        if m.len() >= self.cfg.max_nodes && !m.contains_key(&n.id) {
            if self.mirror_full_warned.insert(n.host.clone()) {
                log::warn!(
                    "peer {} sends more than max_nodes ({}) nodes; not mirroring the rest",
                    short(&n.host),
                    self.cfg.max_nodes
                );
            }
            return;
        }
        m.insert(n.id.clone(), n.clone());
        let shown = self.present(&n);
        self.emit_node(&shown, false);
        self.source_changed(&n.host, &n.id, n.hops);
    }

    fn apply_snapshot(&mut self, host: &str, nodes: Vec<Node>) {
        let keep: HashSet<String> = nodes
            .iter()
            .filter(|n| n.host == host)
            .map(|n| n.id.clone())
            .collect();
        let gone: Vec<String> = self
            .mirrors
            .get(host)
            .map(|m| m.keys().filter(|k| !keep.contains(*k)).cloned().collect())
            .unwrap_or_default();
        for id in gone {
            if let Some(m) = self.mirrors.get_mut(host) {
                m.remove(&id);
            }
            self.emit_delete(&id, host, false);
            self.source_changed(host, &id, 0);
        }
        for n in nodes {
            if n.host == host && node::valid_id(&n.id) {
                self.upsert_mirror(n);
            }
        }
    }

    /// Marks a host's mirrored nodes stale (owner gone) or current again, and
    /// re-emits them as they are now presented.
    fn set_stale(&mut self, host: &str, stale: bool) {
        let changed = if stale {
            self.stale_hosts.insert(host.to_string())
        } else {
            self.stale_hosts.remove(host)
        };
        if !changed {
            return;
        }
        let nodes: Vec<Node> = self
            .mirrors
            .get(host)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for n in nodes {
            let shown = self.present(&n);
            self.emit_node(&shown, false);
            self.source_changed(host, &n.id, 0);
        }
    }

    // ---- events and subscribers --------------------------------------------

    fn emit(&mut self, event: &str, data: &impl serde::Serialize, own: bool) {
        self.seq += 1;
        let f = Arc::new(Frame {
            seq: self.seq,
            own,
            text: sse::frame_json(&self.me.session_id, self.seq, event, data),
        });
        self.ring.push_back(f.clone());
        while self.ring.len() > proto::SSE_RING_EVENTS {
            self.ring.pop_front();
        }
        self.subs.retain(|s| {
            if !own && !s.all {
                return true;
            }
            if s.tx.len() >= proto::SSE_SUBSCRIBER_QUEUE {
                log::info!(
                    "SSE subscriber {} cannot keep up; dropped (it will resync)",
                    s.id
                );
                return false;
            }
            s.tx.send(f.clone()).is_ok()
        });
    }

    fn emit_node(&mut self, n: &Node, own: bool) {
        self.emit("node", n, own);
    }

    fn emit_delete(&mut self, id: &str, host: &str, own: bool) {
        self.emit("delete", &json!({"id": id, "host": host}), own);
    }

    fn snapshot_frame(&self, all: bool) -> Arc<Frame> {
        let mut nodes: Vec<Node> = self.own.values().cloned().collect();
        if all {
            for m in self.mirrors.values() {
                nodes.extend(m.values().map(|n| self.present(n)));
            }
        }
        let data =
            json!({"host": self.me.install_id, "sessionId": self.me.session_id, "nodes": nodes});
        Arc::new(Frame {
            seq: self.seq,
            own: true,
            text: sse::frame_json(&self.me.session_id, self.seq, "snapshot", &data),
        })
    }

    fn subscribe(&mut self, all: bool, last_event_id: Option<&str>) -> SubReply {
        if self.subs.len() >= proto::MAX_SSE_SUBSCRIBERS {
            return SubReply::TooMany;
        }
        let resume = last_event_id
            .and_then(sse::parse_event_id)
            .filter(|(sess, seq)| {
                *sess == self.me.session_id
                    && *seq <= self.seq
                    && (*seq == self.seq || self.ring.front().is_some_and(|f| f.seq <= seq + 1))
            })
            .map(|(_, seq)| seq);
        let initial = match resume {
            Some(after) => self
                .ring
                .iter()
                .filter(|f| f.seq > after && (all || f.own))
                .cloned()
                .collect(),
            None => vec![self.snapshot_frame(all)],
        };
        // Bounded by the length check in `emit`: an unbounded channel allocates its
        // slots as they fill (a bounded one holds all 4096 from the start, 64 KiB
        // per subscriber however idle).
        let (tx, rx) = crossbeam_channel::unbounded();
        let id = self.next_sub;
        self.next_sub += 1;
        self.subs.push(Subscriber { id, all, tx });
        SubReply::Ok { id, initial, rx }
    }

    // ---- HTTP calls ---------------------------------------------------------

    fn find(&self, id: &str) -> Option<Node> {
        if let Some(n) = self.own.get(id) {
            return Some(n.clone());
        }
        self.mirrors
            .values()
            .find_map(|m| m.get(id))
            .map(|n| self.present(n))
    }

    fn on_call(&mut self, call: Call, reply: util::OneTx<Reply>) {
        let r = match call {
            Call::Health { observed } => self.health(&observed),
            Call::Nodes { host } => {
                let mut nodes: Vec<Node> = Vec::new();
                if host.as_deref().is_none_or(|h| h == self.me.install_id) {
                    nodes.extend(self.own.values().cloned());
                }
                for (h, m) in &self.mirrors {
                    if host.as_deref().is_none_or(|x| x == h) {
                        nodes.extend(m.values().map(|n| self.present(n)));
                    }
                }
                Reply::json(200, &json!({ "nodes": nodes }))
            }
            Call::Node { id } => match self.find(&id) {
                Some(n) => Reply::json(200, &n),
                None => Reply::error(404, format!("no node {id}")),
            },
            Call::Put { id, body } => match self.put(&id, &body) {
                Ok((status, n)) => {
                    self.pending_acks
                        .push(ack_with(reply, Reply::json(status, &n)));
                    return;
                }
                Err(r) => r,
            },
            Call::Delete { id } => match self.delete(&id) {
                Ok(()) => {
                    let ok = Reply::Json {
                        status: 204,
                        body: String::new(),
                    };
                    self.pending_acks.push(ack_with(reply, ok));
                    return;
                }
                Err(r) => r,
            },
            Call::SetValue { id, value, hops } => match self.set_value(&id, value, hops) {
                Ok(n) => {
                    let n = self.own.get(&id).cloned().unwrap_or(n);
                    self.pending_acks
                        .push(ack_with(reply, Reply::json(200, &n)));
                    return;
                }
                Err(r) => r,
            },
            Call::SetValues { items } => match self.set_values(items) {
                Ok(n) => {
                    let ok = Reply::json(200, &json!({ "updated": n }));
                    self.pending_acks.push(ack_with(reply, ok));
                    return;
                }
                Err(r) => r,
            },
            Call::Invoke { id, hops, invoker } => self.invoke_call(&id, hops, invoker),
            Call::Peers { healthy_only } => {
                let peers: Vec<Value> = self
                    .peers
                    .values()
                    .filter(|p| !healthy_only || p.healthy())
                    .map(Peer::to_json)
                    .collect();
                Reply::json(200, &json!({ "peers": peers }))
            }
            Call::Stats => Reply::json(200, &self.stats()),
        };
        let _ = reply.send(r);
    }

    fn health(&self, observed: &str) -> Reply {
        let beacon = match (&self.beacon, self.keys.read().is_some()) {
            (None, _) => "off",
            (Some(_), false) => "off (no PIN)",
            (Some(b), true) if b.has_interface() => "ok",
            (Some(_), true) => "no interface",
        };
        // Beacons that are off by choice (or for want of a PIN) are not a fault;
        // beacons that cannot find their interface are.
        let degraded = beacon == "no interface";
        let connected = self
            .peers
            .values()
            .filter(|p| p.status == PeerStatus::Connected)
            .count();
        let body = json!({
            "status": if degraded { "degraded" } else { "ok" },
            "installId": self.me.install_id, "sessionId": self.me.session_id,
            "name": self.me.name, "port": self.me.port, "model": self.info.model,
            "version": proto::VERSION, "os": self.info.os, "platform": proto::PLATFORM,
            "uptime": self.started.elapsed().as_secs(), "observedAddress": observed,
            "reachableAddress": self.observed,
            "components": {"beacon": beacon, "listener": "ok", "state": "ok"},
            "peers": {"known": self.peers.len(), "connected": connected},
        });
        Reply::json(if degraded { 503 } else { 200 }, &body)
    }

    fn stats(&self) -> Value {
        let c = &self.counters;
        json!({
            "total_peers": self.peers.len(),
            "healthy_peers": self.peers.values().filter(|p| p.healthy()).count(),
            "connected_peers": self.peers.values().filter(|p| p.status == PeerStatus::Connected).count(),
            "data_sent": Counters::get(&c.data_sent),
            "data_received": Counters::get(&c.data_received),
            "uptime": self.started.elapsed().as_secs(),
            "beacons_sent": Counters::get(&c.beacons_sent),
            "beacons_received": Counters::get(&c.beacons_received),
            "beacons_rejected": Counters::get(&c.beacons_rejected),
        })
    }

    fn owned_elsewhere(&self, id: &str) -> Option<&Node> {
        self.mirrors.values().find_map(|m| m.get(id))
    }

    fn put(&mut self, id: &str, body: &Value) -> Result<(u16, Node), Reply> {
        if !node::valid_id(id) {
            return Err(Reply::error(
                400,
                "node id must be 1-128 of A-Z a-z 0-9 . _ : -",
            ));
        }
        if id == self.me.install_id {
            return Err(Reply::error(
                409,
                "the Server node is made by the server itself",
            ));
        }
        if let Some(n) = self.owned_elsewhere(id) {
            return Err(Reply::error(
                409,
                format!("node {id} belongs to server {}; change it there", n.host),
            ));
        }
        let d =
            node::validate_put(id, body, &self.me.install_id).map_err(|e| Reply::error(400, e))?;
        let old = self.own.get(id);
        if old.is_none() && self.own.len() > self.cfg.max_nodes {
            return Err(Reply::error(
                409,
                format!(
                    "max_nodes ({}) reached; delete nodes or raise max_nodes",
                    self.cfg.max_nodes
                ),
            ));
        }
        let n = Node {
            id: id.to_string(),
            host: self.me.install_id.clone(),
            parent: d.parent,
            kind: d.kind,
            name: d.name,
            state: d.state,
            meta: d.meta,
            timestamp: util::now_ms(),
            version: old.map_or(1, |o| o.version + 1),
            hops: 0,
        };
        let status = if old.is_some() { 200 } else { 201 };
        let watches = |k: &str| [node::TRIGGER_HIGH, node::TRIGGER_LOW, node::COMPUTE].contains(&k);
        let rewire = watches(&n.kind) || old.is_some_and(|o| watches(&o.kind));
        self.own.insert(id.to_string(), n.clone());
        self.dirty = true;
        self.emit_node(&n, true);
        if rewire {
            self.rebuild_deps();
        }
        // A new trigger past its threshold fires at once; a compute computes now.
        match n.kind.as_str() {
            node::TRIGGER_HIGH | node::TRIGGER_LOW => self.evaluate_trigger(id, 0),
            node::COMPUTE => self.recompute(id, 0),
            _ => {}
        }
        let me = self.me.install_id.clone();
        self.source_changed(&me, id, 0);
        let stored = self.own.get(id).cloned().unwrap_or(n);
        Ok((status, stored))
    }

    fn delete(&mut self, id: &str) -> Result<(), Reply> {
        if id == self.me.install_id {
            return Err(Reply::error(409, "the Server node cannot be deleted"));
        }
        if let Some(old) = self.own.remove(id) {
            self.dirty = true;
            let me = self.me.install_id.clone();
            self.emit_delete(id, &me, true);
            if [node::TRIGGER_HIGH, node::TRIGGER_LOW, node::COMPUTE].contains(&old.kind.as_str()) {
                self.rebuild_deps();
            }
            self.source_changed(&me, id, 0);
            return Ok(());
        }
        match self.owned_elsewhere(id) {
            Some(n) => Err(Reply::error(
                409,
                format!("node {id} belongs to server {}; delete it there", n.host),
            )),
            None => Err(Reply::error(404, format!("no node {id}"))),
        }
    }

    /// `Ok(Some(node))` changed, `Err` a reply to send now (errors, forwards).
    /// A value from a client (or a peer forwarding one): applied here, or forwarded
    /// to the owner. `Ok(node)` once applied; `Err` a reply to send now.
    fn set_value(&mut self, id: &str, value: Value, hops: u32) -> Result<Node, Reply> {
        if let Err(e) = node::check_value(&value) {
            return Err(Reply::error(400, e));
        }
        if !self.own.contains_key(id) {
            return match self.owned_elsewhere(id).cloned() {
                Some(n) if n.kind != node::DATA_POINT => Err(Reply::error(
                    409,
                    format!("node {id} is a {}, not a DataPoint", n.kind),
                )),
                Some(n) => Err(self.forward(
                    &n,
                    "value",
                    json!({ "value": value, "hops": hops }).to_string(),
                )),
                None => Err(Reply::error(404, format!("no node {id}"))),
            };
        }
        self.set_own_value(id, value, hops)
            .map_err(|e| Reply::error(409, e))
    }

    /// A batch of values for own data points: every entry is checked first, so a bad
    /// one changes nothing. Nodes owned elsewhere are refused (send them to their
    /// owner), not forwarded: a batch is one write on one server.
    fn set_values(&mut self, items: Vec<(String, Value)>) -> Result<usize, Reply> {
        for (i, (id, _)) in items.iter().enumerate() {
            match self.own.get(id) {
                Some(n) if n.kind == node::DATA_POINT => {}
                Some(n) => {
                    let msg = format!("values[{i}]: node {id} is a {}, not a DataPoint", n.kind);
                    return Err(Reply::error(409, msg));
                }
                None => {
                    return Err(match self.owned_elsewhere(id) {
                        Some(n) => Reply::error(
                            409,
                            format!(
                                "values[{i}]: node {id} belongs to {}; send it to that server",
                                short(&n.host)
                            ),
                        ),
                        None => Reply::error(404, format!("values[{i}]: no node {id}")),
                    });
                }
            }
        }
        let n = items.len();
        for (id, value) in items {
            self.set_own_value(&id, value, 0)
                .expect("checked above: an own DataPoint");
        }
        Ok(n)
    }

    /// Sets an own DataPoint's value and runs what watches it.
    fn set_own_value(&mut self, id: &str, value: Value, hops: u32) -> Result<Node, String> {
        match self.own.get(id) {
            None => return Err(format!("no node {id}")),
            Some(n) if n.kind != node::DATA_POINT => {
                return Err(format!("node {id} is a {}, not a DataPoint", n.kind));
            }
            Some(_) => {}
        }
        let n = self
            .touch(id, hops, |n| n.meta["value"] = value)
            .expect("the node exists: checked above");
        let me = self.me.install_id.clone();
        self.source_changed(&me, id, hops);
        Ok(n)
    }

    fn forward(&self, n: &Node, what: &str, body: String) -> Reply {
        match self.peers.get(&n.host) {
            Some(p) if p.status == PeerStatus::Connected => Reply::Forward {
                install_id: p.install_id.clone(),
                name: p.name.clone(),
                address: p.address,
                port: p.port,
                path: format!("/nodes/{}/{what}", n.id),
                body,
            },
            Some(p) => Reply::error(502, format!("owner {} is not connected", p.label())),
            None => Reply::error(502, format!("owner {} is unknown", short(&n.host))),
        }
    }

    // ---- automation -----------------------------------------------------------

    /// Rebuilds which own triggers and computes watch which node.
    fn rebuild_deps(&mut self) {
        self.deps.clear();
        for n in self.own.values() {
            let watched = match n.kind.as_str() {
                node::TRIGGER_HIGH | node::TRIGGER_LOW => {
                    Ref::from_meta(&n.meta, "source").into_iter().collect()
                }
                node::COMPUTE => Ref::list(&n.meta, "inputs"),
                _ => continue,
            };
            for r in watched {
                self.deps.entry(r).or_default().push(n.id.clone());
            }
        }
    }

    /// A node anywhere (own or mirrored) and whether it is stale.
    fn node_at(&self, r: &Ref) -> Option<(&Node, bool)> {
        if r.host == self.me.install_id {
            return self.own.get(&r.id).map(|n| (n, false));
        }
        let n = self.mirrors.get(&r.host)?.get(&r.id)?;
        Some((n, self.stale_hosts.contains(&r.host)))
    }

    /// A usable reading: a number held by a node that is there and not stale.
    fn reading(&self, r: &Ref) -> Option<f64> {
        match self.node_at(r) {
            Some((n, false)) => automation::numeric(&n.meta["value"]),
            _ => None,
        }
    }

    /// A watched node changed (value, state, gone): run what watches it.
    fn source_changed(&mut self, host: &str, id: &str, hops: u32) {
        let key = Ref {
            host: host.to_string(),
            id: id.to_string(),
        };
        let Some(watchers) = self.deps.get(&key).cloned() else {
            return;
        };
        if hops > automation::MAX_HOPS {
            log::warn!(
                "automation chain cut after {} hops at node {id} of {} (a loop between nodes?)",
                automation::MAX_HOPS,
                short(host)
            );
            return;
        }
        for w in watchers {
            match self.own.get(&w).map(|n| n.kind.as_str()) {
                Some(node::TRIGGER_HIGH | node::TRIGGER_LOW) => self.evaluate_trigger(&w, hops),
                Some(node::COMPUTE) => self.recompute(&w, hops),
                _ => {}
            }
        }
    }

    /// Changes an own node in place: new version and time, emitted, to be stored.
    fn touch(&mut self, id: &str, hops: u32, f: impl FnOnce(&mut Node)) -> Option<Node> {
        let n = self.own.get_mut(id)?;
        f(n);
        n.version += 1;
        n.timestamp = util::now_ms();
        n.hops = hops;
        let n = n.clone();
        self.dirty = true;
        self.emit_node(&n, true);
        Some(n)
    }

    fn evaluate_trigger(&mut self, tid: &str, hops: u32) {
        let Some(t) = self.own.get(tid) else { return };
        let edge = if t.kind == node::TRIGGER_HIGH {
            Edge::High
        } else {
            Edge::Low
        };
        let Some(value) = Ref::from_meta(&t.meta, "source").and_then(|r| self.reading(&r)) else {
            return;
        };
        let threshold = automation::numeric(&t.meta["threshold"]).unwrap_or(0.0);
        let hysteresis = automation::numeric(&t.meta["hysteresis"]).unwrap_or(0.0);
        let armed = t.meta["armed"].as_bool().unwrap_or(true);
        let (fire, armed_after) =
            automation::trigger_step(edge, threshold, hysteresis, armed, value);
        if !fire && armed_after == armed {
            return;
        }
        let Some(t) = self.touch(tid, hops, |t| {
            t.meta["armed"] = Value::Bool(armed_after);
            t.state = if fire { "EXECUTED" } else { "OK" }.into();
        }) else {
            return;
        };
        if fire {
            log::debug!("trigger {} fired at {value}", t.name);
            let inv = Invoker {
                id: t.id.clone(),
                name: t.name.clone(),
                value: json!(value),
                timestamp: t.timestamp,
            };
            for target in Ref::list(&t.meta, "targets") {
                self.invoke(&target, hops + 1, &inv);
            }
        }
    }

    fn recompute(&mut self, cid: &str, hops: u32) {
        let Some(c) = self.own.get(cid) else { return };
        let op = Op::parse(c.meta["op"].as_str().unwrap_or("")).unwrap_or(Op::Avg);
        let mut usable = Vec::new();
        let mut warn = false;
        for r in Ref::list(&c.meta, "inputs") {
            match self.node_at(&r) {
                Some((n, false)) => usable.extend(automation::numeric(&n.meta["value"])),
                _ => warn = true,
            }
        }
        let value = automation::compute(op, &usable).map_or(Value::Null, |v| json!(v));
        let state = if warn { "WARN" } else { "OK" };
        let changed = c.meta["value"] != value || c.state != state;
        let c = if changed {
            let Some(c) = self.touch(cid, hops, |c| {
                c.meta["value"] = value;
                c.state = state.into();
            }) else {
                return;
            };
            let me = self.me.install_id.clone();
            self.source_changed(&me, cid, hops + 1);
            c
        } else {
            c.clone()
        };
        let inv = Invoker {
            id: c.id.clone(),
            name: c.name.clone(),
            value: c.meta["value"].clone(),
            timestamp: c.timestamp,
        };
        for target in Ref::list(&c.meta, "targets") {
            self.invoke(&target, hops + 1, &inv);
        }
    }

    /// Runs `target` (on this server, or asks its owner to).
    fn invoke(&mut self, target: &Ref, hops: u32, inv: &Invoker) {
        if hops > automation::MAX_HOPS {
            log::warn!(
                "automation chain cut after {} hops before invoking {} on {} (a loop between nodes?)",
                automation::MAX_HOPS,
                target.id,
                short(&target.host)
            );
            return;
        }
        if target.host != self.me.install_id {
            let body = json!({ "hops": hops, "invoker": inv }).to_string();
            self.remote(target, "invoke", body);
            return;
        }
        let Some(n) = self.own.get(&target.id).cloned() else {
            log::warn!("automation: no node {} to invoke", target.id);
            return;
        };
        match n.kind.as_str() {
            node::EXECUTOR_SET_VALUE => {
                self.touch(&n.id, hops, |e| e.state = "EXECUTED".into());
                if let Some(t) = Ref::from_meta(&n.meta, "target") {
                    let value = n.meta["value"].clone();
                    if t.host == self.me.install_id {
                        if let Err(e) = self.set_own_value(&t.id, value, hops) {
                            log::warn!("executor {}: cannot set {}: {e}", n.name, t.id);
                        }
                    } else {
                        let body = json!({ "value": value, "hops": hops }).to_string();
                        self.remote(&t, "value", body);
                    }
                }
            }
            node::WEBHOOK => self.send_webhook(&n, inv),
            node::COMPUTE => self.recompute(&n.id, hops),
            node::TRIGGER_HIGH | node::TRIGGER_LOW => {
                for t in Ref::list(&n.meta, "targets") {
                    self.invoke(&t, hops + 1, inv);
                }
            }
            other => log::debug!("automation: a {other} cannot be invoked ({})", n.id),
        }
    }

    /// `POST /nodes/{id}/invoke` from a client or a peer.
    fn invoke_call(&mut self, id: &str, hops: u32, invoker: Option<Invoker>) -> Reply {
        let Some(n) = self.find(id) else {
            return Reply::error(404, format!("no node {id}"));
        };
        if n.kind == node::DATA_POINT {
            return Reply::error(409, "a DataPoint cannot be invoked; set its value instead");
        }
        if n.kind == node::SERVER {
            return Reply::error(409, "the Server node cannot be invoked");
        }
        if n.host != self.me.install_id {
            let body = json!({ "hops": hops, "invoker": invoker }).to_string();
            return self.forward(&n, "invoke", body);
        }
        let inv = invoker.unwrap_or_else(|| Invoker {
            id: n.id.clone(),
            name: n.name.clone(),
            value: n.meta.get("value").cloned().unwrap_or(Value::Null),
            timestamp: util::now_ms(),
        });
        let target = Ref {
            host: n.host.clone(),
            id: n.id.clone(),
        };
        self.invoke(&target, hops, &inv);
        match self.own.get(id) {
            Some(n) => Reply::json(200, n),
            None => Reply::error(404, format!("no node {id}")),
        }
    }

    /// Sends a value or an invocation to the server that owns `target`, on the worker.
    fn remote(&mut self, target: &Ref, what: &'static str, body: String) {
        let Some(p) = self
            .peers
            .get(&target.host)
            .filter(|p| p.status == PeerStatus::Connected)
        else {
            log::warn!(
                "automation: cannot {what} node {} on {}: that server is not connected",
                target.id,
                short(&target.host)
            );
            return;
        };
        let Some(keys) = self.keys.read().clone() else {
            return;
        };
        let to = SocketAddr::new(p.address, p.port);
        let (owner, name) = (p.install_id.clone(), p.name.clone());
        let path = format!("/nodes/{}/{what}", target.id);
        let (dir, dial) = (self.cfg.state_dir.clone(), self.cfg.timings.dial_timeout);
        self.worker.submit(move || {
            match peer::post_pinned(&dir, &owner, to, &path, &body, &keys.bearer, dial) {
                Ok((s, _)) if (200..300).contains(&s) => {}
                Ok((s, b)) => log::warn!("automation: {path} on {name} answered {s}: {b}"),
                Err(e) => log::warn!("automation: {path} on {name} failed: {e}"),
            }
        });
    }

    fn send_webhook(&mut self, n: &Node, inv: &Invoker) {
        let m = &n.meta;
        let call = automation::WebhookCall {
            method: m["method"].as_str().unwrap_or("POST").to_string(),
            url: m["url"].as_str().unwrap_or("").to_string(),
            content_type: m["contentType"]
                .as_str()
                .unwrap_or("application/json")
                .to_string(),
            body: automation::render(m["body"].as_str().unwrap_or(""), inv),
        };
        let (id, tx) = (n.id.clone(), self.peer_ctx.tx.clone());
        let queued = self.webhooks.submit(move || {
            let result = call.send();
            let _ = tx.send(Event::WebhookDone { id, result });
        });
        if !queued {
            self.webhook_done(
                &n.id,
                Err("webhook queue full (the target is too slow?)".into()),
            );
        }
    }

    fn webhook_done(&mut self, id: &str, result: Result<u16, String>) {
        let Some(n) = self.own.get(id).filter(|n| n.kind == node::WEBHOOK) else {
            return;
        };
        let was_error = n.state == "ERROR";
        let status = result.as_ref().ok().copied().unwrap_or(0);
        let error = match result {
            Ok(s) if (200..300).contains(&s) => None,
            Ok(s) => Some(format!("answered {s}")),
            Err(e) => Some(e),
        };
        match &error {
            Some(e) if !was_error => log::warn!("webhook {} ({}) failed: {e}", n.name, n.id),
            Some(e) => log::debug!("webhook {} failed again: {e}", n.name),
            None if was_error => log::info!("webhook {} works again", n.name),
            None => {}
        }
        let hops = n.hops;
        self.touch(id, hops, |n| match error {
            Some(e) => {
                n.state = "ERROR".into();
                n.meta["lastError"] = e.into();
                let f = n.meta["failures"].as_u64().unwrap_or(0);
                n.meta["failures"] = (f + 1).into();
            }
            None => {
                n.state = "EXECUTED".into();
                n.meta["lastStatus"] = status.into();
                if let Some(o) = n.meta.as_object_mut() {
                    o.remove("lastError");
                }
            }
        });
    }

    // ---- persistence --------------------------------------------------------

    fn maybe_persist(&mut self) {
        if !self.dirty || self.persist_busy {
            return;
        }
        let data = store::encode_nodes(self.own.values().filter(|n| n.kind != node::SERVER));
        self.acks_in_flight.append(&mut self.pending_acks);
        let tx = self.peer_ctx.tx.clone();
        let done: Vec<store::Done> = vec![Box::new(move |r| {
            let _ = tx.send(Event::Persisted(r));
        })];
        self.dirty = false;
        self.persist_busy = true;
        let path = self.cfg.state_dir.join(proto::NODES_FILE);
        if self
            .store
            .send(Job {
                write: Some((path, data)),
                done,
            })
            .is_err()
        {
            log::error!("the store thread is gone: cannot persist nodes");
            self.persist_busy = false;
            for a in std::mem::take(&mut self.acks_in_flight) {
                a(Err("store thread gone".into()));
            }
        }
    }

    // ---- housekeeping, reload, shutdown ------------------------------------

    fn housekeeping(&mut self) {
        let ttl = self.cfg.timings.peer_ttl;
        let listed: HashSet<String> = self
            .statics
            .iter()
            .filter_map(|s| s.identified.clone())
            .collect();
        let expired: Vec<String> = self
            .peers
            .values()
            .filter(|p| {
                p.status != PeerStatus::Connected
                    && p.last_activity.elapsed() > ttl
                    && !listed.contains(&p.install_id)
            })
            .map(|p| p.install_id.clone())
            .collect();
        for id in expired {
            if let Some(mut p) = self.peers.remove(&id) {
                log::info!(
                    "forgetting peer {}: not seen for {} s",
                    p.label(),
                    ttl.as_secs()
                );
                if let Some((_, ctl)) = p.thread.take() {
                    let _ = ctl.send(PeerCtl::Stop);
                }
            }
            self.stale_hosts.remove(&id);
            if let Some(m) = self.mirrors.remove(&id) {
                for nid in m.keys() {
                    self.emit_delete(nid, &id, false);
                    self.source_changed(&id, nid, 0);
                }
            }
        }
        let every = self.cfg.timings.rebootstrap_interval;
        // Static peers never identified yet are probed again now and then.
        for i in 0..self.statics.len() {
            let st = &self.statics[i];
            if st.identified.is_none()
                && !st.probing
                && st.last_probe.is_none_or(|t| t.elapsed() >= every)
            {
                self.probe_static(i);
            }
        }
        let connected = self
            .peers
            .values()
            .any(|p| p.status == PeerStatus::Connected);
        if !connected && self.last_rebootstrap.elapsed() >= every {
            self.last_rebootstrap = Instant::now();
            if !self.statics.is_empty() || !self.known.is_empty() {
                log::info!("no connected peers: dialling static and known peers again");
                self.bootstrap();
            }
        }
        // Connected peers stay fresh in known_peers.json (it drops entries after 24 h).
        if self.known_refreshed.elapsed() >= Duration::from_secs(60) {
            self.known_refreshed = Instant::now();
            let now = util::now_ms();
            for p in self
                .peers
                .values()
                .filter(|p| p.status == PeerStatus::Connected)
            {
                if let Some(k) = self.known.get_mut(&p.install_id) {
                    k.last_seen = now;
                    k.address = p.address;
                    k.port = p.port;
                    k.success_count = p.success_count;
                    k.failure_count = p.failure_count;
                    self.known_dirty = true;
                }
            }
            let max_age = self.cfg.timings.known_peers_max_age.as_millis() as u64;
            if known::prune(&mut self.known, now, max_age) > 0 {
                self.known_dirty = true;
            }
        }
        self.save_known();
    }

    /// Writes `known_peers.json` if it changed (on the store thread).
    fn save_known(&mut self) {
        if !self.known_dirty {
            return;
        }
        self.known_dirty = false;
        let path = self.cfg.state_dir.join(proto::KNOWN_PEERS_FILE);
        let _ = self.store.send(Job {
            write: Some((path, known::encode(&self.known))),
            done: Vec::new(),
        });
    }

    // ---- static peers, known peers, exchange ---------------------------------

    /// Dials every static and known peer (at start, and with no peer connected).
    fn bootstrap(&mut self) {
        for i in 0..self.statics.len() {
            match self.statics[i].identified.clone() {
                Some(id) if self.peers.contains_key(&id) => self.dial(&id),
                _ if !self.statics[i].probing => self.probe_static(i),
                _ => {}
            }
        }
        let known: Vec<KnownPeer> = self.known.values().cloned().collect();
        for k in known {
            if k.install_id == self.me.install_id || !self.room_for(&k.install_id) {
                continue;
            }
            self.peers
                .entry(k.install_id.clone())
                .or_insert_with(|| Peer::new(&k.install_id, &k.name, k.address, k.port, "known"));
            self.dial(&k.install_id);
        }
    }

    fn probe_static(&mut self, i: usize) {
        let Some(keys) = self.keys.read().clone() else {
            return;
        };
        let st = &mut self.statics[i];
        st.probing = true;
        st.last_probe = Some(Instant::now());
        let (spec, tx, dial) = (
            st.spec.clone(),
            self.peer_ctx.tx.clone(),
            self.cfg.timings.dial_timeout,
        );
        let submitted = self.worker.submit(move || {
            let result = peer::probe(&spec, &keys.trust_key, dial);
            let _ = tx.send(Event::Probed { spec, result });
        });
        if !submitted {
            self.statics[i].probing = false;
        }
    }

    fn on_probed(&mut self, spec: &str, result: Result<(String, SocketAddr), String>) {
        let Some(i) = self.statics.iter().position(|s| s.spec == spec) else {
            return;
        };
        self.statics[i].probing = false;
        let (id, addr) = match result {
            Ok(x) => x,
            Err(e) => {
                let st = &mut self.statics[i];
                if !st.complained {
                    log::warn!("static peer {spec} is not reachable yet: {e}");
                    st.complained = true;
                } else {
                    log::debug!("static peer {spec}: {e}");
                }
                return;
            }
        };
        self.statics[i].identified = Some(id.clone());
        self.statics[i].complained = false;
        if id == self.me.install_id {
            log::debug!("static peer {spec} is this server");
            return;
        }
        if !self.room_for(&id) {
            return;
        }
        let p = self.peers.entry(id.clone()).or_insert_with(|| {
            log::info!("static peer {spec} is {} at {addr}", short(&id));
            Peer::new(&id, spec, addr.ip(), addr.port(), "static")
        });
        p.source = "static";
        if p.status != PeerStatus::Connected {
            p.address = addr.ip();
            p.port = addr.port();
        }
        self.dial(&id);
    }

    /// A peer named itself on a request to us: dial it back, as for a fresh beacon.
    fn on_inbound(&mut self, id: &str, address: IpAddr, port: u16) {
        if id == self.me.install_id || !self.room_for(id) {
            return;
        }
        let p = self.peers.entry(id.to_string()).or_insert_with(|| {
            log::info!(
                "learned peer {} from its connection from {address}:{port}",
                short(id)
            );
            Peer::new(id, "", address, port, "exchange")
        });
        p.last_activity = Instant::now();
        p.last_seen = util::now_ms();
        if p.status == PeerStatus::Connected {
            return;
        }
        if p.address != address || p.port != port {
            log::info!("peer {} is now at {address}:{port}", p.label());
            p.address = address;
            p.port = port;
        }
        p.status = PeerStatus::Connecting;
        self.dial(id);
    }

    /// Dials the peers a peer is connected to that we do not know yet.
    fn on_exchange(&mut self, from: &str, entries: Vec<ExchangeEntry>) {
        for e in entries {
            if e.status != "connected"
                || e.install_id == self.me.install_id
                || !util::is_uuid(&e.install_id)
                || self.peers.contains_key(&e.install_id)
            {
                continue;
            }
            let Ok(address) = e.address.parse::<IpAddr>() else {
                continue;
            };
            if e.port == 0 || !self.room_for(&e.install_id) {
                continue;
            }
            log::info!(
                "learned peer {} ({}, {address}:{}) from peer {}",
                e.name,
                short(&e.install_id),
                e.port,
                short(from)
            );
            let p = Peer::new(&e.install_id, &e.name, address, e.port, "exchange");
            self.peers.insert(e.install_id.clone(), p);
            self.dial(&e.install_id);
        }
    }

    /// Whether `id` is in the table or there is room for it (256 peers at most).
    fn room_for(&mut self, id: &str) -> bool {
        if self.peers.contains_key(id) || self.peers.len() < proto::MAX_PEERS {
            return true;
        }
        if !self.peer_table_full_warned {
            log::warn!(
                "peer table full ({} peers); ignoring new peers",
                proto::MAX_PEERS
            );
            self.peer_table_full_warned = true;
        }
        false
    }

    fn reload(&mut self, r: Reload) {
        crate::logging::set_level(r.log_level);
        let changed = {
            let cur = self.keys.read();
            cur.as_ref().map(|k| k.bearer.clone()) != r.keys.as_ref().map(|k| k.bearer.clone())
        };
        if !changed {
            log::info!("reloaded (cluster PIN unchanged)");
            return;
        }
        let had = self.keys.read().is_some();
        *self.keys.write() = r.keys;
        log::info!(
            "reloaded: cluster PIN {}; re-establishing every peer connection",
            if had { "changed" } else { "set" }
        );
        // Streams authenticated with the old bearer end; peers are re-trusted.
        self.subs.clear();
        let ids: Vec<String> = self.peers.keys().cloned().collect();
        for id in &ids {
            if let Some(p) = self.peers.get_mut(id) {
                if let Some((_, ctl)) = p.thread.take() {
                    let _ = ctl.send(PeerCtl::Stop);
                }
                if p.status == PeerStatus::Connected {
                    p.status = PeerStatus::Disconnected;
                    p.connected_since = None;
                }
            }
            self.set_stale(id, true);
            if self.keys.read().is_some() {
                self.dial(id);
            }
        }
        self.next_beacon = Instant::now();
    }

    fn shutdown(&mut self, rx: &Receiver<Event>) {
        log::info!("shutting down");
        crate::systemd::notify("STOPPING=1");
        if self.beacons_on() {
            self.send_beacon(beacon::STATE_LEAVING);
        }
        self.subs.clear();
        for p in self.peers.values_mut() {
            if let Some((_, ctl)) = p.thread.take() {
                let _ = ctl.send(PeerCtl::Stop);
            }
        }
        // Flush: wait for a write in progress, then write what is left.
        let (tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        if self.dirty || !self.pending_acks.is_empty() {
            self.dirty = true;
            self.persist_busy = false;
            self.maybe_persist();
        }
        self.save_known();
        let _ = self.store.send(Job {
            write: None,
            done: vec![Box::new(move |_| {
                let _ = tx.send(());
            })],
        });
        if done_rx.recv_timeout(Duration::from_millis(1500)).is_ok() {
            // The store thread ran its jobs in order: the results of the writes in
            // flight are queued for this thread by now.
            let mut result = Ok(());
            while let Ok(ev) = rx.try_recv() {
                if let Event::Persisted(Err(e)) = ev {
                    result = Err(e);
                }
            }
            for a in std::mem::take(&mut self.acks_in_flight) {
                a(result.clone());
            }
        }
    }
}
