//! HTTPS routes (PROTOCOL §5) on tiny_http with rustls. Workers parse and
//! authenticate requests, then ask the state owner; `/sse` streams are handed to a
//! thread of their own so a long stream never holds a worker.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response};

use crate::config::Config;
use crate::proto;
use crate::sse;
use crate::state::{Call, Counters, Event, Reply, SharedKeys, SubReply};
use crate::tls::{self, Identity};
use crate::util::{self, short};

/// How long a worker waits for the state owner before answering 503.
const STATE_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Online-guessing limiter (PROTOCOL §9): 5 failed bearer checks from one address
/// within a minute lock it out of authenticated routes for a minute.
#[derive(Default)]
pub struct AuthLimiter {
    by_ip: HashMap<IpAddr, Strikes>,
}

#[derive(Default)]
struct Strikes {
    fails: VecDeque<Instant>,
    locked_until: Option<Instant>,
    warned_at: Option<Instant>,
}

impl Strikes {
    /// True when a warning for this address is due (once a minute at most).
    fn warn_due(&mut self, now: Instant) -> bool {
        if self
            .warned_at
            .is_none_or(|t| now.duration_since(t) >= proto::AUTH_WINDOW)
        {
            self.warned_at = Some(now);
            return true;
        }
        false
    }
}

/// What the limiter says about a request.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allowed,
    /// Locked out; `warn` when a log line is due.
    Locked {
        warn: bool,
    },
}

impl AuthLimiter {
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let Some(s) = self.by_ip.get_mut(&ip) else {
            return Verdict::Allowed;
        };
        match s.locked_until {
            Some(t) if now < t => Verdict::Locked {
                warn: s.warn_due(now),
            },
            _ => Verdict::Allowed,
        }
    }

    /// Records a failed check; true when this failure starts a lock-out and a
    /// warning is due.
    pub fn fail(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.by_ip.len() > 10_000 {
            self.by_ip.retain(|_, s| {
                s.locked_until.is_some_and(|t| t > now)
                    || s.fails
                        .back()
                        .is_some_and(|t| now.duration_since(*t) < proto::AUTH_WINDOW)
            });
        }
        let s = self.by_ip.entry(ip).or_default();
        s.fails.push_back(now);
        while s
            .fails
            .front()
            .is_some_and(|t| now.duration_since(*t) >= proto::AUTH_WINDOW)
        {
            s.fails.pop_front();
        }
        if s.fails.len() >= proto::AUTH_MAX_FAILURES {
            s.fails.clear();
            s.locked_until = Some(now + proto::AUTH_LOCKOUT);
            return s.warn_due(now);
        }
        false
    }
}

/// What every worker shares.
pub struct HttpCtx {
    pub install_id: String,
    pub identity: Identity,
    pub keys: SharedKeys,
    pub tx: Sender<Event>,
    pub counters: Arc<Counters>,
    pub keepalive: Duration,
    pub dial_timeout: Duration,
    pub state_dir: PathBuf,
    pub limiter: Mutex<AuthLimiter>,
}

/// Binds the listener and starts the workers. Fails with a clear message when the
/// address is taken or not ours.
pub fn start(cfg: &Config, ctx: Arc<HttpCtx>) -> Result<SocketAddr, String> {
    let addr = SocketAddr::new(cfg.bind, cfg.port);
    let listener = TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on {addr} (bind, port): {e}"))?;
    let ssl = tiny_http::SslConfig {
        certificate: ctx.identity.cert_pem.clone().into_bytes(),
        private_key: ctx.identity.key_pem.clone().into_bytes(),
    };
    let slots = Arc::new(Slots::new(cfg.http_threads));
    let handler: Arc<dyn Fn(Request) + Send + Sync> = Arc::new(move |rq| {
        let next = {
            let _slot = slots.acquire();
            route(&ctx, rq)
        };
        finish(&ctx, next);
    });
    let server = tiny_http::Server::from_listener_inline(listener, Some(ssl), handler)
        .map_err(|e| format!("cannot start HTTPS on {addr}: {e}"))?;
    // The server runs on its own threads until the process ends.
    std::mem::forget(server);
    Ok(addr)
}

/// At most `n` requests are routed at once (`http_threads`); waiting for the state
/// owner or another server does not hold a slot.
struct Slots {
    free: Mutex<usize>,
    cv: parking_lot::Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n.max(1)),
            cv: parking_lot::Condvar::new(),
        }
    }

    fn acquire(&self) -> Slot<'_> {
        let mut free = self.free.lock();
        while *free == 0 {
            self.cv.wait(&mut free);
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.cv.notify_one();
    }
}

