//! The Debian package (issue 6): build, lintian, install with a preseeded PIN, run
//! the way the unit does, change the PIN of the running daemon, purge. Needs root
//! (dpkg, a network namespace); skips with a message otherwise. The installed
//! daemon runs in a network namespace this test makes, so its default config (real
//! multicast, port 8442) never touches the host's network.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{measured, wait_until};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NS: &str = "krill-deb-test";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

fn ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Purges the package, stops the daemon and removes the namespace, even on failure.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = sh("pkill -KILL -u krill -x krill; sleep 0.2");
        let _ = sh("DEBIAN_FRONTEND=noninteractive dpkg --purge krill >/dev/null 2>&1");
        let _ = sh(&format!("ip netns del {NS} 2>/dev/null"));
    }
}

fn mode(p: &str) -> (u32, String, String) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let name = |id: u32, db: &str| {
        ok(&format!("getent {db} {id} | cut -d: -f1"))
            .trim()
            .to_string()
    };
    (
        m.permissions().mode() & 0o7777,
        name(m.uid(), "passwd"),
        name(m.gid(), "group"),
    )
}

fn krill_in_ns(args: &str) -> Output {
    sh(&format!(
        "ip netns exec {NS} krill {args} --config /etc/krill/krill.toml"
    ))
}

