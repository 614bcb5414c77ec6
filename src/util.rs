//! Small helpers used everywhere: hex, UUIDs, clocks, randomness, atomic files.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case); `None` on odd length or a non-hex character.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    let val = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` from the OS random source. The OS source failing is not recoverable.
pub fn random_bytes(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// A random number in `0.0..1.0`.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    random_bytes(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// `d` scaled by a random factor in `1 - frac ..= 1 + frac`.
pub fn jitter(d: Duration, frac: f64) -> Duration {
    d.mul_f64(1.0 - frac + 2.0 * frac * random_unit())
}

/// A fresh random UUID v4, lowercase, hyphenated.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    random_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// True for a hyphenated UUID (any version), either case.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-22T05:01:02.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3600,
        t / 60 % 60,
        t % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Writes `data` to `path` so that a crash at any moment leaves either the old
/// or the new content: write a temp file beside it, fsync, rename, fsync the dir.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) when missing and sets its mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// This machine's host name, or `krill` when it has none.
/// glibc's malloc, set for a small long-running daemon before any thread starts.
/// Measured with 15 peers (scripts/bench), together 0.3-0.4 MiB less resident:
/// - `M_ARENA_MAX` 2: by default every thread that allocates may get an arena of its
///   own (up to 8 per core), each keeping its own free memory; krill's threads mostly
///   wait, so two arenas are enough and the rest of that memory is not held.
/// - `M_TRIM_THRESHOLD` 64 KiB (default 128 KiB, and raised further as large blocks
///   are freed): free memory at the top of a heap is given back sooner.
pub fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD);
    }
}

const MALLOC_ARENAS: libc::c_int = 2;
const MALLOC_TRIM_THRESHOLD: libc::c_int = 64 * 1024;

/// Gives back to the kernel the pages of this thread's stack that lie below the
/// current frame (keeping [`STACK_KEEP`] for what is called next), as glibc does for
/// a thread that ends. For a long-lived thread after a deep one-off call: a peer
/// thread's TLS handshake touches about 24 KiB more stack than its reading loop ever
/// uses again, and with 15 peers that was 0.3 MiB held for nothing. Nothing below
/// the stack pointer is live, so this changes no data; a page used again is simply
/// faulted back in as zeroes. Does nothing outside a thread stack glibc reports.
pub fn release_stack() {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: the attr is initialised by pthread_getattr_np before it is read, and
    // destroyed once; madvise gets page-aligned addresses inside this thread's own
    // stack mapping, strictly below the current frame.
    unsafe {
        if libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) != 0 {
            return;
        }
        let mut low: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let got = libc::pthread_attr_getstack(attr.as_ptr(), &mut low, &mut size) == 0;
        libc::pthread_attr_destroy(attr.as_mut_ptr());
        let here = &low as *const _ as usize;
        let (low, high) = (low as usize, low as usize + size);
        if !got || here <= low || here >= high {
            return;
        }
        let page = match libc::sysconf(libc::_SC_PAGESIZE) {
            p if p > 0 => p as usize,
            _ => return,
        };
        let low = low.next_multiple_of(page);
        let end = here.saturating_sub(STACK_KEEP) & !(page - 1);
        if end > low {
            libc::madvise(low as *mut libc::c_void, end - low, libc::MADV_DONTNEED);
        }
    }
}

/// A channel for one answer whose receiver sleeps in the kernel at once. A
/// crossbeam receiver spins and calls `sched_yield` about eight times before it
/// sleeps; a connection waiting for the state owner (and, for a write, the disk)
/// always sleeps, and those yields were a tenth of a busy server's CPU. Dropping
/// the sender without sending wakes the receiver at once, as a channel would.
pub fn oneshot<T>() -> (OneTx<T>, OneRx<T>) {
    let slot = Arc::new(OneSlot {
        state: parking_lot::Mutex::new((None, false)),
        ready: parking_lot::Condvar::new(),
    });
    (OneTx(slot.clone()), OneRx(slot))
}

