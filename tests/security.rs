//! Beacons that must be dropped, bearer checks, the lock-out, and the limits.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 0, 69);

/// A socket on the test cluster's beacon port, joined on loopback (shares the
/// port with the daemons through SO_REUSEPORT, as PROTOCOL §3 allows).
fn beacon_socket(port: u16) -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
        .unwrap();
    s.join_multicast_v4(&GROUP, &Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_loop_v4(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    s.into()
}

fn rejected(d: &Daemon) -> u64 {
    d.stats()["beacons_rejected"].as_u64().unwrap()
}

#[test]
fn forged_replayed_and_junk_beacons_are_dropped_and_counted() {
    let root = TempDir::new("beacons");
    let bp = free_udp_port();
    let sock = beacon_socket(bp);
    let ds = meshed(&root.0, &["a", "b"], "1234", bp);
    let (a, b) = (&ds[0], &ds[1]);

    // Capture a genuine beacon of a that b has certainly taken too: one sent after
    // the mesh formed (a beacon new to its receiver is indistinguishable from a fresh
    // one, and harmless: it only leads to a dial that /trust decides).
    let aid = a.install_id();
    let formed_at = krill::util::now_ms();
    let mut buf = [0u8; 2048];
    let captured: Value = loop {
        let (n, _) = sock.recv_from(&mut buf).expect("a beacon within 8 s");
        let v: Value = serde_json::from_slice(&buf[..n]).unwrap();
        if v["installId"] == aid && v["timestamp"].as_u64().unwrap() > formed_at {
            break v;
        }
    };
    assert_eq!(captured["v"], 1);
    assert_eq!(captured["clusterToken"].as_str().unwrap().len(), 16);
    std::thread::sleep(Duration::from_millis(200)); // b has taken it by now
    let to = SocketAddrV4::new(GROUP, bp);
    let send = |v: &[u8]| {
        sock.send_to(v, to).unwrap();
    };
    let expect_more_rejected = |before: u64, what: &str| {
        let t = wait_until(Duration::from_secs(2), || rejected(b) > before);
        assert!(t.is_some(), "{what} was not counted in beacons_rejected");
    };

    // 1. Exact replay of a captured beacon.
    let before = rejected(b);
    send(captured.to_string().as_bytes());
    expect_more_rejected(before, "replayed beacon");

    // 2. Captured beacon with another address/port (token binds every field).
    let mut forged = captured.clone();
    forged["port"] = json!(1);
    forged["timestamp"] = json!(captured["timestamp"].as_u64().unwrap() + 10);
    let before = rejected(b);
    send(forged.to_string().as_bytes());
    expect_more_rejected(before, "forged beacon");

    // 3. A stranger with a made-up token.
    let mut stranger = captured.clone();
    stranger["installId"] = json!(krill::util::uuid_v4());
    stranger["clusterToken"] = json!("0123456789abcdef");
    let before = rejected(b);
    send(stranger.to_string().as_bytes());
    expect_more_rejected(before, "beacon with a wrong token");
    assert!(b.peer(stranger["installId"].as_str().unwrap()).is_null());

    // 4. Junk, oversize, wrong version, missing field.
    let mut v2 = captured.clone();
    v2["v"] = json!(2);
    let mut missing = captured.clone();
    missing.as_object_mut().unwrap().remove("sessionId");
    for (what, bytes) in [
        ("junk", b"hello".to_vec()),
        ("oversize", vec![b'{'; 1500]),
        ("version 2", v2.to_string().into_bytes()),
        ("missing field", missing.to_string().into_bytes()),
    ] {
        let before = rejected(b);
        send(&bytes);
        expect_more_rejected(before, what);
    }

    // Nothing of it disturbed the mesh.
    assert_eq!(b.peer_status(&aid), "connected");
    assert_eq!(b.peer(&aid)["port"], a.port);
    assert!(
        b.log().contains("dropped beacon"),
        "drops are logged at debug"
    );
}

#[test]
fn wrong_tokens_get_401_then_the_address_is_locked_out() {
    let root = TempDir::new("lockout");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    let (s, body) = d.request_as("GET", "/health", None, None);
    assert_eq!((s, body.as_str()), (401, r#"{"error":"unauthorized"}"#));
    for _ in 0..4 {
        let (s, _) = d.request_as("GET", "/nodes", Some("0000"), None);
        assert_eq!(s, 401);
    }
    // Five failures within a minute: even the right token gets 429 now.
    let (s, _) = d.call("GET", "/health", None);
    assert_eq!(s, 429);
    let (s, _) = d.request_as("GET", "/network/peers", Some("x"), None);
    assert_eq!(s, 429);
    // /trust and /livez are never limited.
    assert_eq!(d.request_as("GET", "/livez", None, None).0, 200);
    assert_eq!(d.request_as("GET", "/trust", None, None).0, 200);
    let log = d.log();
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("127.0.0.1"))
        .count();
    assert_eq!(warns, 1, "one warning per address per minute:\n{log}");
    assert!(
        !log.contains(&d.bearer()),
        "the bearer never appears in the log"
    );
}

#[test]
fn limits_give_clear_errors_and_lose_nothing() {
    let root = TempDir::new("limits");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "max_nodes = 2");
    d.start();
    for id in ["n1", "n2"] {
        let (s, _) = d.call(
            "PUT",
            &format!("/nodes/{id}"),
            Some(&json!({"type":"DataPoint","name":id})),
        );
        assert_eq!(s, 201);
    }
    let (s, body) = d.call(
        "PUT",
        "/nodes/n3",
        Some(&json!({"type":"DataPoint","name":"n3"})),
    );
    assert_eq!(s, 409);
    assert!(
        body["error"].as_str().unwrap().contains("max_nodes"),
        "{body}"
    );
    // Replacing an existing node is still fine at the limit.
    let (s, body) = d.call(
        "PUT",
        "/nodes/n1",
        Some(&json!({"type":"DataPoint","name":"renamed"})),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["version"], 2);

    // Body over 1 MiB.
    let huge = format!("{{\"value\":\"{}\"}}", "x".repeat(1024 * 1024 + 10));
    let (s, _) = d.request_as("POST", "/nodes/n2/value", Some(&d.bearer()), Some(&huge));
    assert_eq!(s, 413);
    // Bad bodies name the field.
    for (body, want) in [
        ("{", "not JSON"),
        (r#"{"type":"Gizmo","name":"x"}"#, "unknown node type"),
        (r#"{"type":"DataPoint"}"#, "'name'"),
    ] {
        let (s, text) = d.request_as("PUT", "/nodes/n2", Some(&d.bearer()), Some(body));
        assert_eq!(s, 400, "{body}");
        assert!(text.contains(want), "{body} -> {text}");
    }
    let (s, _) = d.call(
        "POST",
        "/nodes/n2/value",
        Some(&json!({"value": {"nested": 1}})),
    );
    assert_eq!(s, 400);
    let (s, _) = d.call("GET", "/nodes/nope", None);
    assert_eq!(s, 404);
    let (s, _) = d.call("DELETE", &format!("/nodes/{}", d.install_id()), None);
    assert_eq!(s, 409, "the Server node cannot be deleted");
    let (s, _) = d.call(
        "POST",
        &format!("/nodes/{}/value", d.install_id()),
        Some(&json!({"value": 1})),
    );
    assert_eq!(s, 409, "a value for a node that is not a DataPoint");
    let (s, _) = d.call("POST", "/nodes/n1/invoke", None);
    assert_eq!(s, 409, "invoking a DataPoint");

    // Nothing stored was lost, and it all survives a SIGKILL.
    d.kill9();
    d.start();
    let nodes = d.get("/nodes")["nodes"].as_array().unwrap().clone();
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["id"].as_str()).collect();
    assert!(ids.contains(&"n1") && ids.contains(&"n2"), "{ids:?}");
    assert_eq!(d.node("n1")["name"], "renamed");
}

#[test]
fn a_reinstalled_peer_with_a_valid_proof_is_re_pinned_with_a_warning() {
    let root = TempDir::new("reinstall");
    let bp = free_udp_port();
    let mut ds = meshed(&root.0, &["a", "b"], "1234", bp);
    let bid = ds[1].install_id();
    let pin_file = ds[0].dir.join(format!("state/peers/{bid}.pem"));
    let old_pin = std::fs::read_to_string(&pin_file).unwrap();
    ds[1].term();
    std::fs::remove_dir_all(ds[1].dir.join("state/tls")).unwrap(); // a new certificate
    ds[1].start();
    let t = wait_until(Duration::from_secs(3), || {
        ds[0].peer_status(&bid) == "connected"
    });
    assert!(t.is_some(), "reconnected with the new certificate");
    let new_pin = std::fs::read_to_string(&pin_file).unwrap();
    assert_ne!(new_pin, old_pin, "the new certificate is pinned");
    let log = ds[0].log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("new certificate with a valid proof")
            && l.contains(&bid[..8])),
        "{log}"
    );
}

