//! Load generator for `scripts/bench`: posts values to one server's DataPoint over
//! keep-alive HTTPS connections and, at the same time, reads the `/sse?scope=all`
//! stream of every other server, to check that each acknowledged value reached
//! every one of them.
//!
//! ```text
//! krill-load --post ADDR:PORT --watch ADDR:PORT[,ADDR:PORT...] --bearer TOKEN
//!            --node ID [--conns 32] [--secs 5] [--rate 0] [--batch 1]
//! ```
//! `--rate` is the offered total rate in updates/s (0: as fast as acknowledged).
//! `--batch K` sends K values per request with `POST /values` instead of one
//! `POST /nodes/{id}/value` each.
//! Prints one JSON line: offered and acknowledged rates, errors, and per watcher how
//! many acknowledged values it never saw and how many snapshots (resyncs) it got.
//! Values are unique integers: connection `c` of `C` posts `c, c+C, c+2C, ...`.

use krill::tls::{Verifier, agent};
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Args {
    post: String,
    watch: Vec<String>,
    bearer: String,
    node: String,
    conns: usize,
    secs: f64,
    rate: f64,
    batch: usize,
}

fn args() -> Args {
    let mut a = Args {
        post: String::new(),
        watch: Vec::new(),
        bearer: String::new(),
        node: String::new(),
        conns: 32,
        secs: 5.0,
        rate: 0.0,
        batch: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--post" => a.post = v,
            "--watch" => a.watch = v.split(',').map(str::to_string).collect(),
            "--bearer" => a.bearer = v,
            "--node" => a.node = v,
            "--conns" => a.conns = v.parse().unwrap_or_else(|_| die("--conns: a number")),
            "--secs" => a.secs = v.parse().unwrap_or_else(|_| die("--secs: a number")),
            "--batch" => a.batch = v.parse().unwrap_or_else(|_| die("--batch: a number")),
            "--rate" => a.rate = v.parse().unwrap_or_else(|_| die("--rate: a number")),
            _ => die(&format!("unknown option {k}")),
        }
    }
    if a.post.is_empty() || a.bearer.is_empty() || a.node.is_empty() || a.conns == 0 {
        die("--post, --bearer and --node are required");
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("krill-load: {msg}");
    std::process::exit(2)
}

/// Bit set of the values seen.
#[derive(Default, Clone)]
struct Seen(Vec<u64>);

