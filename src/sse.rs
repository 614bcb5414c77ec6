//! Server-Sent Events (PROTOCOL §6): frames, the writer that serves one subscriber
//! from its bounded queue, and the reader a peer thread uses on another server's
//! stream (bounded line length).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::proto;
use crate::state::Counters;

/// One serialized event, shared by every subscriber that gets it.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    /// An event about one of this server's own nodes (own-scope subscribers get it).
    pub own: bool,
    pub text: String,
}

/// A frame of JSON that is already serialized: what [`frame_json`] writes (tests).
#[cfg(test)]
pub fn frame_text(session: &str, seq: u64, event: &str, data: &str) -> String {
    debug_assert!(!data.contains('\n'), "compact JSON has no newlines");
    format!("id: {session}:{seq}\nevent: {event}\ndata: {data}\n\n")
}

/// `id: <session>:<seq>\nevent: <kind>\ndata: <json>\n\n`, with `data` serialized as
/// compact JSON (no newlines) straight into one buffer sized for a typical node
/// (growing it step by step, then copying the JSON into the frame, was a tenth of a
/// busy mirroring server's CPU).
pub fn frame_json(session: &str, seq: u64, event: &str, data: &impl serde::Serialize) -> String {
    let mut out = Vec::with_capacity(FRAME_CAPACITY);
    // Writes to a Vec cannot fail, and the nodes' JSON always serializes.
    let _ = write!(out, "id: {session}:{seq}\nevent: {event}\ndata: ");
    serde_json::to_writer(&mut out, data).expect("frames serialize");
    out.extend_from_slice(b"\n\n");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Room a frame starts with: a data point's event is 300-500 bytes.
const FRAME_CAPACITY: usize = 640;

/// Splits a `Last-Event-ID` into session and sequence.
pub fn parse_event_id(id: &str) -> Option<(&str, u64)> {
    let (s, n) = id.trim().rsplit_once(':')?;
    Some((s, n.parse().ok()?))
}

pub const HEADERS: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\nX-Accel-Buffering: no\r\n\r\n";

/// Bytes of frames gathered into one write (one TLS record, one send) before it goes
/// out; a batch is written at its end anyway.
const WRITE_BUFFER: usize = 16 * 1024;

/// Buffer kept between batches; a larger one (a burst) is given back, so an idle
/// subscriber holds a few hundred bytes, not [`WRITE_BUFFER`].
const IDLE_BUFFER: usize = 1024;

/// Serves one subscriber: headers, the initial frames, then whatever the state owner
/// queues, with a `:` comment after every `keepalive` of silence. Returns when the
/// client goes away or the state owner drops the queue (slow subscriber, shutdown).
pub fn serve(
    mut w: Box<dyn Write + Send>,
    initial: Vec<Arc<Frame>>,
    rx: Receiver<Arc<Frame>>,
    keepalive: Duration,
    counters: &Counters,
) -> io::Result<()> {
    // Every write under here is a TLS record and a send(2): the frames already
    // queued go out as one (one write per frame was a fifth of a busy server's CPU).
    // A frame that comes alone is written as it is, without a copy.
    let mut buf: Vec<u8> = Vec::new();
    let write = |w: &mut Box<dyn Write + Send>, bytes: &[u8]| -> io::Result<()> {
        w.write_all(bytes)?;
        w.flush()?;
        counters.add(&counters.data_sent, bytes.len() as u64);
        Ok(())
    };
    let send = |w: &mut Box<dyn Write + Send>, buf: &mut Vec<u8>| -> io::Result<()> {
        write(w, buf)?;
        buf.clear();
        if buf.capacity() > IDLE_BUFFER {
            *buf = Vec::new();
        }
        Ok(())
    };
    buf.extend_from_slice(HEADERS.as_bytes());
    for f in &initial {
        buf.extend_from_slice(f.text.as_bytes());
        if buf.len() >= WRITE_BUFFER {
            send(&mut w, &mut buf)?;
        }
    }
    drop(initial);
    send(&mut w, &mut buf)?;
    loop {
        match rx.recv_timeout(keepalive) {
            Ok(f) => {
                let Ok(next) = rx.try_recv() else {
                    write(&mut w, f.text.as_bytes())?;
                    continue;
                };
                // A batch: one buffer of the size it may reach, no growing.
                buf.reserve(WRITE_BUFFER + f.text.len() + next.text.len());
                buf.extend_from_slice(f.text.as_bytes());
                buf.extend_from_slice(next.text.as_bytes());
                while buf.len() < WRITE_BUFFER {
                    match rx.try_recv() {
                        Ok(f) => buf.extend_from_slice(f.text.as_bytes()),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => buf.extend_from_slice(b":\n\n"),
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        send(&mut w, &mut buf)?;
    }
}

/// One event as read from a stream.
#[derive(Debug, Default, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Reads events from a stream, refusing lines over [`proto::MAX_SSE_LINE_BYTES`].
pub struct Reader<R> {
    inner: R,
    /// `buf[start..end]` is read and not yet returned; `buf[end..]` is room that the
    /// next read fills directly (zeroed once when the buffer grows, never per read).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `buf[start..scanned]` holds no newline: a long line arriving in small reads
    /// is searched once, not once per read.
    scanned: usize,
    /// Bytes read so far (for stats).
    pub bytes: u64,
}

/// Room a reader starts with: most events are a few hundred bytes, and the stream
/// under it (ureq) buffers 8 KiB already.
const READ_ROOM: usize = 1024;
/// A buffer grown past this for one long event (a snapshot) shrinks back to
/// [`READ_ROOM`] once it is drained, so a peer stream does not keep it for good.
const READ_ROOM_KEEP: usize = 64 * 1024;

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            buf: vec![0; READ_ROOM],
            start: 0,
            end: 0,
            scanned: 0,
            bytes: 0,
        }
    }

    fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            let pending = &self.buf[self.start..self.end];
            let from = self.scanned.saturating_sub(self.start);
            if let Some(pos) = pending[from..].iter().position(|&b| b == b'\n') {
                let pos = from + pos;
                let mut line = &pending[..pos];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let s = String::from_utf8(line.to_vec()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "SSE line is not UTF-8")
                })?;
                self.start += pos + 1;
                self.scanned = self.start;
                return Ok(Some(s));
            }
            if pending.len() > proto::MAX_SSE_LINE_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "SSE line over 1 MiB",
                ));
            }
            if self.start == self.end && self.buf.len() > READ_ROOM_KEEP {
                self.buf = vec![0; READ_ROOM];
                (self.start, self.end) = (0, 0);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            self.scanned = self.end;
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.inner.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes += n as u64;
            self.end += n;
        }
    }

    /// The next event; `Ok(None)` at the end of the stream. Comments are skipped
    /// (they only keep the connection's read timeout from firing).
    pub fn next_event(&mut self) -> io::Result<Option<Event>> {
        let mut ev = Event::default();
        let mut has = false;
        loop {
            let Some(line) = self.line()? else {
                return Ok(None);
            };
            if line.is_empty() {
                if has {
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    return Ok(Some(ev));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "id" => ev.id = Some(value.to_string()),
                "event" => ev.event = value.to_string(),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                    if ev.data.len() > proto::MAX_SSE_LINE_BYTES {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "SSE event over 1 MiB",
                        ));
                    }
                }
                _ => continue,
            }
            has = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_ids() {
        let t = frame_text("s1", 7, "node", "{\"a\":1}");
        assert_eq!(t, "id: s1:7\nevent: node\ndata: {\"a\":1}\n\n");
        let v = serde_json::json!({"a": 1, "s": "x\ny"});
        assert_eq!(
            frame_json("s1", 7, "node", &v),
            frame_text("s1", 7, "node", &v.to_string())
        );
        assert_eq!(parse_event_id("abc-def:12"), Some(("abc-def", 12)));
        assert_eq!(parse_event_id("nope"), None);
        assert_eq!(parse_event_id("s:x"), None);
    }

    #[test]
    fn reader_parses_events_and_skips_comments() {
        let text = ":\n\nid: s:1\nevent: snapshot\ndata: {}\n\n:\n\nid: s:2\r\nevent: node\r\ndata: {\"x\":1}\r\n\r\ndata: a\ndata: b\n\n";
        let mut r = Reader::new(text.as_bytes());
        let e = r.next_event().unwrap().unwrap();
        assert_eq!(
            (e.id.as_deref(), e.event.as_str(), e.data.as_str()),
            (Some("s:1"), "snapshot", "{}")
        );
        let e = r.next_event().unwrap().unwrap();
        assert_eq!((e.id.as_deref(), e.event.as_str()), (Some("s:2"), "node"));
        let e = r.next_event().unwrap().unwrap();
        assert_eq!((e.event.as_str(), e.data.as_str()), ("message", "a\nb"));
        assert_eq!(r.next_event().unwrap(), None);
        assert_eq!(r.bytes as usize, text.len());
    }

    /// A reader handing out a few bytes per read, to cross every buffer boundary.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(out.len()).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn reader_handles_events_split_across_reads_and_longer_than_its_room() {
        let long = "y".repeat(3 * READ_ROOM_KEEP);
        let text = format!("event: a\ndata: {long}\n\nevent: b\ndata: 1\n\n");
        for step in [1, 7, 4096, 1 << 20] {
            let mut r = Reader::new(Trickle(text.as_bytes(), step));
            let e = r.next_event().unwrap().unwrap();
            assert_eq!((e.event.as_str(), e.data.len()), ("a", long.len()));
            let e = r.next_event().unwrap().unwrap();
            assert_eq!((e.event.as_str(), e.data.as_str()), ("b", "1"));
            assert_eq!(r.next_event().unwrap(), None);
            assert!(r.buf.len() <= READ_ROOM_KEEP, "room kept: {}", r.buf.len());
        }
    }

    #[test]
    fn reader_refuses_huge_lines() {
        let big = format!("data: {}", "x".repeat(proto::MAX_SSE_LINE_BYTES + 10));
        let mut r = Reader::new(big.as_bytes());
        assert_eq!(
            r.next_event().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn writer_sends_keepalives_and_stops_when_dropped() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let out = Arc::new(parking_lot::Mutex::new(Vec::new()));
        struct W(Arc<parking_lot::Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let w = Box::new(W(out.clone()));
        let first = Arc::new(Frame {
            seq: 0,
            own: true,
            text: frame_text("s", 0, "snapshot", "{}"),
        });
        tx.send(Arc::new(Frame {
            seq: 1,
            own: true,
            text: frame_text("s", 1, "node", "{}"),
        }))
        .unwrap();
        let h = std::thread::spawn(move || {
            serve(
                w,
                vec![first],
                rx,
                Duration::from_millis(20),
                &Counters::default(),
            )
        });
        std::thread::sleep(Duration::from_millis(120));
        drop(tx);
        h.join().unwrap().unwrap();
        let text = String::from_utf8(out.lock().clone()).unwrap();
        assert!(text.starts_with(HEADERS));
        let body = &text[HEADERS.len()..];
        assert!(body.starts_with("id: s:0\nevent: snapshot"), "{body}");
        assert!(body.contains("id: s:1\nevent: node"));
        assert!(body.matches(":\n\n").count() >= 2, "keep-alives: {body}");
    }
}