#[test]
fn a_peer_whose_proof_does_not_verify_is_refused_and_logged_at_error() {
    let root = TempDir::new("impostor");
    let bp = free_udp_port();
    let mut ds = meshed(&root.0, &["a", "b"], "1234", bp);
    let (bid, bport) = (ds[1].install_id(), ds[1].port);
    // b comes back under another PIN: its own beacons are refused by a...
    ds[1].term();
    assert!(
        ds[1]
            .cli_stdin(&["set-pin", "--pin-stdin"], "9999\n")
            .status
            .success()
    );
    ds[1].start();
    // ...so forge beacons for it with the cluster's key: a dials, and only the
    // /trust proof (made with b's new PIN) stands between a's bearer and b.
    let keys = krill::credentials::Keys::derive("1234", "krill", KDF);
    let me = krill::beacon::Me {
        install_id: bid.clone(),
        session_id: krill::util::uuid_v4(),
        host: "b".into(),
        name: "b".into(),
        port: bport,
    };
    let sock = beacon_socket(bp);
    let t = wait_until(Duration::from_secs(3), || {
        let b = krill::beacon::Beacon::new_signed(&keys.beacon_key, &me, "up");
        sock.send_to(
            &serde_json::to_vec(&b).unwrap(),
            SocketAddrV4::new(GROUP, bp),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        ds[0].log().contains("trust failed")
    });
    assert!(t.is_some(), "a never tried b:\n{}", ds[0].log());
    let log = ds[0].log();
    let line = log.lines().find(|l| l.contains("trust failed")).unwrap();
    assert!(
        line.contains("ERROR") && line.contains("bad proof") && line.contains(&bid[..8]),
        "{line}"
    );
    assert_ne!(ds[0].peer_status(&bid), "connected");
    // b never saw a's bearer: it counted no failed bearer checks from a.
    assert!(!ds[1].log().contains("locked out"));
}

#[test]
fn the_65th_sse_subscriber_gets_503_with_retry_after() {
    let root = TempDir::new("subs");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    let agent = d.agent();
    let auth = format!("Bearer {}", d.bearer());
    let mut open = Vec::new();
    for i in 0..64 {
        let r = agent.get(&d.url("/sse")).set("Authorization", &auth).call();
        let r = r.unwrap_or_else(|e| panic!("subscriber {i}: {e}"));
        assert_eq!(r.status(), 200);
        open.push(r.into_reader()); // keep the stream open
    }
    match agent.get(&d.url("/sse")).set("Authorization", &auth).call() {
        Err(ureq::Error::Status(503, r)) => {
            assert!(r.header("Retry-After").is_some(), "Retry-After is set");
            assert!(
                r.into_string()
                    .unwrap()
                    .contains("too many SSE subscribers")
            );
        }
        other => panic!("the 65th subscriber: {other:?}"),
    }
    // Other routes still answer, and a slot frees when a subscriber leaves.
    assert_eq!(d.call("GET", "/health", None).0, 200);
    open.truncate(10);
    let t = wait_until(Duration::from_secs(5), || {
        agent
            .get(&d.url("/sse"))
            .set("Authorization", &auth)
            .call()
            .map(|r| {
                open.push(r.into_reader());
            })
            .is_ok()
    });
    assert!(t.is_some(), "a slot was freed");
}

/// A raw TLS connection to `d` (pinned to its certificate).
fn raw_tls(d: &Daemon) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let tcp = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tls_client(d, tcp)
}

