//! The core promises of issue 2, as real processes on loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn data_point(d: &Daemon, id: &str, value: serde_json::Value) {
    let (s, body) = d.call(
        "PUT",
        &format!("/nodes/{id}"),
        Some(&json!({"type": "DataPoint", "name": id, "meta": {"value": value, "unit": "°C"}})),
    );
    assert_eq!(s, 201, "{body}");
}

fn set_value(d: &Daemon, id: &str, value: serde_json::Value) {
    let (s, body) = d.call(
        "POST",
        &format!("/nodes/{id}/value"),
        Some(&json!({ "value": value })),
    );
    assert_eq!(s, 200, "{body}");
}

#[test]
fn three_daemons_form_a_mesh_and_sync_values() {
    let root = TempDir::new("mesh3");
    let bp = free_udp_port();
    let mut ds: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|n| Daemon::new(&root.0, n, "1234", bp, ""))
        .collect();
    for d in &mut ds {
        d.start();
    }
    let refs: Vec<&Daemon> = ds.iter().collect();
    let t = wait_until(Duration::from_secs(3), || full_mesh(&refs));
    let t = t.expect("full mesh within 3 s of the last start");
    measured("mesh of 3 formed after last start", t);

    data_point(&ds[0], "temp", json!(20.0));
    let t0 = Instant::now();
    set_value(&ds[0], "temp", json!(23.5));
    for other in &ds[1..] {
        let seen = wait_until(Duration::from_secs(1), || {
            other.node("temp")["meta"]["value"] == json!(23.5)
        });
        assert!(
            seen.is_some(),
            "{} did not see the value within 1 s",
            other.name
        );
    }
    measured("value on the other two", t0.elapsed());

    // The mirror names its owner, and a write through another server is forwarded.
    let m = ds[1].node("temp");
    assert_eq!(m["host"], ds[0].install_id());
    let (s, body) = ds[2].call("POST", "/nodes/temp/value", Some(&json!({"value": 25})));
    assert_eq!(s, 200, "forwarded write: {body}");
    assert_eq!(ds[0].node("temp")["meta"]["value"], json!(25));
    // Mirrors can't be replaced or deleted where they are mirrored.
    let (s, _) = ds[1].call("DELETE", "/nodes/temp", None);
    assert_eq!(s, 409);
    let (s, _) = ds[1].call(
        "PUT",
        "/nodes/temp",
        Some(&json!({"type":"DataPoint","name":"x"})),
    );
    assert_eq!(s, 409);
}

#[test]
fn sigkill_is_noticed_nodes_go_stale_and_restart_recovers() {
    let root = TempDir::new("kill");
    let bp = free_udp_port();
    let mut ds = meshed(&root.0, &["a", "b", "c"], "1234", bp);
    data_point(&ds[2], "hum", json!(40));
    let cid = ds[2].install_id();
    for d in &ds[..2] {
        assert!(
            wait_until(Duration::from_secs(1), || d.node("hum")["meta"]["value"]
                == json!(40))
            .is_some()
        );
    }

    let t0 = Instant::now();
    ds[2].kill9();
    for d in &ds[..2] {
        let t = wait_until(Duration::from_secs(3), || {
            d.peer_status(&cid) == "disconnected" && d.node("hum")["state"] == "STALE"
        });
        assert!(t.is_some(), "{} still shows c: {}", d.name, d.peer(&cid));
    }
    measured(
        "SIGKILL: both others show disconnected + STALE",
        t0.elapsed(),
    );
    // The last known value stays.
    assert_eq!(ds[0].node("hum")["meta"]["value"], json!(40));

    let t0 = Instant::now();
    ds[2].start();
    for d in &ds[..2] {
        let t = wait_until(Duration::from_secs(3), || {
            d.peer_status(&cid) == "connected" && d.node("hum")["state"] == "NONE"
        });
        assert!(
            t.is_some(),
            "{} did not reconnect: {}",
            d.name,
            d.peer(&cid)
        );
    }
    measured("restart: connected again, nodes current", t0.elapsed());
    // The restarted server kept its node (persisted) and its identity; values flow.
    assert_eq!(ds[2].install_id(), cid);
    set_value(&ds[2], "hum", json!(55));
    for d in &ds[..2] {
        assert!(
            wait_until(Duration::from_secs(1), || d.node("hum")["meta"]["value"]
                == json!(55))
            .is_some()
        );
    }
    // A new session for the same installId, never a second peer entry.
    let peers = ds[0].get("/network/peers");
    let n = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["installId"] == cid)
        .count();
    assert_eq!(n, 1);
}