fn health_with(bearer: &str) -> u16 {
    let out = sh(&format!(
        "ip netns exec {NS} curl -sk -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {bearer}' https://127.0.0.1:8442/health"
    ));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn the_package_installs_runs_changes_pin_and_purges() {
    if !is_root() {
        eprintln!(
            "SKIPPED the_package_installs_runs_changes_pin_and_purges: needs root (dpkg -i); CI runs it"
        );
        return;
    }
    let _cleanup = Cleanup;
    let _ = sh(
        "pkill -KILL -u krill -x krill; DEBIAN_FRONTEND=noninteractive dpkg --purge krill >/dev/null 2>&1",
    );
    ok("command -v lintian && command -v debconf-set-selections && command -v curl");

    // Build and lint.
    let t0 = std::time::Instant::now();
    let deb = ok(&format!("{ROOT}/scripts/build-deb 2>/dev/null"))
        .trim()
        .to_string();
    let deb = format!("{ROOT}/{deb}");
    measured("deb: scripts/build-deb (host)", t0.elapsed());
    let lint = sh(&format!("lintian {deb} 2>&1"));
    let lint = String::from_utf8_lossy(&lint.stdout);
    assert!(
        !lint.lines().any(|l| l.starts_with("E:")),
        "lintian errors:\n{lint}"
    );

    // Install with a preseeded PIN, not interactively.
    ok("echo 'krill krill/pin password 4321' | debconf-set-selections");
    ok(&format!("DEBIAN_FRONTEND=noninteractive dpkg -i {deb}"));
    ok("getent passwd krill && getent group krill");
    assert_eq!(
        mode("/usr/bin/krill"),
        (0o755, "root".into(), "root".into())
    );
    assert_eq!(
        mode("/usr/sbin/krill-reset-pin"),
        (0o755, "root".into(), "root".into())
    );
    assert_eq!(mode("/lib/systemd/system/krill.service").0, 0o644);
    assert_eq!(
        mode("/etc/krill/krill.toml"),
        (0o644, "root".into(), "root".into())
    );
    assert_eq!(
        mode("/etc/krill/credentials"),
        (0o700, "krill".into(), "krill".into())
    );
    assert_eq!(
        mode("/etc/krill/credentials/pin_derived_key"),
        (0o400, "krill".into(), "krill".into())
    );
    assert_eq!(
        mode("/etc/krill/credentials/pin_hash"),
        (0o400, "krill".into(), "krill".into())
    );
    assert_eq!(
        mode("/var/lib/krill"),
        (0o750, "krill".into(), "krill".into())
    );
    let bearer = std::fs::read_to_string("/etc/krill/credentials/pin_derived_key").unwrap();
    let bearer = bearer.trim().to_string();
    assert_eq!(
        sh("echo 4321 | krill set-pin --check --pin-stdin --config /etc/krill/krill.toml")
            .status
            .code(),
        Some(0)
    );

    // No PIN left in the debconf database.
    for db in [
        "/var/cache/debconf/passwords.dat",
        "/var/cache/debconf/config.dat",
    ] {
        let text = std::fs::read_to_string(db).unwrap_or_default();
        let entry: String = text
            .split("\n\n")
            .filter(|e| e.contains("Name: krill/pin\n"))
            .collect();
        assert!(
            !entry.contains("4321"),
            "{db} still holds the PIN:\n{entry}"
        );
    }

    // The unit verifies without a word.
    let v = sh("systemd-analyze verify /lib/systemd/system/krill.service");
    assert!(
        v.stderr.is_empty(),
        "systemd-analyze: {}",
        String::from_utf8_lossy(&v.stderr)
    );

    // Run it the way the unit does: as krill, with its config (in our namespace).
    let _ = sh(&format!("ip netns del {NS} 2>/dev/null"));
    ok(&format!(
        "ip netns add {NS} && ip -n {NS} link set lo up && ip -n {NS} route add 224.0.0.0/4 dev lo"
    ));
    let mut daemon = Command::new("ip")
        .args([
            "netns",
            "exec",
            NS,
            "setpriv",
            "--reuid=krill",
            "--regid=krill",
            "--init-groups",
        ])
        .args(["/usr/bin/krill", "run", "--config", "/etc/krill/krill.toml"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(std::env::temp_dir().join("krill-deb-test.log")).unwrap())
        .spawn()
        .unwrap();
    let livez = wait_until(Duration::from_secs(10), || {
        sh(&format!(
            "ip netns exec {NS} curl -sk https://127.0.0.1:8442/livez"
        ))
        .stdout
        .starts_with(br#"{"status":"ok"}"#)
    });
    assert!(livez.is_some(), "no /livez from the installed daemon");
    assert_eq!(health_with(&bearer), 200, "authenticated /health");
    let status = krill_in_ns("status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains(": ok"));
    // It made its identity under /var/lib/krill as krill.
    assert_eq!(mode("/var/lib/krill/install_id").1, "krill");

    // A new PIN for the running daemon, without a restart.
    let reset = Command::new("krill-reset-pin")
        .args(["--pin-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"8765\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let new_bearer = std::fs::read_to_string("/etc/krill/credentials/pin_derived_key").unwrap();
    let new_bearer = new_bearer.trim().to_string();
    assert_ne!(new_bearer, bearer);
    assert_eq!(
        sh("echo 8765 | krill set-pin --check --pin-stdin --config /etc/krill/krill.toml")
            .status
            .code(),
        Some(0)
    );
    let t = wait_until(Duration::from_secs(5), || health_with(&new_bearer) == 200);
    assert!(t.is_some(), "the running daemon did not take the new PIN");
    assert_eq!(health_with(&bearer), 401, "the old PIN no longer works");
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "no restart: the same process"
    );
    assert_eq!(
        mode("/etc/krill/credentials/pin_derived_key"),
        (0o400, "krill".into(), "krill".into())
    );
    // A bad PIN is refused with exit status 2.
    assert_eq!(
        sh("echo 12 | krill-reset-pin --pin-stdin").status.code(),
        Some(2)
    );

    // Stop it as systemd would, then remove (keeps config and state) and purge.
    // SAFETY: kill(2) on our own child (ip and setpriv exec into krill: same pid).
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
    ok("DEBIAN_FRONTEND=noninteractive dpkg --remove krill");
    assert!(
        Path::new("/etc/krill/credentials/pin_hash").exists(),
        "remove keeps the credentials"
    );
    assert!(
        Path::new("/var/lib/krill/install_id").exists(),
        "remove keeps the state"
    );
    ok("DEBIAN_FRONTEND=noninteractive dpkg --purge krill");
    assert!(
        !Path::new("/etc/krill").exists(),
        "purge leaves /etc/krill behind"
    );
    assert!(
        !Path::new("/var/lib/krill").exists(),
        "purge leaves /var/lib/krill behind"
    );
}