fn json_response(status: u16, body: String) -> Response<std::io::Cursor<Vec<u8>>> {
    let r = Response::from_data(body.into_bytes()).with_status_code(status);
    if status == 204 {
        return r;
    }
    r.with_header(Header::from_bytes("Content-Type", "application/json").expect("valid header"))
}

fn respond(ctx: &HttpCtx, rq: Request, status: u16, body: String) -> Next {
    ctx.counters.add(&ctx.counters.data_sent, body.len() as u64);
    let _ = rq.respond(json_response(status, body));
    Next::Done
}

fn error(ctx: &HttpCtx, rq: Request, status: u16, msg: &str) -> Next {
    respond(ctx, rq, status, json!({ "error": msg }).to_string())
}

fn header<'a>(rq: &'a Request, name: &'static str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Minimal `%XX` decoding of a query value.
fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex_at = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (hex_at(i + 1), hex_at(i + 2)) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| pct_decode(v))
}

/// What is left of a request once it is routed: the parts that wait (for the state
/// owner, the disk, another server) and so do not hold an `http_threads` slot.
enum Next {
    Done,
    Call(Request, Call),
    Subscribe(Request, bool),
}

fn finish(ctx: &HttpCtx, next: Next) {
    match next {
        Next::Done => {}
        Next::Call(rq, call) => {
            call_state(ctx, rq, call);
        }
        Next::Subscribe(rq, all) => {
            subscribe(ctx, rq, all);
        }
    }
}