struct OneSlot<T> {
    /// The answer, and whether the sender is gone.
    state: parking_lot::Mutex<(Option<T>, bool)>,
    ready: parking_lot::Condvar,
}

/// The sending half of [`oneshot`].
pub struct OneTx<T>(Arc<OneSlot<T>>);

/// The receiving half of [`oneshot`].
pub struct OneRx<T>(Arc<OneSlot<T>>);

impl<T> OneTx<T> {
    /// Hands over the answer; `Err` gives it back when the receiver is gone.
    pub fn send(self, value: T) -> Result<(), T> {
        if Arc::strong_count(&self.0) == 1 {
            return Err(value);
        }
        self.0.state.lock().0 = Some(value);
        Ok(()) // dropping `self` wakes the receiver
    }
}

impl<T> Drop for OneTx<T> {
    fn drop(&mut self) {
        self.0.state.lock().1 = true;
        self.0.ready.notify_one();
    }
}

impl<T> OneRx<T> {
    /// The answer; `None` when the sender went away without one or `limit` passed.
    pub fn recv_timeout(&self, limit: Duration) -> Option<T> {
        let deadline = std::time::Instant::now() + limit;
        let mut state = self.0.state.lock();
        loop {
            if let Some(v) = state.0.take() {
                return Some(v);
            }
            if state.1 || self.0.ready.wait_until(&mut state, deadline).timed_out() {
                return state.0.take();
            }
        }
    }
}

/// Stack kept below the current frame by [`release_stack`].
const STACK_KEEP: usize = 8 * 1024;

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if rc == 0 && !s.is_empty() => s.to_string(),
        _ => "krill".to_string(),
    }
}

/// First eight characters of an id, for log lines.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {

    /// Resident KiB of the mapping that holds `addr` (this thread's stack).
    fn rss_of_mapping(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("Rss:") {
                    return v.trim().trim_end_matches(" kB").parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[inline(never)]
    fn deep(n: usize) -> u64 {
        let a = std::hint::black_box([n as u8; 1024]);
        if n == 0 {
            return a[0] as u64;
        }
        deep(n - 1) + a[1023] as u64
    }

    #[test]
    fn oneshot_hands_over_one_value_and_wakes_on_drop_or_timeout() {
        let (tx, rx) = oneshot();
        let h = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send(7).unwrap();
        });
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Some(7));
        h.join().unwrap();
        // A sender dropped unsent wakes the receiver at once.
        let (tx, rx) = oneshot::<u8>();
        let t = std::time::Instant::now();
        let h = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(tx);
        });
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), None);
        assert!(t.elapsed() < std::time::Duration::from_secs(4));
        h.join().unwrap();
        // No sender activity: the limit ends the wait.
        let (tx, rx) = oneshot::<u8>();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_millis(30)), None);
        // The receiver gone: the value comes back.
        drop(rx);
        assert_eq!(tx.send(3), Err(3));
    }

    #[test]
    fn release_stack_gives_back_what_lies_below_and_keeps_what_is_live() {
        std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(|| {
                let canary = std::hint::black_box([7u8; 4096]);
                let here = &canary as *const _ as usize;
                assert_eq!(deep(300), (0..=300u64).map(|n| n % 256).sum::<u64>());
                let before = rss_of_mapping(here);
                release_stack();
                let after = rss_of_mapping(here);
                assert!(before >= after + 200, "{before} KiB -> {after} KiB");
                assert!(canary.iter().all(|&b| b == 7), "live frames untouched");
                // The stack is usable again to the same depth.
                assert_eq!(deep(300), (0..=300u64).map(|n| n % 256).sum::<u64>());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00ABff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn uuid_shape() {
        let u = uuid_v4();
        assert!(is_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        assert_ne!(u, uuid_v4());
        assert!(!is_uuid("not-a-uuid"));
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_millis(1000), 0.1);
            assert!(j >= Duration::from_millis(900) && j <= Duration::from_millis(1100));
        }
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("krill-util-{}", uuid_v4()));
        ensure_dir(&dir, 0o700).unwrap();
        let p = dir.join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o400).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o400
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
