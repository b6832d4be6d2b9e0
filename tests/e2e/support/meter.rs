//! What a process (the daemon) spends while a load runs: CPU seconds,
//! peak resident memory and peak open descriptors, sampled from /proc, as
//! one row of the table the load tests print (`LOAD | ...`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The daemon's CPU time, peak resident memory and peak open descriptors
/// while a phase runs.
pub struct Meter {
    pid: u32,
    cpu0: u64,
    started: Instant,
    peak_kib: Arc<AtomicU64>,
    start_kib: u64,
    peak_fds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is 3rd; utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Fields of /proc/PID/status by name (e.g. "VmRSS:"), trimmed; empty
/// when the process is gone.
fn status_fields<const N: usize>(pid: u32, names: [&str; N]) -> [String; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("", str::trim)
            .to_owned()
    })
}

fn rss_kib(pid: u32) -> u64 {
    let [rss] = status_fields(pid, ["VmRSS:"]);
    rss.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The parts of `pid`'s resident memory (anonymous, file-backed) and its
/// threads, from /proc/PID/status.
pub fn rss_parts(pid: u32) -> String {
    let [anon, file, threads] = status_fields(pid, ["RssAnon:", "RssFile:", "Threads:"]);
    format!("anon {anon}, file {file}, threads {threads}")
}

/// KiB as MiB, for the table.
#[allow(clippy::cast_precision_loss)]
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The process's resident memory once it has settled: sampled until two
/// readings a second apart agree within 1 % (at most `limit`), in KiB.
pub fn rss_settled(pid: u32, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = rss_kib(pid);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss_kib(pid);
        if now.abs_diff(last) * 100 <= last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

impl Meter {
    /// The peak resident memory so far, in KiB.
    pub fn peak_kib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed)
    }

    /// The resident memory when the phase began, in KiB.
    pub fn start_kib(&self) -> u64 {
        self.start_kib
    }

    pub fn start(pid: u32) -> Self {
        let start_kib = rss_kib(pid);
        let peak_kib = Arc::new(AtomicU64::new(start_kib));
        let peak_fds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, f, s) = (peak_kib.clone(), peak_fds.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
                f.fetch_max(fds as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            pid,
            cpu0: cpu_ticks(pid),
            started: Instant::now(),
            peak_kib,
            start_kib,
            peak_fds,
            stop,
            sampler: Some(sampler),
        }
    }

    /// Prints the phase's row: what held, errors, seconds, daemon CPU
    /// seconds and peak RSS.
    pub fn report(mut self, phase: &str, held: &str, errors: usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            t.join().unwrap();
        }
        #[allow(clippy::cast_precision_loss)]
        let cpu = (cpu_ticks(self.pid) - self.cpu0) as f64 / 100.0;
        eprintln!(
            "LOAD | {phase:<29} | {held:<34} | {errors:>6} | {:>6.1} | {cpu:>6.2} | {:>7.1} | {:>5} |",
            self.started.elapsed().as_secs_f64(),
            self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0,
            self.peak_fds.load(Ordering::Relaxed)
        );
    }
}

pub fn header() {
    eprintln!(
        "LOAD | {:<29} | {:<34} | {:>6} | {:>6} | {:>6} | {:>7} | {:>5} |",
        "phase", "held", "errors", "secs", "cpu s", "rss MiB", "fds"
    );
}
