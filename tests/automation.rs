//! Nodes and cross-server automation (issue 5), as real processes on loopback.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use crossbeam_channel::Receiver;
use serde_json::{Value, json};

/// A local HTTP server that records what webhooks send it.
struct Receiver_ {
    url: String,
    rx: Receiver<(Instant, String, String)>,
}

fn webhook_receiver() -> Receiver_ {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for mut rq in server.incoming_requests() {
            let mut body = String::new();
            let _ = rq.as_reader().read_to_string(&mut body);
            let _ = tx.send((Instant::now(), rq.url().to_string(), body));
            let _ = rq.respond(tiny_http::Response::from_string("ok"));
        }
    });
    Receiver_ {
        url: format!("http://127.0.0.1:{port}"),
        rx,
    }
}

fn put(d: &Daemon, id: &str, body: Value) -> Value {
    let (s, v) = d.call("PUT", &format!("/nodes/{id}"), Some(&body));
    assert!(s == 201 || s == 200, "PUT {id} on {}: {s} {v}", d.name);
    v
}

fn set(d: &Daemon, id: &str, value: Value) {
    let (s, v) = d.call(
        "POST",
        &format!("/nodes/{id}/value"),
        Some(&json!({ "value": value })),
    );
    assert_eq!(s, 200, "set {id} on {}: {v}", d.name);
}

fn r(d: &Daemon, id: &str) -> Value {
    json!({"host": d.install_id(), "id": id})
}

#[test]
fn the_seed_scenario_temperature_ac_and_dashboard_webhook() {
    let root = TempDir::new("seed");
    let hook = webhook_receiver();
    let ds = meshed(&root.0, &["a", "b", "c"], "1234", free_udp_port());
    let (a, b, c) = (&ds[0], &ds[1], &ds[2]);

    // Server A (living room): the temperature.
    put(
        a,
        "temp",
        json!({"type":"DataPoint","name":"Living room temperature","meta":{"value":21.0,"unit":"°C"}}),
    );
    // Server B (bedroom): its own reading, the AC, and a trigger on A's temperature.
    put(
        b,
        "bedtemp",
        json!({"type":"DataPoint","name":"Bedroom temperature","meta":{"value":20.0,"unit":"°C"}}),
    );
    put(
        b,
        "ac",
        json!({"type":"DataPoint","name":"AC","meta":{"value":false}}),
    );
    put(
        b,
        "ac-on",
        json!({"type":"Executor.SetValue","name":"AC on","meta":{"target":r(b, "ac"),"value":true}}),
    );
    put(
        b,
        "too-hot",
        json!({"type":"Trigger.HighThreshold","name":"Too hot","meta":{
        "source":r(a, "temp"),"threshold":25,"hysteresis":1,"targets":[r(b, "ac-on")]}}),
    );
    // Server C (central): the average of the rooms, posted to a dashboard.
    put(
        c,
        "dash",
        json!({"type":"OutgoingWebHook","name":"Dashboard","meta":{
        "url":format!("{}/dashboard", hook.url),"body":r#"{"average":{value},"from":"{name}"}"#}}),
    );
    let avg = put(
        c,
        "avg",
        json!({"type":"Compute","name":"Average temperature","meta":{
        "inputs":[r(a, "temp"), r(b, "bedtemp")],"op":"avg","targets":[r(c, "dash")]}}),
    );
    // The compute needs the mirrors of A and B; it settles on 20.5 once they arrive.
    assert!(avg["meta"].get("value").is_some());
    let t = wait_until(Duration::from_secs(2), || {
        c.node("avg")["meta"]["value"] == json!(20.5)
    });
    assert!(t.is_some(), "average of 21 and 20: {}", c.node("avg"));
    while hook.rx.try_recv().is_ok() {}
    assert_eq!(
        b.node("ac")["meta"]["value"],
        json!(false),
        "not yet too hot"
    );

    // It gets hot in the living room.
    let t0 = Instant::now();
    set(a, "temp", json!(27.0));
    let ac = wait_until(Duration::from_secs(2), || {
        b.node("ac")["meta"]["value"] == json!(true)
    });
    assert!(
        ac.is_some(),
        "B's AC was not turned on within 2 s:\n{}",
        b.log()
    );
    measured("seed: temperature on A -> AC on B", t0.elapsed());
    let (at, path, body) = hook
        .rx
        .recv_timeout(Duration::from_secs(2))
        .expect("the dashboard webhook within 2 s");
    assert_eq!(path, "/dashboard");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"average": 23.5, "from": "Average temperature"})
    );
    measured("seed: temperature on A -> webhook from C", at - t0);
    // The AC state shows everywhere, and the trigger fired once.
    assert!(
        wait_until(Duration::from_secs(1), || a.node("ac")["meta"]["value"]
            == json!(true))
        .is_some()
    );
    let trig = b.node("too-hot");
    assert_eq!(
        (trig["state"].as_str(), trig["meta"]["armed"].as_bool()),
        (Some("EXECUTED"), Some(false))
    );
    assert_eq!(c.node("dash")["state"], "EXECUTED");
    assert_eq!(c.node("dash")["meta"]["lastStatus"], 200);

    // Hovering at the threshold does not fire again (edge + hysteresis).
    set(b, "ac", json!(false));
    for v in [25.5, 24.5, 25.2, 24.2, 26.0] {
        set(a, "temp", json!(v));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        b.node("ac")["meta"]["value"],
        json!(false),
        "no re-fire without falling below 24"
    );
    set(a, "temp", json!(23.0));
    set(a, "temp", json!(26.0));
    assert!(
        wait_until(Duration::from_secs(2), || b.node("ac")["meta"]["value"]
            == json!(true))
        .is_some(),
        "re-armed, fired"
    );

    // Compute goes WARN when an input's server is gone, over what is left.
    let mut ds = ds;
    ds[0].kill9();
    let c = &ds[2];
    let t = wait_until(Duration::from_secs(3), || {
        let n = c.node("avg");
        n["state"] == "WARN" && n["meta"]["value"] == json!(20.0)
    });
    assert!(t.is_some(), "compute without A: {}", c.node("avg"));
}

