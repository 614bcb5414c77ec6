//! The mesh lab (issue 3): each server in its own network namespace on one bridge,
//! real multicast, faults made on purpose with `scripts/mesh-lab`. Needs root; skips
//! with a message otherwise. The test thread joins the lab's hub namespace, so every
//! query goes over the lab's own bridge, never the host's network.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::measured;
use parking_lot::Mutex;
use serde_json::{Value, json};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mesh-lab");

/// One lab at a time under `cargo test` (nextest runs them in the `lab` group, serially).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Lab {
    prefix: String,
    dir: PathBuf,
    agents: HashMap<usize, ureq::Agent>,
    _guard: parking_lot::MutexGuard<'static, ()>,
}

impl Lab {
    /// Makes the lab and joins its hub namespace; `None` (after saying so) when not root.
    fn up(test: &str, prefix: &str, args: &[&str]) -> Option<Lab> {
        if !is_root() {
            eprintln!("SKIPPED {test}: the mesh lab needs root (network namespaces); CI runs it");
            return None;
        }
        let guard = ONE_AT_A_TIME.lock();
        let lab = Lab {
            prefix: prefix.into(),
            dir: PathBuf::from(format!("/tmp/krill-lab-{prefix}")),
            agents: HashMap::new(),
            _guard: guard,
        };
        let mut all = vec!["up"];
        all.extend_from_slice(args);
        lab.sh(&all);
        lab.join_hub();
        Some(lab)
    }

    fn sh(&self, args: &[&str]) -> String {
        let out = Command::new(SCRIPT)
            .args(args)
            .env("KRILL_LAB", &self.prefix)
            .env("KRILL_BIN", env!("CARGO_BIN_EXE_krill"))
            .output()
            .expect("scripts/mesh-lab runs");
        assert!(
            out.status.success(),
            "mesh-lab {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn join_hub(&self) {
        let path = format!("/run/netns/{}-hub", self.prefix);
        let f = std::fs::File::open(&path).expect("hub namespace exists");
        // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {path}");
    }

    fn file(&self, i: usize, f: &str) -> String {
        std::fs::read_to_string(self.dir.join(i.to_string()).join(f))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn install_id(&self, i: usize) -> String {
        self.file(i, "state/install_id")
    }

    /// Host `i`'s address (as `scripts/mesh-lab ip I` says, without a process).
    fn addr(&self, i: usize) -> String {
        let moved = self.file(i, "addr");
        if moved.is_empty() {
            format!("10.77.0.{}", 10 + i)
        } else {
            moved
        }
    }

    fn log(&self, i: usize) -> String {
        self.file(i, "log")
    }

    /// A client pinned to host `i`'s certificate; `None` until the server has made it
    /// (a server just started may not have written it yet).
    fn agent(&mut self, i: usize) -> Option<ureq::Agent> {
        if let Some(a) = self.agents.get(&i) {
            return Some(a.clone());
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = std::fs::read_to_string(self.dir.join(format!("{i}/state/tls/cert.pem"))).ok()?;
        let der = krill::tls::pem_to_der(&pem)?;
        let a = krill::tls::agent(
            krill::tls::Verifier::pinned(der),
            Duration::from_millis(500),
            Duration::from_secs(2),
        );
        self.agents.insert(i, a.clone());
        Some(a)
    }

    /// An authenticated call to host `i`; `None` when it does not answer.
    fn call(
        &mut self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Option<(u16, Value)> {
        let url = format!("https://{}:8442{path}", self.addr(i));
        let req = self.agent(i)?.request(method, &url).set(
            "Authorization",
            &format!("Bearer {}", self.file(i, "cred/pin_derived_key")),
        );
        let r = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(_) => return None,
        };
        let status = resp.status();
        let v = serde_json::from_str(&resp.into_string().ok()?).unwrap_or(Value::Null);
        Some((status, v))
    }

    fn peers(&mut self, i: usize) -> Vec<Value> {
        self.call(i, "GET", "/network/peers", None)
            .and_then(|(_, v)| v["peers"].as_array().cloned())
            .unwrap_or_default()
    }

    /// How `i` sees host `j`: (status, address), or empty strings.
    fn view(&mut self, i: usize, j: usize) -> (String, String) {
        let id = self.install_id(j);
        self.peers(i)
            .iter()
            .find(|p| p["installId"] == id.as_str())
            .map(|p| {
                (
                    p["status"].as_str().unwrap_or("").into(),
                    p["address"].as_str().unwrap_or("").into(),
                )
            })
            .unwrap_or_default()
    }

    fn full_mesh(&mut self, hosts: &[usize]) -> bool {
        hosts.iter().all(|&i| {
            let ids: Vec<String> = hosts
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| self.install_id(j))
                .collect();
            let peers = self.peers(i);
            ids.iter().all(|id| {
                peers
                    .iter()
                    .any(|p| p["installId"] == id.as_str() && p["status"] == "connected")
            })
        })
    }

    fn value_of(&mut self, i: usize, node: &str) -> Value {
        self.call(i, "GET", &format!("/nodes/{node}"), None)
            .filter(|(s, _)| *s == 200)
            .map(|(_, v)| v["meta"]["value"].clone())
            .unwrap_or(Value::Null)
    }

    fn put_point(&mut self, i: usize, node: &str, value: Value) {
        let body = json!({"type": "DataPoint", "name": node, "meta": {"value": value}});
        let r = self.call(i, "PUT", &format!("/nodes/{node}"), Some(&body));
        assert!(matches!(r, Some((200 | 201, _))), "PUT on host {i}: {r:?}");
    }

    fn set(&mut self, i: usize, node: &str, value: Value) {
        let r = self.call(
            i,
            "POST",
            &format!("/nodes/{node}/value"),
            Some(&json!({ "value": value })),
        );
        assert!(matches!(r, Some((200, _))), "set on host {i}: {r:?}");
    }

    /// Polls every 20 ms until `f` holds or `limit` passes; the time it took.
    fn wait(&mut self, limit: Duration, mut f: impl FnMut(&mut Lab) -> bool) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if f(self) {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self, hosts: &[usize]) -> String {
        hosts
            .iter()
            .map(|&i| format!("---- host {i} ----\n{}\n", self.log(i)))
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(&[1, 2, 3, 4, 5, 6]));
        }
        let _ = Command::new(SCRIPT)
            .arg("down")
            .env("KRILL_LAB", &self.prefix)
            .status();
    }
}

