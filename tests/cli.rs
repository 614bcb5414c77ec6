//! The command line and config contract of INTERFACE.md, on the built binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (c, out, _) = run(&["--version"], &[]);
    assert_eq!(c, 0);
    assert_eq!(out.trim(), format!("krill {}", env!("CARGO_PKG_VERSION")));
    let (c, out, _) = run(&["help"], &[]);
    assert_eq!(c, 0);
    for cmd in ["run", "set-pin", "status", "peers", "nodes", "set"] {
        assert!(out.contains(cmd), "help lists {cmd}");
        let (c, h, _) = run(&[cmd, "--help"], &[]);
        assert_eq!(c, 0, "{cmd} --help");
        assert!(h.starts_with(&format!("Usage: krill {cmd}")), "{h}");
    }
    let (c, _, err) = run(&["frobnicate"], &[]);
    assert_eq!(c, 2);
    assert!(err.contains("unknown command"));
}

#[test]
fn config_errors_name_key_and_source_and_exit_2() {
    let root = TempDir::new("cfg");
    let file = root.0.join("krill.toml");
    std::fs::write(&file, "port = 8442\nbeacon_intervall_ms = 10\n").unwrap();
    let f = file.to_str().unwrap();
    let (c, _, err) = run(&["run", "--config", f], &[]);
    assert_eq!(c, 2);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("beacon_intervall_ms") && err.contains(f),
        "{err}"
    );

    std::fs::write(&file, "port = \"x\"\n").unwrap();
    let (c, _, err) = run(&["run", "--config", f], &[]);
    assert_eq!(c, 2);
    assert!(err.contains("'port'") && err.contains(f), "{err}");

    std::fs::write(&file, "[broken\n").unwrap();
    let (c, _, err) = run(&["status", "--config", f], &[]);
    assert_eq!(c, 2);
    assert!(err.contains("not valid TOML") && err.contains(f), "{err}");

    let (c, _, err) = run(
        &["run", "--config", "/nonexistent.toml", "--port", "99999"],
        &[],
    );
    assert_eq!(c, 2);
    assert!(err.contains("--port"), "{err}");
    let (c, _, err) = run(
        &["run", "--config", "/nonexistent.toml"],
        &[("KRILL_BEACONS", "maybe")],
    );
    assert_eq!(c, 2);
    assert!(err.contains("KRILL_BEACONS"), "{err}");
    let (c, _, err) = run(&["run", "--bogus-flag"], &[]);
    assert_eq!(c, 2);
    assert!(err.contains("--bogus-flag"), "{err}");
}

#[test]
fn set_pin_validates_and_writes_0400_files() {
    use std::os::unix::fs::PermissionsExt;
    let root = TempDir::new("setpin");
    let d = Daemon::new(&root.0, "a", "", free_udp_port(), "");
    for bad in ["12a4", "123", "12345", "", "too short"] {
        let out = d.cli_stdin(&["set-pin", "--pin-stdin"], &format!("{bad}\n"));
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("4 digits"));
    }
    assert!(!d.dir.join("cred").exists(), "nothing written on a bad PIN");
    let out = d.cli_stdin(&["set-pin", "--pin-stdin"], "0815\n");
    assert!(out.status.success());
    let mode = |p: &str| {
        std::fs::metadata(d.dir.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("cred"), 0o700);
    assert_eq!(mode("cred/pin_derived_key"), 0o400);
    assert_eq!(mode("cred/pin_hash"), 0o400);
    let hash = std::fs::read_to_string(d.dir.join("cred/pin_hash")).unwrap();
    assert!(hash.starts_with(&format!("pbkdf2-sha256${KDF}$")), "{hash}");
    assert_eq!(
        d.bearer(),
        krill::credentials::Keys::derive("0815", "krill", KDF).bearer
    );
    for f in ["cred/pin_derived_key", "cred/pin_hash"] {
        assert!(
            !std::fs::read_to_string(d.dir.join(f))
                .unwrap()
                .contains("0815"),
            "the PIN itself is never written"
        );
    }
    assert_eq!(
        d.cli_stdin(&["set-pin", "--check", "--pin-stdin"], "0815\n")
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        d.cli_stdin(&["set-pin", "--check", "--pin-stdin"], "0816\n")
            .status
            .code(),
        Some(1)
    );
    // A passphrase works too.
    let out = d.cli_stdin(
        &["set-pin", "--pin-stdin"],
        "correct horse battery staple\n",
    );
    assert!(out.status.success());
}

