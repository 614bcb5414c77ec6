//! The event stream of PROTOCOL §6, read as a client would.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use krill::sse::Reader;
use serde_json::{Value, json};

fn stream(d: &Daemon, query: &str, last_id: Option<&str>) -> Reader<Box<dyn Read + Send + Sync>> {
    let mut req = d
        .agent()
        .get(&d.url(&format!("/sse{query}")))
        .set("Authorization", &format!("Bearer {}", d.bearer()));
    if let Some(id) = last_id {
        req = req.set("Last-Event-ID", id);
    }
    let r = req.call().unwrap();
    assert_eq!(r.header("Content-Type"), Some("text/event-stream"));
    Reader::new(r.into_reader())
}

fn next(r: &mut Reader<Box<dyn Read + Send + Sync>>) -> (String, String, Value) {
    let e = r.next_event().unwrap().expect("an event");
    (
        e.id.unwrap(),
        e.event,
        serde_json::from_str(&e.data).unwrap(),
    )
}

#[test]
fn snapshot_events_ids_and_resume() {
    let root = TempDir::new("sse");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    let session = d.get("/health")["sessionId"].as_str().unwrap().to_string();

    let mut r = stream(&d, "", None);
    let (id, ev, data) = next(&mut r);
    assert_eq!(ev, "snapshot");
    assert_eq!(id, format!("{session}:0"), "seq 0 before any change");
    assert_eq!(data["host"], d.install_id());
    assert_eq!(data["sessionId"], session.as_str());
    assert_eq!(
        data["nodes"][0]["type"], "Server",
        "the Server node exists from the start"
    );

    let (s, _) = d.call(
        "PUT",
        "/nodes/p",
        Some(&json!({"type":"DataPoint","name":"p","meta":{"value":1}})),
    );
    assert_eq!(s, 201);
    for v in 2..=4 {
        let (s, _) = d.call("POST", "/nodes/p/value", Some(&json!({ "value": v })));
        assert_eq!(s, 200);
    }
    let mut ids = Vec::new();
    for want in 1..=4 {
        let (id, ev, data) = next(&mut r);
        assert_eq!(ev, "node");
        assert_eq!(data["meta"]["value"], json!(want));
        assert_eq!(data["version"], json!(want));
        ids.push(id);
    }
    assert_eq!(ids[0], format!("{session}:1"));
    assert_eq!(ids[3], format!("{session}:4"));
    let (s, _) = d.call("DELETE", "/nodes/p", None);
    assert_eq!(s, 204);
    let (id, ev, data) = next(&mut r);
    assert_eq!(
        (id.as_str(), ev.as_str()),
        (format!("{session}:5").as_str(), "delete")
    );
    assert_eq!(data, json!({"id": "p", "host": d.install_id()}));

    // Resume after event 2: exactly events 3, 4, 5 follow, no snapshot.
    let mut r2 = stream(&d, "", Some(&ids[1]));
    let got: Vec<String> = (0..3).map(|_| next(&mut r2).0).collect();
    assert_eq!(
        got,
        vec![ids[2].clone(), ids[3].clone(), format!("{session}:5")]
    );

    // An id of another session gets a fresh snapshot.
    let mut r3 = stream(&d, "", Some("00000000-0000-4000-8000-000000000000:3"));
    assert_eq!(next(&mut r3).1, "snapshot");
    // And after a restart the old session's id does too.
    d.kill9();
    d.start();
    let mut r4 = stream(&d, "", Some(&ids[3]));
    let (id, ev, _) = next(&mut r4);
    assert_eq!(ev, "snapshot");
    assert!(!id.starts_with(&session));
}

