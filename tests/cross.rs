//! Cross builds (issue 6): the arm64 and armhf packages build, and their binaries
//! answer `--version` and `/livez` under qemu-user-static. Needs root (Debian's
//! cross gcc and qemu are installed by scripts/test); skips with a message otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cross(arch: &str, target: &str, qemu: &str, sysroot: &str) {
    if !is_root() {
        eprintln!("SKIPPED cross build {arch}: needs root for the cross toolchain; CI runs it");
        return;
    }
    let t0 = Instant::now();
    let out = Command::new(format!("{ROOT}/scripts/build-deb"))
        .arg(arch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-deb {arch}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    measured(&format!("cross: scripts/build-deb {arch}"), t0.elapsed());
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let info = Command::new("dpkg-deb")
        .args(["-f", &format!("{ROOT}/{deb}"), "Architecture"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), arch);
    let bin = format!("{ROOT}/target/{target}/release/krill");
    let file = Command::new("readelf").args(["-h", &bin]).output().unwrap();
    let header = String::from_utf8_lossy(&file.stdout);
    assert!(
        header.contains(if arch == "arm64" { "AArch64" } else { "ARM" }),
        "{header}"
    );

    // --version under emulation.
    let v = Command::new(qemu)
        .args(["-L", sysroot, &bin, "--version"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("krill {}", env!("CARGO_PKG_VERSION"))
    );

    // /livez under emulation (loopback, no beacons, no PIN: it serves /livez only).
    let root = TempDir::new(&format!("cross-{arch}"));
    let d = Daemon::new(&root.0, arch, "", free_udp_port(), "beacons = false");
    let mut child = Command::new(qemu)
        .args(["-L", sysroot, &bin, "run", "--config"])
        .arg(&d.config)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(d.log_path()).unwrap())
        .spawn()
        .unwrap();
    let t = wait_until(Duration::from_secs(30), || d.livez());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        t.is_some(),
        "no /livez from the {arch} binary under qemu:\n{}",
        d.log()
    );
    measured(
        &format!("cross: {arch} binary under qemu answered /livez after"),
        t.unwrap(),
    );
}

#[test]
fn arm64_builds_and_runs_under_qemu() {
    cross(
        "arm64",
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64-static",
        "/usr/aarch64-linux-gnu",
    );
}

#[test]
fn armhf_builds_and_runs_under_qemu() {
    cross(
        "armhf",
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm-static",
        "/usr/arm-linux-gnueabihf",
    );
}