const ALL: [usize; 6] = [1, 2, 3, 4, 5, 6];
const S: Duration = Duration::from_secs(1);

fn formed(lab: &mut Lab, hosts: &[usize], limit: Duration, what: &str) -> Duration {
    let t = lab.wait(limit, |l| l.full_mesh(hosts));
    let t = t.unwrap_or_else(|| panic!("{what}: no full mesh of {hosts:?} within {limit:?}"));
    measured(&format!("lab: {what}"), t);
    t
}

#[test]
fn lab_1_six_servers_form_a_full_mesh() {
    let Some(mut lab) = Lab::up("lab_1", "kl1", &["6"]) else {
        return;
    };
    formed(
        &mut lab,
        &ALL,
        3 * S,
        "six servers, full mesh after the last start",
    );
    // Every server on its own address, found through real multicast on the bridge.
    let (status, addr) = lab.view(1, 6);
    assert_eq!(
        (status.as_str(), addr.as_str()),
        ("connected", "10.77.0.16")
    );
    lab.put_point(2, "t", json!(1));
    lab.set(2, "t", json!(2));
    let t = lab.wait(S, |l| ALL.iter().all(|&i| l.value_of(i, "t") == json!(2)));
    measured(
        "lab: a value reaches all six",
        t.expect("value on all six within 1 s"),
    );
}

