//! Test harness: real `krill` processes on loopback, each with its own state,
//! credentials, HTTPS port, and a beacon port shared only by one test's cluster.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_krill");
/// Low KDF cost for tests (the cluster-wide setting; production is 600 000).
pub const KDF: u32 = 1000;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("krill-it-{tag}-{}", krill::util::uuid_v4()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port below the kernel's ephemeral range (32768 and up), so that no
/// client connection of another test can take it as its source port between now
/// and the daemon's bind (seen once under a loaded suite: "Address already in use").
/// Each test process starts at an offset of its own pid and checks by binding.
pub fn free_tcp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 500) * 24;
    for _ in 0..12_000 {
        let port = 20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free TCP port in 20000-31999")
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 10 ms until it holds or `limit` passes; the time it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if f() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where measured figures collect; `scripts/test` prints the file at the end.
pub const MEASURED_FILE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/measured.txt");

/// Records a measured figure (printed too, for `--nocapture` runs).
pub fn measured(what: &str, d: Duration) {
    let line = format!("{what}: {} ms\n", d.as_millis());
    print!("MEASURED {line}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(MEASURED_FILE)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Writes a config and credentials (PIN via `krill set-pin --pin-stdin`).
    pub fn new(root: &Path, name: &str, pin: &str, beacon_port: u16, extra: &str) -> Daemon {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_tcp_port();
        let config = dir.join("krill.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{d}/state\"\ncredentials_dir = \"{d}/cred\"\nbind = \"127.0.0.1\"\nport = {port}\nname = \"{name}\"\nkdf_iterations = {KDF}\nbeacon_interface = \"127.0.0.1\"\nbeacon_port = {beacon_port}\nlog_level = \"debug\"\n{extra}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let d = Daemon {
            name: name.into(),
            dir,
            port,
            config,
            child: None,
        };
        if !pin.is_empty() {
            let out = d.cli_stdin(&["set-pin", "--pin-stdin"], &format!("{pin}\n"));
            assert!(
                out.status.success(),
                "set-pin: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        d
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> std::process::Output {
        let mut c = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_stdin(args, "")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `krill run` and waits until `/livez` answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(10), || self.livez());
        assert!(up.is_some(), "{} did not start:\n{}", self.name, self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Sends SIGTERM and waits (at most 5 s) for the exit.
    pub fn term(&mut self) -> (ExitStatus, Duration) {
        self.signal(libc::SIGTERM);
        self.term_wait()
    }

    /// Waits (at most 5 s) for the exit after a signal was sent.
    pub fn term_wait(&mut self) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        let mut c = self.child.take().expect("running");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return (st, t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(5) {
                c.kill().unwrap();
                panic!("{} did not exit within 5 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn bearer(&self) -> String {
        std::fs::read_to_string(self.dir.join("cred/pin_derived_key"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn install_id(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/install_id"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A client that trusts exactly this daemon's certificate.
    pub fn agent(&self) -> ureq::Agent {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = std::fs::read_to_string(self.dir.join("state/tls/cert.pem")).unwrap();
        let der = krill::tls::pem_to_der(&pem).unwrap();
        krill::tls::agent(
            krill::tls::Verifier::pinned(der),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub fn livez(&self) -> bool {
        self.dir.join("state/tls/cert.pem").exists()
            && self
                .agent()
                .get(&self.url("/livez"))
                .call()
                .is_ok_and(|r| r.status() == 200)
    }

    /// A request with an explicit bearer (`None`: no header); any status.
    pub fn request_as(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut req = self.agent().request(method, &self.url(path));
        if let Some(b) = bearer {
            req = req.set("Authorization", &format!("Bearer {b}"));
        }
        let r = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{} {path}: {e}", self.name),
        };
        let status = resp.status();
        (status, resp.into_string().unwrap_or_default())
    }

    /// An authenticated request; the status and the JSON body (Null when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string());
        let (s, t) = self.request_as(method, path, Some(&self.bearer()), text.as_deref());
        (s, serde_json::from_str(&t).unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> Value {
        self.call("GET", path, None).1
    }

    /// This daemon's view of peer `install_id` (Null if not in its table).
    pub fn peer(&self, install_id: &str) -> Value {
        self.get("/network/peers")["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["installId"] == install_id).cloned())
            .unwrap_or(Value::Null)
    }

    pub fn peer_status(&self, install_id: &str) -> String {
        self.peer(install_id)["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn node(&self, id: &str) -> Value {
        let (s, v) = self.call("GET", &format!("/nodes/{id}"), None);
        if s == 200 { v } else { Value::Null }
    }

    pub fn stats(&self) -> Value {
        self.get("/network/stats")
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
        }
    }
}

/// Starts `names` on one beacon port with one PIN; returns them started.
pub fn cluster(root: &Path, names: &[&str], pin: &str, beacon_port: u16) -> Vec<Daemon> {
    let mut ds: Vec<Daemon> = names
        .iter()
        .map(|n| Daemon::new(root, n, pin, beacon_port, ""))
        .collect();
    for d in &mut ds {
        d.start();
    }
    ds
}

/// Starts `names` like [`cluster`] and asserts they form a full mesh within 3 s.
pub fn meshed(root: &Path, names: &[&str], pin: &str, beacon_port: u16) -> Vec<Daemon> {
    let ds = cluster(root, names, pin, beacon_port);
    let refs: Vec<&Daemon> = ds.iter().collect();
    assert!(
        wait_until(Duration::from_secs(3), || full_mesh(&refs)).is_some(),
        "no full mesh of {names:?} within 3 s"
    );
    ds
}

/// A TLS client over `tcp` that trusts exactly `d`'s certificate (for tests that
/// need the raw stream: header floods, a reader that never reads).
pub fn tls_client(
    d: &Daemon,
    tcp: std::net::TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let pem = std::fs::read_to_string(d.dir.join("state/tls/cert.pem")).unwrap();
    let der = krill::tls::pem_to_der(&pem).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(krill::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(krill::tls::Verifier::pinned(der))
        .with_no_client_auth();
    let name = "localhost".try_into().unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// True when every daemon lists every other as connected.
pub fn full_mesh(ds: &[&Daemon]) -> bool {
    let ids: Vec<String> = ds.iter().map(|d| d.install_id()).collect();
    ds.iter().enumerate().all(|(i, d)| {
        ids.iter()
            .enumerate()
            .all(|(j, id)| i == j || d.peer_status(id) == "connected")
    })
}