impl Seen {
    fn insert(&mut self, v: u64) {
        let (w, b) = ((v / 64) as usize, v % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << b;
    }
    fn has(&self, v: u64) -> bool {
        let (w, b) = ((v / 64) as usize, v % 64);
        self.0.get(w).is_some_and(|x| x & (1 << b) != 0)
    }
}

#[derive(serde::Deserialize)]
struct Meta {
    value: serde_json::Value,
}
#[derive(serde::Deserialize)]
struct NodeLite {
    id: String,
    meta: Meta,
}
#[derive(serde::Deserialize)]
struct Snapshot {
    nodes: Vec<NodeLite>,
}

/// Reads one server's stream until `stop`, recording every value of `node`.
fn watch(addr: String, bearer: String, node: String) -> (Seen, u64, u64) {
    let a = agent(
        Verifier::first_seen(),
        Duration::from_secs(3),
        Duration::from_secs(3),
    );
    let r = a
        .get(&format!("https://{addr}/sse?scope=all"))
        .set("Authorization", &format!("Bearer {bearer}"))
        .call()
        .unwrap_or_else(|e| die(&format!("watch {addr}: {e}")));
    let mut rd = krill::sse::Reader::new(r.into_reader());
    let (mut seen, mut snapshots, mut events) = (Seen::default(), 0u64, 0u64);
    let stop = AtomicBool::new(false);
    // Comments (keep-alives) never end `next_event`, so the poster ends each watcher
    // by setting the value "end" once it is done.
    let note = |n: &NodeLite, seen: &mut Seen| {
        if n.id == node {
            if let Some(v) = n.meta.value.as_u64() {
                seen.insert(v);
            }
            if n.meta.value == "end" {
                stop.store(true, Ordering::Relaxed);
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match rd.next_event() {
            Ok(Some(ev)) if ev.event == "node" => {
                events += 1;
                if let Ok(n) = serde_json::from_str::<NodeLite>(&ev.data) {
                    note(&n, &mut seen);
                }
            }
            Ok(Some(ev)) if ev.event == "snapshot" => {
                snapshots += 1;
                if let Ok(s) = serde_json::from_str::<Snapshot>(&ev.data) {
                    for n in &s.nodes {
                        note(n, &mut seen);
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                eprintln!("krill-load: watch {addr}: {e}");
                break;
            }
        }
    }
    (seen, snapshots, events)
}

/// Posts values `c, c+conns, ...` until the deadline, paced to `per_conn` updates/s
/// when that is not zero. Returns the acknowledged values and the errors.
fn post(a: &Args, c: usize, start: Instant, deadline: Instant) -> (Vec<u64>, u64) {
    let ag = agent(
        Verifier::first_seen(),
        Duration::from_secs(3),
        Duration::from_secs(10),
    );
    let url = if a.batch > 1 {
        format!("https://{}/values", a.post)
    } else {
        format!("https://{}/nodes/{}/value", a.post, a.node)
    };
    let auth = format!("Bearer {}", a.bearer);
    // Requests per second for this connection.
    let per_conn = a.rate / a.batch as f64 / a.conns as f64;
    let (mut acked, mut errors) = (Vec::new(), 0u64);
    let mut k = 0u64;
    loop {
        if per_conn > 0.0 {
            let due = start + Duration::from_secs_f64(k as f64 / per_conn);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        let values: Vec<u64> = (0..a.batch as u64)
            .map(|j| c as u64 + (k * a.batch as u64 + j) * a.conns as u64)
            .collect();
        k += 1;
        let body = if a.batch > 1 {
            let items: Vec<_> = values
                .iter()
                .map(|v| serde_json::json!({"id": a.node, "value": v}))
                .collect();
            serde_json::json!({ "values": items }).to_string()
        } else {
            format!("{{\"value\":{}}}", values[0])
        };
        match ag
            .post(&url)
            .set("Authorization", &auth)
            .set("Content-Type", "application/json")
            .send_string(&body)
        {
            Ok(r) => {
                let mut sink = Vec::new();
                let _ = r.into_reader().read_to_end(&mut sink);
                acked.extend(values);
            }
            Err(e) => {
                if errors == 0 {
                    eprintln!("krill-load: post: {e}");
                }
                errors += 1;
            }
        }
    }
    (acked, errors)
}

fn main() {
    let a = Arc::new(args());
    let watchers: Vec<_> = a
        .watch
        .iter()
        .map(|w| {
            let (w, b, n) = (w.clone(), a.bearer.clone(), a.node.clone());
            std::thread::spawn(move || watch(w, b, n))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.secs);
    let posters: Vec<_> = (0..a.conns)
        .map(|c| {
            let a = a.clone();
            std::thread::spawn(move || post(&a, c, start, deadline))
        })
        .collect();
    let (mut acked, mut errors) = (Vec::new(), 0);
    for p in posters {
        let (v, e) = p.join().expect("poster");
        acked.extend(v);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last values arrive everywhere, then end the watchers.
    std::thread::sleep(Duration::from_secs(2));
    let ag = agent(
        Verifier::first_seen(),
        Duration::from_secs(3),
        Duration::from_secs(10),
    );
    if let Err(e) = ag
        .post(&format!("https://{}/nodes/{}/value", a.post, a.node))
        .set("Authorization", &format!("Bearer {}", a.bearer))
        .send_string("{\"value\":\"end\"}")
    {
        die(&format!("cannot post the end marker: {e}"));
    }
    let mut out = HashMap::new();
    for (w, h) in a.watch.iter().zip(watchers) {
        let (seen, snapshots, events) = h.join().expect("watcher");
        let missing = acked.iter().filter(|v| !seen.has(**v)).count();
        out.insert(
            w.clone(),
            serde_json::json!({"missing": missing, "snapshots": snapshots, "events": events}),
        );
    }
    let line = serde_json::json!({
        "offered": a.rate,
        "batch": a.batch,
        "conns": a.conns,
        "acked": acked.len(),
        "rate": acked.len() as f64 / elapsed,
        "errors": errors,
        "secs": elapsed,
        "watchers": out,
    });
    println!("{line}");
}
