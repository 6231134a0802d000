//! The node's log writer: every event is one line, and what a client sent cannot change that.
//!
//! Request data reaches log fields (a user name, a refused token's reason, a path). A value
//! with a newline could forge a second log line, ANSI escapes could rewrite a terminal, and a
//! megabyte-long value would cost a megabyte of disk per request. The formatter writes each
//! event with one `write`; this writer escapes control characters in it (keeping only the
//! final newline) and cuts it at [`MAX_LINE_BYTES`].

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// The longest line written; the rest of an event is replaced by a count of what was cut.
pub const MAX_LINE_BYTES: usize = 4096;

/// Escapes and bounds one formatted event. Control characters become `\n`, `\r`, `\t` or
/// `\x1b`-style escapes; the event's own trailing newline stays.
pub fn sanitize(event: &[u8]) -> Vec<u8> {
    let (body, newline) = match event.strip_suffix(b"\n") {
        Some(b) => (b, true),
        None => (event, false),
    };
    let mut out = Vec::with_capacity(body.len().min(MAX_LINE_BYTES) + 32);
    let mut cut = 0usize;
    for (i, &b) in body.iter().enumerate() {
        if out.len() >= MAX_LINE_BYTES {
            cut = body.len() - i;
            break;
        }
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b'\t'),
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    if cut > 0 {
        // The cut may split a character: keep the text valid UTF-8.
        out = String::from_utf8_lossy(&out).into_owned().into_bytes();
        out.extend_from_slice(format!("... ({cut} more bytes cut)").as_bytes());
    }
    if newline {
        out.push(b'\n');
    }
    out
}

/// A budget for a log line that clients can trigger at will (a refused login, a refused
/// connection): at most `per_sec` lines a second; the lines it holds back are counted and
/// reported on the next line it lets through.
#[derive(Debug)]
pub struct Throttle {
    per_sec: u64,
    second: AtomicU64,
    used: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    pub const fn new(per_sec: u64) -> Self {
        Self {
            per_sec,
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one written; `None` when this one must be held back.
    pub fn admit(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_sec {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Standard error, through [`sanitize`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SafeStderr {
    type Writer = SafeWriter;

    fn make_writer(&'a self) -> Self::Writer {
        SafeWriter
    }
}

#[derive(Debug)]
pub struct SafeWriter;

impl Write for SafeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().lock().write_all(&sanitize(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value with a newline and an ANSI escape stays inside its one line, escaped.
    #[test]
    fn forged_lines_and_escapes_are_escaped() {
        let event = b"INFO refused user=\"eve\n2026-01-01 INFO admin logged in\x1b[2J\"\n";
        let out = sanitize(event);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(out.ends_with(b"\n"));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("eve\\n2026"), "{text}");
        assert!(text.contains("\\x1b[2J"), "{text}");
    }

    /// The budget lets `per_sec` lines through and counts the rest for the next line.
    #[test]
    fn throttle_holds_back_and_counts() {
        let t = Throttle::new(3);
        let admitted: Vec<_> = (0..10).map(|_| t.admit()).collect();
        let n = admitted.iter().filter(|a| a.is_some()).count();
        // A second boundary may fall inside the loop: then up to twice the budget passes.
        assert!((3..=6).contains(&n), "{admitted:?}");
        assert_eq!(admitted[0], Some(0));
    }

    /// A huge event is cut to the bound and says how much was cut.
    #[test]
    fn long_events_are_cut() {
        let mut event = vec![b'a'; 1 << 20];
        event.push(b'\n');
        let out = sanitize(&event);
        assert!(out.len() < MAX_LINE_BYTES + 64, "{}", out.len());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&format!("({} more bytes cut)", (1 << 20) - MAX_LINE_BYTES)));
        assert!(text.ends_with('\n'));
    }
}