#[test]
fn sigterm_says_goodbye_and_exits_zero_fast() {
    let root = TempDir::new("term");
    let bp = free_udp_port();
    let mut ds = meshed(&root.0, &["a", "b", "c"], "1234", bp);
    let bid = ds[1].install_id();
    let t0 = Instant::now();
    ds[1].signal(libc::SIGTERM);
    for i in [0, 2] {
        let d = &ds[i];
        let t = wait_until(Duration::from_millis(500), || d.peer_status(&bid) == "left");
        assert!(
            t.is_some(),
            "{} did not mark b gone within 0.5 s: {}",
            d.name,
            d.peer(&bid)
        );
    }
    measured("SIGTERM: others mark it left", t0.elapsed());
    let (status, _) = ds[1].term_wait();
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit status");
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    measured("SIGTERM: process exit after the signal", took);
    assert!(ds[1].log().contains("shutting down"));
}

#[test]
fn another_pin_is_never_connected() {
    let root = TempDir::new("pin");
    let bp = free_udp_port();
    let mut good = cluster(&root.0, &["a", "b"], "1234", bp);
    let mut odd = Daemon::new(&root.0, "odd", "9999", bp, "");
    odd.start();
    let oid = odd.install_id();
    let refs: Vec<&Daemon> = good.iter().collect();
    assert!(wait_until(Duration::from_secs(3), || full_mesh(&refs)).is_some());
    // Give it a few beacon rounds to go wrong.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        for g in &good {
            assert_ne!(g.peer_status(&oid), "connected");
        }
        assert_eq!(
            odd.get("/network/peers")["peers"].as_array().map(Vec::len),
            Some(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its beacons were counted as rejected, and ours by it.
    for g in &good {
        assert!(g.stats()["beacons_rejected"].as_u64().unwrap() > 0);
        assert!(
            g.peer(&oid).is_null(),
            "a rejected beacon makes no peer entry"
        );
    }
    assert!(odd.stats()["beacons_rejected"].as_u64().unwrap() > 0);
    // Its bearer gets 401 from us, and ours from it.
    let (s, body) = good[0].request_as("GET", "/health", Some(&odd.bearer()), None);
    assert_eq!(s, 401);
    assert_eq!(body, r#"{"error":"unauthorized"}"#, "no detail");
    let (s, _) = odd.request_as("GET", "/nodes", Some(&good[0].bearer()), None);
    assert_eq!(s, 401);
    // The wrong PIN's proof does not verify either: its /trust is not trusted.
    let (s, trust) = odd.request_as("GET", "/trust", None, None);
    assert_eq!(s, 200);
    let t: serde_json::Value = serde_json::from_str(&trust).unwrap();
    let good_keys = krill::credentials::Keys::derive("1234", "krill", KDF);
    let der = krill::tls::pem_to_der(t["certPem"].as_str().unwrap()).unwrap();
    assert!(!krill::tls::check_proof(
        &good_keys.trust_key,
        &oid,
        &der,
        t["proof"].as_str().unwrap()
    ));
    good[1].kill9();
}

#[test]
fn a_silent_peer_is_noticed_by_the_read_timeout_and_returns() {
    // SIGSTOP freezes a server with its sockets open: no FIN, no RST, no
    // keep-alives. Only the 2.5 x keep-alive read timeout can notice it.
    let root = TempDir::new("stop");
    let bp = free_udp_port();
    let ds = meshed(&root.0, &["a", "b"], "1234", bp);
    let bid = ds[1].install_id();
    let t0 = Instant::now();
    ds[1].signal(libc::SIGSTOP);
    let t = wait_until(Duration::from_secs(3), || {
        ds[0].peer_status(&bid) != "connected"
    });
    ds[1].signal(libc::SIGCONT);
    assert!(t.is_some(), "a frozen peer still shows connected after 3 s");
    measured("silent peer (SIGSTOP) marked disconnected", t0.elapsed());
    assert!(
        ds[0].log().contains("silent for 2500 ms"),
        "{}",
        ds[0].log()
    );
    let t0 = Instant::now();
    let t = wait_until(Duration::from_secs(8), || full_mesh(&[&ds[0], &ds[1]]));
    assert!(t.is_some(), "back after SIGCONT");
    measured("after SIGCONT: connected again", t0.elapsed());
}

#[test]
fn with_no_peer_connected_known_peers_are_dialled_again() {
    // b says goodbye (a stops dialling it), then comes back without beacons and
    // without knowing a. Only a's re-bootstrap (every 30 s with no peer connected)
    // can bring them together again.
    let root = TempDir::new("reboot");
    let bp = free_udp_port();
    let mut ds = cluster(&root.0, &["a", "b"], "1234", bp);
    assert!(wait_until(Duration::from_secs(3), || full_mesh(&[&ds[0], &ds[1]])).is_some());
    let bid = ds[1].install_id();
    let saved = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(ds[0].dir.join("state/known_peers.json"))
            .is_ok_and(|k| k.contains(&bid))
    });
    assert!(saved.is_some(), "a saved b in known_peers.json");
    ds[1].term();
    assert!(wait_until(Duration::from_secs(1), || ds[0].peer_status(&bid) == "left").is_some());
    std::fs::remove_file(ds[1].dir.join("state/known_peers.json")).unwrap();
    let cfg = std::fs::read_to_string(&ds[1].config).unwrap() + "beacons = false\n";
    std::fs::write(&ds[1].config, cfg).unwrap();
    let t0 = Instant::now();
    ds[1].start();
    let t = wait_until(Duration::from_secs(35), || full_mesh(&[&ds[0], &ds[1]]));
    assert!(t.is_some(), "re-bootstrap did not bring b back within 35 s");
    measured(
        "re-bootstrap (30 s period) reconnected a departed known peer",
        t0.elapsed(),
    );
    assert!(
        ds[0]
            .log()
            .contains("no connected peers: dialling static and known peers again")
    );
}

