//! A policy's stdout and stderr: each line to the host log at debug level under the
//! policy's name, cut to `LINE_MAX` bytes, at most one line per `PERIOD` per instance
//! (the rest counted and reported with the next line let through). A guest that prints
//! in a loop costs fuel, and here a bounded buffer and a throttled log line.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::log_throttle::LogThrottle;

/// A logged line is cut to this many bytes.
const LINE_MAX: usize = 512;
const PERIOD: Duration = Duration::from_millis(100);

/// Both output streams of one instance, sharing one throttle.
pub struct GuestOutput {
    policy: Arc<str>,
    throttle: Arc<LogThrottle>,
}

impl GuestOutput {
    pub fn new(policy: &Arc<str>) -> Self {
        Self {
            policy: Arc::clone(policy),
            throttle: Arc::new(LogThrottle::new(PERIOD)),
        }
    }

    pub fn stream(&self, name: &'static str) -> GuestStream {
        GuestStream {
            policy: Arc::clone(&self.policy),
            name,
            throttle: Arc::clone(&self.throttle),
        }
    }
}

pub struct GuestStream {
    policy: Arc<str>,
    name: &'static str,
    throttle: Arc<LogThrottle>,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter {
            policy: Arc::clone(&self.policy),
            name: self.name,
            throttle: Arc::clone(&self.throttle),
            line: Vec::new(),
            cut: false,
        })
    }

    /// For WASI 0.3, which is not linked: nothing reaches it.
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(tokio::io::sink())
    }
}

/// One stream handle's partial line (a guest may take a new handle per write; a line
/// split across handles is logged in pieces).
struct LineWriter {
    policy: Arc<str>,
    name: &'static str,
    throttle: Arc<LogThrottle>,
    line: Vec<u8>,
    /// The current line passed `LINE_MAX`: the rest of it is dropped.
    cut: bool,
}

impl LineWriter {
    /// Takes `bytes` in; returns the lines they complete (text, and whether it was cut).
    fn lines(&mut self, bytes: &[u8]) -> Vec<(String, bool)> {
        let mut done = Vec::new();
        for part in bytes.split_inclusive(|b| *b == b'\n') {
            let (text, ends) = match part.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (part, false),
            };
            let room = LINE_MAX - self.line.len();
            self.cut |= text.len() > room;
            self.line.extend_from_slice(&text[..text.len().min(room)]);
            if ends {
                done.push(self.finish());
            }
        }
        done
    }

    fn finish(&mut self) -> (String, bool) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        (line, std::mem::take(&mut self.cut))
    }

    fn emit(&self, (line, cut): (String, bool)) {
        if let Some(suppressed) = self.throttle.allow() {
            tracing::debug!(policy = %self.policy, stream = self.name, suppressed, cut, "{line}");
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    /// Always ready: writes are taken at once.
    async fn ready(&mut self) {}
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        for line in self.lines(&bytes) {
            self.emit(line);
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(4096)
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let line = self.finish();
            self.emit(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_joined_across_writes_and_cut() {
        let name: Arc<str> = Arc::from("p");
        let mut w = LineWriter {
            policy: Arc::clone(&name),
            name: "stdout",
            throttle: Arc::new(LogThrottle::new(PERIOD)),
            line: Vec::new(),
            cut: false,
        };
        assert_eq!(w.lines(b"one\ntw"), [("one".to_owned(), false)]);
        assert_eq!(
            w.lines(b"o\n\n"),
            [("two".to_owned(), false), (String::new(), false)]
        );
        let long = vec![b'x'; LINE_MAX * 3];
        assert!(w.lines(&long).is_empty());
        let done = w.lines(b"tail\nnext\n");
        assert_eq!(done[0], ("x".repeat(LINE_MAX), true));
        assert_eq!(done[1], ("next".to_owned(), false));
        assert!(w.line.is_empty());
    }
}
