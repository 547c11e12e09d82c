//! Load from many client addresses at once, tallied per subject, for the
//! tests that check limits hold under concurrency and across gateways.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::http::get_as;

/// What one subject got from a [`SubjectLoad`].
#[derive(Debug, Clone, Default)]
pub struct SubjectTally {
    pub allowed: u64,
    pub limited: u64,
    pub fivexx: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl SubjectTally {
    /// Seconds between the first request's start and the last answer.
    pub fn span_s(&self) -> f64 {
        match (self.first, self.last) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// The most a token bucket of `burst` refilled at `rate` per second can
    /// have allowed over this subject's span (plus one for clock edges).
    pub fn bound(&self, burst: u64, rate: f64) -> u64 {
        burst + (rate * self.span_s()).floor() as u64 + 1
    }
}

/// Requests from many client addresses at once, spread over `threads`
/// threads and over the gateways' URLs in turn, each subject tallied. Every
/// thread stops when told or after `limit`.
pub struct SubjectLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tallies: Arc<std::sync::Mutex<HashMap<String, SubjectTally>>>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl SubjectLoad {
    pub fn start(
        urls: Vec<String>,
        subjects: Vec<String>,
        threads: usize,
        limit: Duration,
    ) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tallies = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let started = Instant::now();
        let handles = (0..threads)
            .map(|t| {
                let mine: Vec<String> = subjects.iter().skip(t).step_by(threads).cloned().collect();
                let (urls, stop, tallies) = (urls.clone(), stop.clone(), tallies.clone());
                thread::spawn(move || {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < limit
                        && !mine.is_empty()
                    {
                        let ip = &mine[n % mine.len()];
                        let url = &urls[n % urls.len()];
                        n += 1;
                        let at = Instant::now();
                        let r = get_as(url, ip);
                        let done = Instant::now();
                        let mut all = tallies.lock().unwrap();
                        let t: &mut SubjectTally = all.entry(ip.clone()).or_default();
                        match r.status {
                            200 => t.allowed += 1,
                            429 => t.limited += 1,
                            s if s >= 500 => t.fivexx += 1,
                            _ => {}
                        }
                        t.first.get_or_insert(at);
                        t.last = Some(done);
                    }
                })
            })
            .collect();
        SubjectLoad {
            stop,
            tallies,
            handles,
        }
    }

    /// Stops every thread and returns the tallies by subject.
    pub fn finish(mut self) -> HashMap<String, SubjectTally> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        std::mem::take(&mut *self.tallies.lock().unwrap())
    }
}