#[test]
fn endless_headers_are_cut_off_before_any_authentication() {
    use std::io::{Read, Write};
    let root = TempDir::new("headers");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    for (what, head) in [
        (
            "a 1 MiB header line",
            format!("GET /livez HTTP/1.1\r\nX-Long: {}", "a".repeat(1 << 20)),
        ),
        (
            "1000 headers",
            format!("GET /livez HTTP/1.1\r\n{}", "X-H: 1\r\n".repeat(1000)),
        ),
    ] {
        let mut s = raw_tls(&d);
        // The server stops reading early; the rest of the write may fail: fine.
        let _ = s.write_all(head.as_bytes()).and_then(|_| s.flush());
        let mut answer = Vec::new();
        // It answers 431 and closes. Closing with unread bytes makes the kernel send
        // a reset, which may beat the 431 to us: a reset or an end of stream is the
        // same verdict. Only a read timeout (the server still swallowing bytes) is not.
        match s.read_to_end(&mut answer) {
            Ok(_) => {
                let answer = String::from_utf8_lossy(&answer);
                assert!(
                    answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
                    "{what}: {answer:?}"
                );
            }
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{what}: the server kept reading ({e})"
            ),
        }
    }
    // The daemon is fine.
    assert_eq!(d.request_as("GET", "/livez", None, None).0, 200);
    assert_eq!(d.call("GET", "/health", None).0, 200);
}