#[test]
fn a_batch_of_values_is_all_or_nothing_and_reaches_the_peer() {
    let root = TempDir::new("batch");
    let bp = free_udp_port();
    let mut ds = meshed(&root.0, &["a", "b"], "1234", bp);
    data_point(&ds[0], "t1", json!(0));
    data_point(&ds[0], "t2", json!(0));
    data_point(&ds[1], "far", json!(0));
    let body = json!({"values": [{"id": "t1", "value": 1}, {"id": "t2", "value": "on"}, {"id": "t1", "value": 3}]});
    let (s, r) = ds[0].call("POST", "/values", Some(&body));
    assert_eq!((s, &r), (200, &json!({"updated": 3})));
    let (t1, t2) = (ds[0].node("t1"), ds[0].node("t2"));
    assert_eq!(t1["meta"]["value"], json!(3));
    assert_eq!(
        t1["version"],
        json!(3),
        "every entry is a change of its own"
    );
    assert_eq!(t2["meta"]["value"], json!("on"));
    let seen = wait_until(Duration::from_secs(2), || {
        ds[1].node("t1")["meta"]["value"] == json!(3)
            && ds[1].node("t2")["meta"]["value"] == json!("on")
    });
    assert!(seen.is_some(), "the peer mirrors the batch");

    // A bad entry anywhere changes nothing, and the error names it.
    for (bad, status, names) in [
        (
            json!({"values": [{"id": "t1", "value": 9}, {"id": "nope", "value": 1}]}),
            404,
            "values[1]",
        ),
        (
            json!({"values": [{"id": "t1", "value": 9}, {"id": "far", "value": 1}]}),
            409,
            "values[1]",
        ),
        (
            json!({"values": [{"id": "t1", "value": 9}, {"id": "t2", "value": {"x": 1}}]}),
            400,
            "values[1].value",
        ),
        (json!({"values": []}), 400, "empty"),
    ] {
        let (s, r) = ds[0].call("POST", "/values", Some(&bad));
        assert_eq!(s, status, "{bad}: {r}");
        assert!(r["error"].as_str().unwrap().contains(names), "{r}");
        assert_eq!(
            ds[0].node("t1")["meta"]["value"],
            json!(3),
            "nothing applied"
        );
    }

    // Acknowledged means on disk: SIGKILL right after, and the batch is still there.
    let many: Vec<_> = (0..500).map(|i| json!({"id": "t2", "value": i})).collect();
    let (s, _) = ds[0].call("POST", "/values", Some(&json!({ "values": many })));
    assert_eq!(s, 200);
    ds[0].kill9();
    ds[0].start();
    assert_eq!(ds[0].node("t2")["meta"]["value"], json!(499));
}

#[test]
fn many_connections_writing_at_once_are_all_answered_and_all_land() {
    // Each connection is served on its own thread: 32 clients posting at once all
    // get answers, and the values all land.
    let root = TempDir::new("conc");
    let bp = free_udp_port();
    let mut d = Daemon::new(&root.0, "a", "1234", bp, "http_threads = 1");
    d.start();
    data_point(&d, "c", json!(0));
    let d = std::sync::Arc::new(d);
    let t0 = Instant::now();
    let hs: Vec<_> = (0..32)
        .map(|i| {
            let d = d.clone();
            std::thread::spawn(move || {
                let (s, body) = d.call(
                    "POST",
                    "/values",
                    Some(&json!({"values": [{"id": "c", "value": i}]})),
                );
                assert_eq!(s, 200, "{body}");
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    measured("32 concurrent batch writes, http_threads = 1", t0.elapsed());
    assert_eq!(
        d.node("c")["version"],
        json!(33),
        "32 changes after the first"
    );
}