#[test]
fn acknowledged_updates_survive_sigkill_at_a_random_moment() {
    let root = TempDir::new("durable");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    const NODES: usize = 10;
    for i in 0..NODES {
        put(
            &d,
            &format!("n{i}"),
            json!({"type":"DataPoint","name":format!("n{i}"),"meta":{"value":0}}),
        );
    }
    // First burst: 500 acknowledged updates.
    for k in 1..=500u64 {
        set(&d, &format!("n{}", k as usize % NODES), json!(k));
    }
    // Second burst from 4 clients; a SIGKILL lands at a random moment in it.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..NODES).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut nanos = [0u8; 8];
    krill::util::random_bytes(&mut nanos);
    let kill_after = Duration::from_millis(200 + u64::from_le_bytes(nanos) % 800);
    let total = Arc::new(AtomicU64::new(0));
    std::thread::scope(|sc| {
        for w in 0..4u64 {
            let (d, acked, stop, total) = (&d, acked.clone(), stop.clone(), total.clone());
            sc.spawn(move || {
                let agent = d.agent();
                let auth = format!("Bearer {}", d.bearer());
                let mut k = 1000 + w;
                while !stop.load(Ordering::Relaxed) {
                    let node = (k as usize / 4) % NODES;
                    // Each client owns the nodes with node % 4 == w... values rise per node.
                    if node % 4 != w as usize {
                        k += 4;
                        continue;
                    }
                    let r = agent
                        .post(&d.url(&format!("/nodes/n{node}/value")))
                        .set("Authorization", &auth)
                        .send_string(&json!({ "value": k }).to_string());
                    match r {
                        Ok(resp) if resp.status() == 200 => {
                            acked[node].fetch_max(k, Ordering::SeqCst);
                            total.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return, // the server is gone
                    }
                    k += 4;
                }
            });
        }
        std::thread::sleep(kill_after);
        d.signal(libc::SIGKILL);
        stop.store(true, Ordering::Relaxed);
    });
    let _ = d.term_wait();
    println!(
        "second burst: {} acknowledged updates before SIGKILL at {kill_after:?}",
        total.load(Ordering::Relaxed)
    );
    assert!(
        total.load(Ordering::Relaxed) > 0,
        "the kill came before any update"
    );
    // What a crash mid-write leaves behind (the temp file of an atomic write) is
    // never read: start-up does not trip over it.
    let state = d.dir.join("state");
    std::fs::write(
        state.join(".nodes.json.tmp"),
        r#"{"version":1,"nodes":[{"id""#,
    )
    .unwrap();
    std::fs::write(state.join(".known_peers.json.tmp"), "{").unwrap();
    d.start();
    for (i, a) in acked.iter().enumerate() {
        let want = a.load(Ordering::SeqCst);
        let got = d.node(&format!("n{i}"))["meta"]["value"].as_u64().unwrap();
        assert!(
            got >= want,
            "n{i}: acknowledged {want}, found {got} after the crash"
        );
    }
    assert!(d.log().matches("krill 0.1.0 started").count() == 2);
}

/// A two-server run: 100 values set on a, each running the webhook at `url`
/// (through a compute over the value), each awaited on b.
struct HookRun {
    total: Duration,
    worst: Duration,
    ds: Vec<Daemon>,
    _root: TempDir,
}

fn propagation_with_webhook(tag: &str, url: &str) -> HookRun {
    let root = TempDir::new(tag);
    let ds = meshed(&root.0, &["a", "b"], "1234", free_udp_port());
    let (a, b) = (&ds[0], &ds[1]);
    put(
        a,
        "hook",
        json!({"type":"OutgoingWebHook","name":"hook","meta":{"url":url}}),
    );
    put(
        a,
        "x",
        json!({"type":"DataPoint","name":"x","meta":{"value":0}}),
    );
    put(
        a,
        "cx",
        json!({"type":"Compute","name":"cx","meta":{"inputs":[r(a, "x")],"op":"max","targets":[r(a, "hook")]}}),
    );
    let mut worst = Duration::ZERO;
    let t_all = Instant::now();
    for v in 1..=100 {
        let t0 = Instant::now();
        set(a, "x", json!(v));
        let seen = wait_until(Duration::from_secs(1), || {
            b.node("x")["meta"]["value"] == json!(v)
        });
        assert!(
            seen.is_some(),
            "{tag}: value {v} did not reach b within 1 s"
        );
        worst = worst.max(t0.elapsed());
    }
    HookRun {
        total: t_all.elapsed(),
        worst,
        ds,
        _root: root,
    }
}

#[test]
fn a_webhook_that_never_answers_does_not_slow_values() {
    // Baseline: a target that answers at once.
    let hook = webhook_receiver();
    let base = propagation_with_webhook("fasthook", &format!("{}/ok", hook.url));
    drop(base.ds);
    // A target that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/never", silent.local_addr().unwrap());
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            h.lock().push(s); // keep it open, say nothing
        }
    });
    let run = propagation_with_webhook("slowhook", &url);
    measured(
        "webhook answering: 100 values set and seen on the peer, total",
        base.total,
    );
    measured("webhook answering: worst set-to-seen latency", base.worst);
    measured(
        "webhook never answering: 100 values set and seen on the peer, total",
        run.total,
    );
    measured(
        "webhook never answering: worst set-to-seen latency",
        run.worst,
    );
    assert!(
        run.total < base.total * 2 + Duration::from_millis(500),
        "a hanging webhook slowed values: {:?} against {:?}",
        run.total,
        base.total
    );
    let a = &run.ds[0];
    // The webhook ends in ERROR with the reason, and it was counted.
    let t = wait_until(Duration::from_secs(8), || {
        a.node("hook")["state"] == "ERROR"
    });
    assert!(t.is_some(), "{}", a.node("hook"));
    let n = a.node("hook");
    assert!(n["meta"]["failures"].as_u64().unwrap() >= 1, "{n}");
    let reason = n["meta"]["lastError"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("timed out") || reason.contains("queue full"),
        "{n}"
    );
}