#[test]
fn lab_2_sigkill_and_restart() {
    let Some(mut lab) = Lab::up("lab_2", "kl2", &["6"]) else {
        return;
    };
    formed(&mut lab, &ALL, 3 * S, "mesh before SIGKILL");
    lab.sh(&["kill", "6", "KILL"]);
    let t = lab.wait(3 * S, |l| (1..=5).all(|i| l.view(i, 6).0 == "disconnected"));
    measured(
        "lab: SIGKILL noticed by all five",
        t.expect("all five mark host 6 disconnected within 3 s"),
    );
    lab.sh(&["start", "6"]);
    formed(&mut lab, &ALL, 3 * S, "restart: full mesh again");
}

#[test]
fn lab_3_link_down_is_noticed_and_link_up_heals() {
    let Some(mut lab) = Lab::up("lab_3", "kl3", &["6"]) else {
        return;
    };
    formed(&mut lab, &ALL, 3 * S, "mesh before link down");
    lab.sh(&["link", "6", "down"]);
    let t = lab.wait(3 * S, |l| (1..=5).all(|i| l.view(i, 6).0 != "connected"));
    measured(
        "lab: link down (silent) noticed by all five",
        t.expect("link down detected within 3 s"),
    );
    assert!(
        lab.log(1).contains("silent for"),
        "noticed by the read timeout, not a reset"
    );
    lab.sh(&["link", "6", "up"]);
    formed(
        &mut lab,
        &ALL,
        6 * S,
        "link up: full mesh again (limit: beacon interval + 1 s)",
    );
}

#[test]
fn lab_4_partition_three_against_three_and_heal() {
    let Some(mut lab) = Lab::up("lab_4", "kl4", &["6"]) else {
        return;
    };
    formed(&mut lab, &ALL, 3 * S, "mesh before the partition");
    lab.put_point(1, "left", json!(0));
    lab.put_point(4, "right", json!(0));
    assert!(
        lab.wait(S, |l| ALL.iter().all(|&i| l.value_of(i, "left")
            == json!(0)
            && l.value_of(i, "right") == json!(0)))
            .is_some()
    );

    lab.sh(&["partition", "1 2 3", "4 5 6"]);
    let t = lab.wait(3 * S, |l| {
        [1, 2, 3].iter().all(|&i| {
            [4, 5, 6]
                .iter()
                .all(|&j| l.view(i, j).0 != "connected" && l.view(j, i).0 != "connected")
        })
    });
    measured(
        "lab: partition noticed on both sides",
        t.expect("each side sees the other gone within 3 s"),
    );
    // Each side keeps syncing inside itself.
    lab.set(1, "left", json!(11));
    lab.set(4, "right", json!(44));
    let t = lab.wait(S, |l| {
        [2, 3].iter().all(|&i| l.value_of(i, "left") == json!(11))
            && [5, 6].iter().all(|&i| l.value_of(i, "right") == json!(44))
    });
    measured(
        "lab: values sync inside each side",
        t.expect("values inside each side within 1 s"),
    );
    assert!(lab.full_mesh(&[1, 2, 3]) && lab.full_mesh(&[4, 5, 6]));
    assert_eq!(lab.value_of(5, "left"), json!(0), "nothing crossed the cut");

    lab.sh(&["heal"]);
    formed(&mut lab, &ALL, 6 * S, "heal: full mesh of six again");
    let t = lab.wait(S, |l| {
        ALL.iter()
            .all(|&i| l.value_of(i, "left") == json!(11) && l.value_of(i, "right") == json!(44))
    });
    assert!(t.is_some(), "values current on both sides after the heal");
}

#[test]
fn lab_5_twenty_percent_loss() {
    let Some(mut lab) = Lab::up("lab_5", "kl5", &["6", "--loss", "20"]) else {
        return;
    };
    formed(&mut lab, &ALL, 30 * S, "20 % loss: full mesh");
    for i in ALL {
        lab.put_point(i, &format!("p{i}"), json!(0));
    }
    for round in 1..=5 {
        for i in ALL {
            lab.set(i, &format!("p{i}"), json!(round));
        }
    }
    let t = lab.wait(30 * S, |l| {
        ALL.iter().all(|&i| {
            ALL.iter()
                .all(|&j| l.value_of(i, &format!("p{j}")) == json!(5))
        })
    });
    measured(
        "lab: 20 % loss: every value on every server",
        t.expect("all values everywhere within 30 s"),
    );
}

