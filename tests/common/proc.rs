//! Processes and the plumbing around them: free ports, waiting, child
//! processes killed on drop, signals, libfaketime and scratch files. Every
//! other part of the harness starts its servers through these.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    // Ports handed out by this process are never reused within it.
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut used = USED.lock().unwrap();
        // Cluster bus ports are port + 10000: keep both free.
        if port < 50000
            && !used.contains(&port)
            && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            used.push(port);
            return port;
        }
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A child process this harness started, killed when dropped.
#[derive(Default)]
pub struct Proc(pub(super) Option<Child>);

impl Proc {
    /// Takes charge of a process the test spawned itself.
    pub fn new(child: Child) -> Proc {
        Proc(Some(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            signal(c.id(), "CONT");
        }
        self.kill9();
    }
}
pub(super) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// libfaketime, preloaded into a process to skew or pin its clock (the
/// `faketime` command would fork, leaving a process the harness cannot stop).
pub fn libfaketime() -> &'static str {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    .copied()
    .expect("libfaketime is needed for this test: apt-get install -y faketime")
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