#[test]
fn a_refused_webhook_is_error_with_the_reason() {
    let root = TempDir::new("refused");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    let port = free_tcp_port(); // nothing listens there
    put(
        &d,
        "w",
        json!({"type":"OutgoingWebHook","name":"w","meta":{"url":format!("http://127.0.0.1:{port}/x")}}),
    );
    let (s, _) = d.call("POST", "/nodes/w/invoke", None);
    assert_eq!(s, 200);
    let t = wait_until(Duration::from_secs(3), || d.node("w")["state"] == "ERROR");
    assert!(t.is_some());
    let n = d.node("w");
    assert_eq!(n["meta"]["failures"], 1);
    assert!(
        n["meta"]["lastError"]
            .as_str()
            .unwrap()
            .contains("onnection refused"),
        "{n}"
    );
    assert!(d.log().contains("webhook w (w) failed"));
}

#[test]
fn a_loop_between_two_servers_is_cut() {
    // a's trigger on b's y sets a's x high; b's trigger on a's x sets b's y low;
    // two more triggers flip them back: an endless ping-pong without a hop limit.
    let root = TempDir::new("loop");
    let ds = meshed(&root.0, &["a", "b"], "1234", free_udp_port());
    let (a, b) = (&ds[0], &ds[1]);
    put(
        a,
        "x",
        json!({"type":"DataPoint","name":"x","meta":{"value":0}}),
    );
    put(
        b,
        "y",
        json!({"type":"DataPoint","name":"y","meta":{"value":0}}),
    );
    put(
        a,
        "x1",
        json!({"type":"Executor.SetValue","name":"x1","meta":{"target":r(a, "x"),"value":1}}),
    );
    put(
        a,
        "x0",
        json!({"type":"Executor.SetValue","name":"x0","meta":{"target":r(a, "x"),"value":0}}),
    );
    put(
        b,
        "y1",
        json!({"type":"Executor.SetValue","name":"y1","meta":{"target":r(b, "y"),"value":1}}),
    );
    put(
        b,
        "y0",
        json!({"type":"Executor.SetValue","name":"y0","meta":{"target":r(b, "y"),"value":0}}),
    );
    // x goes 1 -> y goes 1 -> x goes 0 -> y goes 0 -> x goes 1 ...
    put(
        b,
        "t1",
        json!({"type":"Trigger.HighThreshold","name":"t1","meta":{"source":r(a, "x"),"threshold":1,"targets":[r(b, "y1")]}}),
    );
    put(
        a,
        "t2",
        json!({"type":"Trigger.HighThreshold","name":"t2","meta":{"source":r(b, "y"),"threshold":1,"targets":[r(a, "x0")]}}),
    );
    put(
        b,
        "t3",
        json!({"type":"Trigger.LowThreshold","name":"t3","meta":{"source":r(a, "x"),"threshold":0,"targets":[r(b, "y0")]}}),
    );
    put(
        a,
        "t4",
        json!({"type":"Trigger.LowThreshold","name":"t4","meta":{"source":r(b, "y"),"threshold":0,"targets":[r(a, "x1")]}}),
    );
    // The low triggers fired at creation (x and y are 0): the loop is already
    // running; it must stop by itself.
    let quiet = wait_until(Duration::from_secs(10), || {
        let v1 = a.node("x")["version"].clone();
        std::thread::sleep(Duration::from_millis(500));
        a.node("x")["version"] == v1
    });
    assert!(quiet.is_some(), "the loop never stopped");
    let logs = a.log() + &b.log();
    assert!(
        logs.contains("automation chain cut after 16 hops"),
        "{logs}"
    );
    // Both servers are fine.
    assert_eq!(a.call("GET", "/health", None).0, 200);
    assert_eq!(b.call("GET", "/health", None).0, 200);
    // A person's change starts a fresh chain (hops 0): accepted (set asserts 200),
    // and the chain it starts is cut again.
    let cuts = |l: &str| l.matches("automation chain cut").count();
    let before = cuts(&(a.log() + &b.log()));
    set(a, "x", json!(5));
    let again = wait_until(Duration::from_secs(5), || {
        cuts(&(a.log() + &b.log())) > before
    });
    assert!(again.is_some(), "the new chain was cut too");
}