/// Authenticates, reads and checks a request; answers it when that is all there is
/// to do.
fn route(ctx: &HttpCtx, rq: Request) -> Next {
    let url = rq.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = rq.method().clone();
    let remote = rq.remote_addr().map(|a| a.ip());

    // Routes without authentication.
    match segs.as_slice() {
        ["livez"] => return respond(ctx, rq, 200, r#"{"status":"ok"}"#.into()),
        ["trust"] => {
            let Some(keys) = ctx.keys.read().clone() else {
                return error(ctx, rq, 503, "no cluster PIN set");
            };
            let proof = tls::proof(&keys.trust_key, &ctx.install_id, &ctx.identity.cert_der);
            let body = json!({"installId": ctx.install_id, "certPem": ctx.identity.cert_pem, "proof": proof});
            return respond(ctx, rq, 200, body.to_string());
        }
        _ => {}
    }
    let known = matches!(
        segs.as_slice(),
        ["health"]
            | ["sse"]
            | ["nodes"]
            | ["nodes", _]
            | ["nodes", _, "value" | "invoke"]
            | ["values"]
            | ["network", "peers" | "stats"]
    );
    if !known {
        return error(ctx, rq, 404, "no such route");
    }
    let Some(keys) = ctx.keys.read().clone() else {
        return error(ctx, rq, 503, "no cluster PIN set");
    };
    let ip = remote.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if let Verdict::Locked { warn } = ctx.limiter.lock().check(ip, Instant::now()) {
        if warn {
            log::warn!("{ip} is locked out for failed bearer tokens; answering 429");
        }
        return error(
            ctx,
            rq,
            429,
            "too many failed attempts; try again in a minute",
        );
    }
    let token = header(&rq, "Authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !util::ct_eq(token.trim().as_bytes(), keys.bearer.as_bytes()) {
        if ctx.limiter.lock().fail(ip, Instant::now()) {
            log::warn!(
                "{ip} failed {} bearer checks within a minute; locked out for a minute",
                proto::AUTH_MAX_FAILURES
            );
        }
        return error(ctx, rq, 401, "unauthorized");
    }
    // A peer names itself: the state owner dials it back at this source address.
    if let (Some(ip), Some((install_id, port))) = (
        remote,
        header(&rq, crate::peer::PEER_HEADER).and_then(crate::peer::parse_peer_header),
    ) {
        let _ = ctx.tx.send(Event::Inbound {
            install_id,
            address: ip,
            port,
        });
    }

    let call = match (&method, segs.as_slice()) {
        (Method::Get, ["health"]) => Call::Health {
            observed: remote.map(|a| a.to_string()).unwrap_or_default(),
        },
        (Method::Get, ["sse"]) => {
            return Next::Subscribe(rq, query_param(query, "scope").as_deref() == Some("all"));
        }
        (Method::Get, ["nodes"]) => Call::Nodes {
            host: query_param(query, "host"),
        },
        (Method::Get, ["nodes", id]) => Call::Node { id: id.to_string() },
        (Method::Put, ["nodes", id]) => {
            let id = id.to_string();
            match read_json(ctx, rq) {
                Ok((rq, body)) => return Next::Call(rq, Call::Put { id, body }),
                Err(()) => return Next::Done,
            }
        }
        (Method::Delete, ["nodes", id]) => Call::Delete { id: id.to_string() },
        (Method::Post, ["nodes", id, "value"]) => {
            let id = id.to_string();
            let (rq, body) = match read_json(ctx, rq) {
                Ok(x) => x,
                Err(()) => return Next::Done,
            };
            let hops = hops_of(&body);
            match crate::node::parse_value_body(&body) {
                Ok(value) => return Next::Call(rq, Call::SetValue { id, value, hops }),
                Err(e) => return error(ctx, rq, 400, &e),
            }
        }
        (Method::Post, ["values"]) => {
            let (rq, body) = match read_json(ctx, rq) {
                Ok(x) => x,
                Err(()) => return Next::Done,
            };
            match crate::node::parse_values_body(&body) {
                Ok(items) => return Next::Call(rq, Call::SetValues { items }),
                Err(e) => return error(ctx, rq, 400, &e),
            }
        }
        (Method::Post, ["nodes", id, "invoke"]) => {
            let id = id.to_string();
            // The body is optional: {"hops": n, "invoker": {...}} when a peer asks.
            let (rq, body) = match read_json_or_empty(ctx, rq) {
                Ok(x) => x,
                Err(()) => return Next::Done,
            };
            let invoker = body
                .get("invoker")
                .and_then(|v| serde_json::from_value(v.clone()).ok());
            return Next::Call(
                rq,
                Call::Invoke {
                    id,
                    hops: hops_of(&body),
                    invoker,
                },
            );
        }
        (Method::Get, ["network", "peers"]) => Call::Peers {
            healthy_only: query_param(query, "healthy").as_deref() == Some("true"),
        },
        (Method::Get, ["network", "stats"]) => Call::Stats,
        _ => {
            return error(
                ctx,
                rq,
                405,
                &format!("method {method} not allowed on {path}"),
            );
        }
    };
    Next::Call(rq, call)
}

/// The automation hop count a peer passed along (0 from a person or client).
fn hops_of(body: &Value) -> u32 {
    body.get("hops").and_then(Value::as_u64).map_or(0, |h| {
        h.min(u64::from(crate::automation::MAX_HOPS) + 1) as u32
    })
}

/// Reads a JSON body of at most 1 MiB; answers 413 or 400 itself on failure.
fn read_json(ctx: &HttpCtx, rq: Request) -> Result<(Request, Value), ()> {
    match read_json_or_empty(ctx, rq)? {
        (rq, Value::Null) => {
            error(ctx, rq, 400, "body is not JSON: it is empty");
            Err(())
        }
        x => Ok(x),
    }
}

/// Like [`read_json`], but an empty body is `Null`.
fn read_json_or_empty(ctx: &HttpCtx, mut rq: Request) -> Result<(Request, Value), ()> {
    if rq.body_length().is_some_and(|n| n > proto::MAX_BODY_BYTES) {
        error(ctx, rq, 413, "body over 1 MiB");
        return Err(());
    }
    let mut data = Vec::new();
    let read = rq
        .as_reader()
        .take(proto::MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut data);
    ctx.counters
        .add(&ctx.counters.data_received, data.len() as u64);
    if let Err(e) = read {
        error(ctx, rq, 400, &format!("cannot read body: {e}"));
        return Err(());
    }
    if data.len() > proto::MAX_BODY_BYTES {
        error(ctx, rq, 413, "body over 1 MiB");
        return Err(());
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok((rq, Value::Null));
    }
    match serde_json::from_slice(&data) {
        Ok(v) => Ok((rq, v)),
        Err(e) => {
            error(ctx, rq, 400, &format!("body is not JSON: {e}"));
            Err(())
        }
    }
}

fn call_state(ctx: &HttpCtx, rq: Request, call: Call) -> Next {
    let is_health = matches!(call, Call::Health { .. });
    let (tx, rx) = util::oneshot();
    if ctx
        .tx
        .send(Event::Call {
            call: Box::new(call),
            reply: tx,
        })
        .is_err()
    {
        return error(ctx, rq, 503, "shutting down");
    }
    match rx.recv_timeout(STATE_REPLY_TIMEOUT) {
        Some(Reply::Json { status, body }) => respond(ctx, rq, status, body),
        Some(Reply::Forward {
            install_id,
            name,
            address,
            port,
            path,
            body,
        }) => {
            let (status, body) = forward(
                ctx,
                &install_id,
                SocketAddr::new(address, port),
                &path,
                &body,
            )
            .unwrap_or_else(|e| {
                let msg = format!("owner {name} ({}) unreachable: {e}", short(&install_id));
                (502, json!({ "error": msg }).to_string())
            });
            respond(ctx, rq, status, body)
        }
        None if is_health => {
            let body = json!({"status": "degraded", "installId": ctx.install_id,
                "components": {"listener": "ok", "state": "not answering"}});
            respond(ctx, rq, 503, body.to_string())
        }
        None => error(ctx, rq, 503, "the state thread did not answer in time"),
    }
}

/// POSTs `body` to `path` on the owner over its pinned certificate.
fn forward(
    ctx: &HttpCtx,
    install_id: &str,
    to: SocketAddr,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let keys = ctx.keys.read().clone().ok_or("no cluster PIN set")?;
    crate::peer::post_pinned(
        &ctx.state_dir,
        install_id,
        to,
        path,
        body,
        &keys.bearer,
        ctx.dial_timeout,
    )
}

fn subscribe(ctx: &HttpCtx, rq: Request, all: bool) -> Next {
    let (tx, rx) = util::oneshot();
    let last_event_id = header(&rq, "Last-Event-ID").map(str::to_string);
    let ev = Event::Subscribe {
        scope_all: all,
        last_event_id,
        reply: tx,
    };
    if ctx.tx.send(ev).is_err() {
        return error(ctx, rq, 503, "shutting down");
    }
    match rx.recv_timeout(STATE_REPLY_TIMEOUT) {
        Some(SubReply::Ok { id, initial, rx }) => {
            let w = rq.into_detached_writer();
            let (counters, tx, keepalive) = (ctx.counters.clone(), ctx.tx.clone(), ctx.keepalive);
            let spawned = std::thread::Builder::new()
                .name(format!("sse-{id}"))
                .stack_size(crate::peer::PEER_STACK)
                .spawn(move || {
                    let _ = sse::serve(w, initial, rx, keepalive, &counters);
                    let _ = tx.send(Event::Unsubscribe(id));
                });
            if let Err(e) = spawned {
                log::error!("cannot start an SSE thread: {e}");
                let _ = ctx.tx.send(Event::Unsubscribe(id));
            }
            Next::Done
        }
        Some(SubReply::TooMany) => {
            let body = json!({"error": format!("too many SSE subscribers (max {})", proto::MAX_SSE_SUBSCRIBERS)});
            let r = json_response(503, body.to_string()).with_header(
                Header::from_bytes("Retry-After", proto::SSE_RETRY_AFTER_S.to_string())
                    .expect("valid header"),
            );
            let _ = rq.respond(r);
            Next::Done
        }
        None => error(ctx, rq, 503, "the state thread did not answer in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_out_for_a_minute() {
        let mut l = AuthLimiter::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.10".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(!l.fail(ip, t0 + Duration::from_secs(i)));
            assert_eq!(l.check(ip, t0 + Duration::from_secs(i)), Verdict::Allowed);
        }
        assert!(
            l.fail(ip, t0 + Duration::from_secs(5)),
            "5th failure locks and warns"
        );
        let t = t0 + Duration::from_secs(6);
        assert_eq!(
            l.check(ip, t),
            Verdict::Locked { warn: false },
            "warned already this minute"
        );
        assert_eq!(l.check(other, t), Verdict::Allowed, "per address");
        assert_eq!(
            l.check(ip, t0 + Duration::from_secs(66)),
            Verdict::Allowed,
            "a minute later"
        );
    }

    #[test]
    fn slow_failures_never_lock() {
        let mut l = AuthLimiter::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..20 {
            assert!(!l.fail(ip, t0 + Duration::from_secs(16 * i)));
        }
        assert_eq!(l.check(ip, t0 + Duration::from_secs(400)), Verdict::Allowed);
    }

    #[test]
    fn warns_once_a_minute_while_locked() {
        let mut l = AuthLimiter::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            l.fail(ip, t0);
        }
        assert_eq!(
            l.check(ip, t0 + Duration::from_secs(30)),
            Verdict::Locked { warn: false }
        );
        // Locked again by new failures right after expiry: a new warning is due.
        let t1 = t0 + Duration::from_secs(61);
        for _ in 0..4 {
            assert!(!l.fail(ip, t1));
        }
        assert!(l.fail(ip, t1));
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param("scope=all&x=1", "scope").as_deref(),
            Some("all")
        );
        assert_eq!(query_param("host=a%2Db", "host").as_deref(), Some("a-b"));
        assert_eq!(query_param("healthy", "healthy").as_deref(), Some(""));
        assert_eq!(query_param("", "x"), None);
        assert_eq!(pct_decode("%zz%4"), "%zz%4");
        assert_eq!(pct_decode("%é"), "%é", "no panic inside a UTF-8 character");
    }
}