#[test]
fn a_request_asking_to_close_is_answered_with_connection_close_and_closed() {
    // A pooling client (ureq, in every peer) keeps a connection unless the answer
    // says it closes; the server must both say it and do it.
    use std::io::{Read, Write};
    let root = TempDir::new("connclose");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    d.start();
    let mut s = raw_tls(&d);
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let mut answer = Vec::new();
    // read_to_end returns only once the server has closed (a timeout fails it).
    let r = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let head = answer
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close"), "{head:?}");
    if let Err(e) = r {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server kept the connection open: {e}"
        );
    }
    // Without it, the connection stays open for the next request and says nothing.
    let mut s = raw_tls(&d);
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    assert!(!head.contains("connection: close"), "{head:?}");
}

#[test]
fn a_peer_with_too_many_nodes_is_mirrored_only_up_to_max_nodes() {
    // b may own 10 nodes; a mirrors at most 5 of any peer's.
    let root = TempDir::new("mirrorcap");
    let bp = free_udp_port();
    let mut a = Daemon::new(&root.0, "a", "1234", bp, "max_nodes = 5");
    let mut b = Daemon::new(&root.0, "b", "1234", bp, "max_nodes = 10");
    a.start();
    b.start();
    assert!(wait_until(Duration::from_secs(3), || full_mesh(&[&a, &b])).is_some());
    for i in 0..9 {
        let (s, _) = b.call(
            "PUT",
            &format!("/nodes/m{i}"),
            Some(&json!({"type":"DataPoint","name":"m"})),
        );
        assert_eq!(s, 201);
    }
    let bid = b.install_id();
    let count = || {
        a.get(&format!("/nodes?host={bid}"))["nodes"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert!(
        wait_until(Duration::from_secs(2), || a
            .log()
            .contains("not mirroring the rest"))
        .is_some()
    );
    assert_eq!(count(), 5, "b's Server node and four data points");
    assert_eq!(
        a.log().matches("not mirroring the rest").count(),
        1,
        "warned once"
    );
    // Changes to the mirrored ones still flow (events arrive in creation order, so
    // m0 is among the first four).
    let (s, _) = b.call("POST", "/nodes/m0/value", Some(&json!({"value": 7})));
    assert_eq!(s, 200);
    assert!(
        wait_until(Duration::from_secs(1), || a.node("m0")["meta"]["value"]
            == json!(7))
        .is_some()
    );
    assert!(a.node("m8").is_null(), "m8 is past the cap");
}