#[test]
fn krill_nodes_set_and_invoke_handle_every_type() {
    let root = TempDir::new("clitypes");
    let hook = webhook_receiver();
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    put(
        &d,
        "lamp",
        json!({"type":"DataPoint","name":"Lamp","meta":{"value":false}}),
    );
    put(
        &d,
        "temp",
        json!({"type":"DataPoint","name":"Temp","meta":{"value":19.5,"unit":"°C"}}),
    );
    put(
        &d,
        "on",
        json!({"type":"Executor.SetValue","name":"Lamp on","meta":{"target":r(&d, "lamp"),"value":true}}),
    );
    put(
        &d,
        "cold",
        json!({"type":"Trigger.LowThreshold","name":"Cold","meta":{"source":r(&d, "temp"),"threshold":10,"targets":[r(&d, "on")]}}),
    );
    put(
        &d,
        "sum",
        json!({"type":"Compute","name":"Sum","meta":{"inputs":[r(&d, "temp")],"op":"sum"}}),
    );
    put(
        &d,
        "hook",
        json!({"type":"OutgoingWebHook","name":"Hook","meta":{"url":format!("{}/h", hook.url),"body":"{name}={value}"}}),
    );
    let out = d.cli(&["nodes"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "19.5 °C",
        "temp@",
        "<= 10",
        "lamp@",
        "= true",
        "19.5 = sum(temp@",
        "POST http://127.0.0.1",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    // set works for data points; for an executor it says to invoke instead.
    assert!(d.cli(&["set", "temp", "21"]).status.success());
    let out = d.cli(&["set", "on", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("krill invoke on"));
    // invoke runs an executor, a webhook, a compute, a trigger.
    assert!(d.cli(&["invoke", "on"]).status.success());
    assert_eq!(d.node("lamp")["meta"]["value"], json!(true));
    assert!(d.cli(&["invoke", "hook"]).status.success());
    let (_, _, body) = hook
        .rx
        .recv_timeout(Duration::from_secs(3))
        .expect("the webhook");
    assert_eq!(
        body, "Hook=null",
        "a person's invoke: the webhook itself is the invoker"
    );
    assert!(d.cli(&["invoke", "sum"]).status.success());
    assert!(d.cli(&["invoke", "cold"]).status.success());
    let out = d.cli(&["invoke", "temp"]);
    assert_eq!(out.status.code(), Some(1), "a DataPoint cannot be invoked");
    // Everything is still there after a restart.
    d.kill9();
    d.start();
    for id in ["lamp", "temp", "on", "cold", "sum", "hook"] {
        assert!(!d.node(id).is_null(), "{id} lost");
    }
    assert_eq!(d.node("sum")["meta"]["value"], json!(21.0));
}