#[test]
fn keepalive_comments_flow_on_a_quiet_stream() {
    let root = TempDir::new("ka");
    let mut d = Daemon::new(
        &root.0,
        "a",
        "1234",
        free_udp_port(),
        "sse_keepalive_ms = 200",
    );
    d.start();
    let r = d
        .agent()
        .get(&d.url("/sse"))
        .set("Authorization", &format!("Bearer {}", d.bearer()))
        .call()
        .unwrap();
    let mut body = r.into_reader();
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_millis(1100) {
        let n = body.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended");
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    let comments = text.matches("\n:\n\n").count() + usize::from(text.starts_with(":\n\n"));
    assert!(
        (3..=7).contains(&comments),
        "about 5 keep-alives in 1.1 s at 200 ms, got {comments}: {text}"
    );
}

#[test]
fn scope_all_carries_mirrored_nodes_without_gaps() {
    let root = TempDir::new("scope");
    let bp = free_udp_port();
    let ds = meshed(&root.0, &["a", "b"], "1234", bp);
    let (a, b) = (&ds[0], &ds[1]);
    // "connected" is reported when the stream opens, a moment before its snapshot
    // is applied: wait for the mirror itself.
    assert!(
        wait_until(Duration::from_secs(2), || !b
            .node(&a.install_id())
            .is_null())
        .is_some()
    );
    let mut all = stream(b, "?scope=all", None);
    let (_, ev, snap) = next(&mut all);
    assert_eq!(ev, "snapshot");
    let hosts: Vec<&str> = snap["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["host"].as_str())
        .collect();
    assert!(
        hosts.contains(&a.install_id().as_str()),
        "mirrored Server node of a in b's full snapshot"
    );
    let mut own = stream(b, "", None);
    let (_, _, snap_own) = next(&mut own);
    assert_eq!(
        snap_own["nodes"].as_array().unwrap().len(),
        1,
        "own scope: only b's Server node"
    );

    let (s, _) = a.call(
        "PUT",
        "/nodes/x",
        Some(&json!({"type":"DataPoint","name":"x","meta":{"value":7}})),
    );
    assert_eq!(s, 201);
    let (id1, ev, data) = next(&mut all);
    assert_eq!(
        (ev.as_str(), data["id"].as_str(), data["host"].as_str()),
        ("node", Some("x"), Some(a.install_id().as_str()))
    );
    let (s, _) = b.call(
        "PUT",
        "/nodes/y",
        Some(&json!({"type":"DataPoint","name":"y"})),
    );
    assert_eq!(s, 201);
    let (id2, _, data) = next(&mut all);
    assert_eq!(data["id"], "y");
    let seq = |id: &str| id.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(seq(&id2), seq(&id1) + 1, "scope=all ids run without gaps");
    // The own-scope stream skipped a's node and shows b's.
    let (_, _, data) = next(&mut own);
    assert_eq!(data["id"], "y");
}

#[test]
fn a_subscriber_that_never_reads_is_dropped_not_buffered() {
    use std::io::Write;
    let root = TempDir::new("slow");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    // A client with a tiny receive buffer that reads nothing after its request.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], d.port)).into())
        .unwrap();
    let tcp: std::net::TcpStream = sock.into();
    let mut tls = tls_client(&d, tcp);
    write!(
        tls,
        "GET /sse?scope=all HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        d.bearer()
    )
    .unwrap();
    tls.flush().unwrap();
    let (s, _) = d.call(
        "PUT",
        "/nodes/v",
        Some(&json!({"type":"DataPoint","name":"v","meta":{"value":"x"}})),
    );
    assert_eq!(s, 201);
    // Push events until the server gives up on the stalled stream.
    let pad = "p".repeat(2000);
    let dropped = || d.log().contains("cannot keep up");
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for w in 0..8 {
            let (d, pad) = (&d, &pad);
            sc.spawn(move || {
                let agent = d.agent();
                let auth = format!("Bearer {}", d.bearer());
                for i in 0..2000 {
                    if i % 50 == 0 && d.log().contains("cannot keep up") {
                        return;
                    }
                    let body = json!({ "value": format!("{w}-{i}-{pad}") }).to_string();
                    let r = agent
                        .post(&d.url("/nodes/v/value"))
                        .set("Authorization", &auth)
                        .send_string(&body);
                    assert!(r.is_ok(), "{r:?}");
                }
            });
        }
    });
    assert!(
        dropped(),
        "a stalled subscriber was never dropped:\n{}",
        d.log()
    );
    measured(
        "stalled SSE subscriber dropped after pushing updates for",
        t0.elapsed(),
    );
    // The server is fine and still serves others.
    assert_eq!(d.call("GET", "/health", None).0, 200);
    let mut r = stream(&d, "", None);
    assert_eq!(next(&mut r).1, "snapshot");
    drop(tls);
}
