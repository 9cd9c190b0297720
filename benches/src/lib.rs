//! Shared helpers for kvpool's criterion benchmarks (see `benches/`).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that owns a Mooncake segment: it prints `ready` once the segment is
/// mounted and keeps it until its stdin closes, which dropping this does.
#[derive(Debug)]
pub struct SegmentOwner(Child);

impl SegmentOwner {
    /// Starts `command` with piped stdin and stdout and waits for its `ready` line.
    ///
    /// # Panics
    /// When the process cannot start or says anything else first: a bench cannot go on.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the segment owner");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the owner's first line");
        assert_eq!(line.trim(), "ready", "the owner process did not start");
        SegmentOwner(child)
    }
}

impl Drop for SegmentOwner {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The owner side of [`SegmentOwner`]: says `ready`, then blocks until stdin closes. Call it
/// outside the runtime's `block_on`, so the runtime's workers keep the segment alive meanwhile.
pub fn announce_ready_and_wait_for_stdin() {
    println!("ready");
    std::io::stdout().flush().expect("flush stdout");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