#[test]
fn without_a_pin_only_livez_answers_until_sighup_brings_one() {
    let root = TempDir::new("nopin");
    let mut d = Daemon::new(&root.0, "a", "", free_udp_port(), "");
    d.start();
    assert!(d.log().contains("no cluster PIN set"), "{}", d.log());
    let (s, body) = d.request_as("GET", "/trust", None, None);
    assert_eq!(
        (s, body.as_str()),
        (503, r#"{"error":"no cluster PIN set"}"#)
    );
    let (s, body) = d.request_as("GET", "/health", Some("whatever"), None);
    assert_eq!(
        (s, body.as_str()),
        (503, r#"{"error":"no cluster PIN set"}"#)
    );
    assert_eq!(
        d.request_as("GET", "/livez", None, None),
        (200, r#"{"status":"ok"}"#.to_string())
    );

    // Set a PIN and reload: takes effect without a restart.
    let out = d.cli_stdin(&["set-pin", "--pin-stdin"], "4321\n");
    assert!(out.status.success());
    let pid = d.pid();
    d.signal(libc::SIGHUP);
    let t = wait_until(Duration::from_secs(3), || {
        d.call("GET", "/health", None).0 == 200
    });
    assert!(t.is_some(), "PIN picked up on SIGHUP:\n{}", d.log());
    assert_eq!(d.pid(), pid);
    assert_eq!(d.request_as("GET", "/trust", None, None).0, 200);

    // A new PIN replaces the old one: the old bearer stops working.
    let old = d.bearer();
    assert!(
        d.cli_stdin(&["set-pin", "--pin-stdin"], "5555\n")
            .status
            .success()
    );
    d.signal(libc::SIGHUP);
    let t = wait_until(Duration::from_secs(3), || {
        d.request_as("GET", "/health", Some(&old), None).0 == 401
    });
    assert!(t.is_some());
    assert_eq!(d.call("GET", "/health", None).0, 200);
    let log = d.log();
    for secret in ["4321", "5555", &old, &d.bearer()] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[test]
fn client_commands_talk_to_the_local_daemon() {
    let root = TempDir::new("client");
    let bp = free_udp_port();
    let ds = meshed(&root.0, &["alpha", "beta"], "1234", bp);
    let a = &ds[0];
    let (s, _) = a.call(
        "PUT",
        "/nodes/t1",
        Some(&serde_json::json!({"type":"DataPoint","name":"Kitchen","meta":{"value":1,"unit":"°C"}})),
    );
    assert_eq!(s, 201);

    let out = a.cli(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("on alpha: ok") && text.contains("1 connected"),
        "{text}"
    );

    let out = a.cli(&["peers"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("NAME") && text.contains("beta") && text.contains("connected"),
        "{text}"
    );
    let only_b = ds[1].install_id();
    let filtered = a.get(&format!("/nodes?host={only_b}"));
    let hosts: Vec<&str> = filtered["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["host"].as_str())
        .collect();
    assert!(
        !hosts.is_empty() && hosts.iter().all(|h| *h == only_b),
        "?host filters: {hosts:?}"
    );
    let healthy = a.get("/network/peers?healthy=true");
    assert_eq!(healthy["peers"].as_array().unwrap().len(), 1);
    let st = a.stats();
    for field in [
        "total_peers",
        "healthy_peers",
        "connected_peers",
        "data_sent",
        "data_received",
        "uptime",
        "beacons_sent",
        "beacons_received",
        "beacons_rejected",
    ] {
        assert!(st[field].is_u64(), "/network/stats has {field}: {st}");
    }
    assert_eq!(st["connected_peers"], 1);
    assert!(st["data_sent"].as_u64().unwrap() > 0 && st["data_received"].as_u64().unwrap() > 0);
    let out = a.cli(&["peers", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peers"][0]["name"], "beta");

    let out = ds[1].cli(&["set", "t1", "21.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = a.cli(&["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Kitchen") && text.contains("21.5 °C"),
        "{text}"
    );
    let out = a.cli(&["set", "nope", "1"]);
    assert_eq!(out.status.code(), Some(1));

    // status exits 1 when nothing runs there.
    let stopped = Daemon::new(&root.0, "gamma", "1234", bp, "");
    let out = stopped.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn under_systemd_lines_carry_a_priority_and_no_timestamp() {
    let root = TempDir::new("journal");
    let d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    let log = std::fs::File::create(d.log_path()).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&d.config)
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(log)
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(10), || d.livez());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(up.is_some());
    assert_eq!(status.code(), Some(0));
    let text = d.log();
    assert!(text.lines().count() >= 3, "{text}");
    for line in text.lines() {
        let p = line.get(..3).unwrap_or("");
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&p),
            "no priority prefix: {line}"
        );
        assert!(!line.contains("Z INFO"), "no timestamp of its own: {line}");
    }
    assert!(text.contains("<6>krill 0.1.0 started"), "{text}");
}

#[test]
fn health_is_degraded_with_503_when_beacons_have_no_interface() {
    let root = TempDir::new("degraded");
    let mut d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    // Point beacons at an interface that does not exist.
    let cfg = std::fs::read_to_string(&d.config).unwrap().replace(
        "beacon_interface = \"127.0.0.1\"",
        "beacon_interface = \"nosuchif0\"",
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.start();
    let (s, h) = d.call("GET", "/health", None);
    assert_eq!(s, 503, "{h}");
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["components"]["beacon"], "no interface");
    assert_eq!(h["components"]["listener"], "ok");
    assert_eq!(
        d.request_as("GET", "/livez", None, None).0,
        200,
        "livez stays up"
    );
    assert!(d.log().contains("no network interface for beacons"));
}

#[test]
fn under_systemd_it_notifies_ready_pings_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    let root = TempDir::new("notify");
    let d = Daemon::new(&root.0, "a", "1234", free_udp_port(), "");
    let sock_path = root.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&d.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(std::fs::File::create(d.log_path()).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    assert!(d.livez(), "READY only once the listener answers");
    let t0 = std::time::Instant::now();
    assert_eq!(next(), "WATCHDOG=1");
    assert_eq!(next(), "WATCHDOG=1");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "pinged every WATCHDOG_USEC/2"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = (0..5).map(|_| next()).find(|m| m == "STOPPING=1");
    assert!(stopping.is_some());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