#[test]
fn lab_6_an_address_change_is_followed() {
    let Some(mut lab) = Lab::up("lab_6", "kl6", &["6"]) else {
        return;
    };
    formed(&mut lab, &ALL, 3 * S, "mesh before the address change");
    let id = lab.install_id(3);
    lab.sh(&["readdr", "3", "10.77.0.99"]);
    let others = [1, 2, 4, 5, 6];
    let t = lab.wait(6 * S, |l| {
        others
            .iter()
            .all(|&i| l.view(i, 3) == ("connected".into(), "10.77.0.99".into()))
    });
    measured(
        "lab: new address followed by all five",
        t.expect("followed within beacon interval + 1 s"),
    );
    for i in others {
        let n = lab
            .peers(i)
            .iter()
            .filter(|p| p["installId"] == id.as_str())
            .count();
        assert_eq!(n, 1, "host {i} has one entry for host 3, not a duplicate");
    }
    // Values flow from and to the moved server.
    lab.put_point(3, "moved", json!(1));
    let t = lab.wait(S, |l| {
        others.iter().all(|&i| l.value_of(i, "moved") == json!(1))
    });
    assert!(t.is_some(), "values from the moved server reach everyone");
}

#[test]
fn lab_7_another_pin_on_the_bridge_is_never_connected() {
    let Some(mut lab) = Lab::up("lab_7", "kl7", &["5"]) else {
        return;
    };
    lab.sh(&["add", "6", "--pin", "9999"]);
    formed(&mut lab, &[1, 2, 3, 4, 5], 3 * S, "five with one PIN");
    let odd = lab.install_id(6);
    let t0 = Instant::now();
    while t0.elapsed() < 7 * S {
        for i in 1..=5 {
            assert_ne!(
                lab.view(i, 6).0,
                "connected",
                "host {i} connected the other PIN"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let peers6 = lab.peers(6);
    assert!(
        peers6.iter().all(|p| p["status"] != "connected"),
        "{peers6:?}"
    );
    for i in 1..=5 {
        assert!(lab.peers(i).iter().all(|p| p["installId"] != odd.as_str()));
        let (_, st) = lab.call(i, "GET", "/network/stats", None).unwrap();
        assert!(st["beacons_rejected"].as_u64().unwrap() > 0);
    }
}

// ---- issue 4: peer management across subnets, without beacons, and TTL ----

#[test]
fn lab_8_a_far_subnet_joins_through_one_static_peer() {
    // Hosts 1-4 on 10.77.0.0/24; hosts 7 and 8 on 10.77.1.0/24 behind the hub, which
    // routes unicast but not multicast. Host 7 is given one static peer (host 1);
    // host 8 nothing at all. Peer exchange and dial-back must do the rest.
    let Some(mut lab) = Lab::up("lab_8", "kl8", &["4"]) else {
        return;
    };
    formed(
        &mut lab,
        &[1, 2, 3, 4],
        3 * S,
        "near subnet before the far one",
    );
    let t0 = Instant::now();
    lab.sh(&["far", "7", "--conf", r#"peers = ["10.77.0.11:8442"]"#]);
    lab.sh(&["far", "8"]);
    let all = [1, 2, 3, 4, 7, 8];
    let t = lab.wait(10 * S, |l| l.full_mesh(&all));
    assert!(
        t.is_some(),
        "no full mesh across the router within 10 s:\n{}",
        lab.logs(&all)
    );
    measured(
        "lab: far subnet, one static peer: full mesh of both subnets",
        t0.elapsed(),
    );
    assert_eq!(lab.view(7, 1).0, "connected");
    let sources: Vec<String> = lab
        .peers(7)
        .iter()
        .map(|p| p["source"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(sources.contains(&"static".to_string()), "{sources:?}");
    // Values flow both ways across the router.
    lab.put_point(8, "far", json!(8));
    lab.put_point(2, "near", json!(2));
    let t = lab.wait(S, |l| {
        l.value_of(1, "far") == json!(8) && l.value_of(7, "near") == json!(2)
    });
    assert!(t.is_some(), "values cross the router both ways");
}

#[test]
fn lab_9_without_beacons_a_restart_reconnects_from_known_peers() {
    let off = "beacons = false";
    let Some(mut lab) = Lab::up("lab_9", "kl9", &["1", "--conf", off]) else {
        return;
    };
    for i in ["2", "3", "4"] {
        lab.sh(&[
            "add",
            i,
            "--conf",
            off,
            "--conf",
            r#"peers = ["10.77.0.11:8442"]"#,
        ]);
    }
    formed(
        &mut lab,
        &[1, 2, 3, 4],
        10 * S,
        "no beacons: mesh from one static peer",
    );
    // Host 3 has saved every peer it was connected to.
    let ids: Vec<String> = [1, 2, 4].iter().map(|&i| lab.install_id(i)).collect();
    let t = lab.wait(10 * S, |l| {
        let k = l.file(3, "state/known_peers.json");
        ids.iter().all(|id| k.contains(id.as_str()))
    });
    assert!(
        t.is_some(),
        "known_peers.json of host 3: {}",
        lab.file(3, "state/known_peers.json")
    );
    // Restart it with no static peer at all: only known_peers.json can bring it back.
    lab.sh(&["kill", "3", "TERM"]);
    let cfg = lab.dir.join("3/krill.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("peers")).collect();
    std::fs::write(&cfg, kept.join("\n")).unwrap();
    let stopped = lab.wait(3 * S, |l| l.call(3, "GET", "/livez", None).is_none());
    assert!(stopped.is_some(), "host 3 stopped");
    let t0 = Instant::now();
    lab.sh(&["start", "3"]);
    let t = lab.wait(3 * S, |l| l.full_mesh(&[1, 2, 3, 4]));
    assert!(
        t.is_some(),
        "restart without beacons: not back within 3 s:\n{}",
        lab.logs(&[3])
    );
    measured(
        "lab: no beacons: restart reconnects from known_peers.json",
        t0.elapsed(),
    );
    let sources: Vec<String> = lab
        .peers(3)
        .iter()
        .map(|p| p["source"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        sources,
        vec!["known"; 3],
        "all three came from known_peers.json"
    );
}

#[test]
fn lab_10_a_vanished_peer_leaves_after_the_ttl_and_returns_as_new() {
    let Some(mut lab) = Lab::up("lab_10", "kl10", &["3", "--conf", "peer_ttl_s = 3"]) else {
        return;
    };
    formed(&mut lab, &[1, 2, 3], 3 * S, "mesh before the vanishing");
    let id3 = lab.install_id(3);
    assert!(
        lab.peers(1)
            .iter()
            .any(|p| p["installId"] == id3.as_str() && p["successCount"] == 1)
    );
    let t0 = Instant::now();
    lab.sh(&["kill", "3", "KILL"]);
    let t = lab.wait(8 * S, |l| {
        [1, 2]
            .iter()
            .all(|&i| l.peers(i).iter().all(|p| p["installId"] != id3.as_str()))
    });
    assert!(
        t.is_some(),
        "host 3 still in the table after peer_ttl_s = 3"
    );
    measured(
        "lab: peer_ttl_s = 3: vanished peer left the table",
        t0.elapsed(),
    );
    assert!(lab.log(1).contains("forgetting peer"), "{}", lab.log(1));
    lab.sh(&["start", "3"]);
    formed(
        &mut lab,
        &[1, 2, 3],
        3 * S,
        "returned peer: full mesh again",
    );
    let p = lab
        .peers(1)
        .into_iter()
        .find(|p| p["installId"] == id3.as_str())
        .unwrap();
    assert_eq!(p["successCount"], 1, "a new entry, not the old one: {p}");
    assert_eq!(p["failureCount"], 0, "{p}");
}
