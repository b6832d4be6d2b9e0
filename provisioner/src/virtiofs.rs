//! virtiofsd: one per project, sharing the host source as tag `workspace`.
//!
//! Two implementations are supported. Debian's QEMU package ships the C
//! virtiofsd at `/usr/lib/qemu/virtiofsd` (nothing to build, present
//! wherever QEMU is), and `cargo install virtiofsd` gives the maintained
//! Rust one. Kennel prefers the Rust one when it is on `PATH`, else the C
//! one. Both run as root and pass uids through; Kennel maps ownership by
//! giving the guest's `dev` the uid of the source directory's owner (see
//! docs/guest.md), which works with either. The cache is off
//! (`none`/`never`): edits on either side are seen at once, like a bind
//! mount (`auto` can show a stale mode right after a host chmod).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::Host;
use crate::vmm::{pid_alive, pids_with, read_pid, signal, wait_exit};

/// Which virtiofsd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// QEMU's C virtiofsd (Debian: /usr/lib/qemu/virtiofsd).
    C,
    /// The Rust virtiofsd.
    Rust,
}

/// Starts the daemon that shares a source directory into a VM over
/// virtio-fs; a trait so the lifecycle can be tested without one.
#[async_trait::async_trait]
pub trait FsDaemon: Send + Sync {
    /// Starts sharing `source` on `socket`, logging to `log`, its pid in
    /// `pid_file`; returns once the socket is there. Stopping is by pid
    /// file ([`Virtiofsd::stop`]).
    async fn start(
        &self,
        socket: &Path,
        source: &Path,
        log: &Path,
        pid_file: &Path,
    ) -> Result<u32, VirtiofsError>;
}

/// No shares from this host: its projects run on Incus, which shares
/// their sources itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Elsewhere;

#[async_trait::async_trait]
impl FsDaemon for Elsewhere {
    async fn start(
        &self,
        _socket: &Path,
        _source: &Path,
        log: &Path,
        _pid_file: &Path,
    ) -> Result<u32, VirtiofsError> {
        Err(VirtiofsError::Exited {
            log: format!("projects run on Incus, not here ({})", log.display()),
        })
    }
}

#[async_trait::async_trait]
impl FsDaemon for Virtiofsd {
    async fn start(
        &self,
        socket: &Path,
        source: &Path,
        log: &Path,
        pid_file: &Path,
    ) -> Result<u32, VirtiofsError> {
        Virtiofsd::start(self, socket, source, log, pid_file).await
    }
}

/// A virtiofsd binary.
#[derive(Debug, Clone)]
pub struct Virtiofsd {
    pub binary: PathBuf,
    pub flavor: Flavor,
}

/// Why virtiofsd did not come up.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsError {
    #[error("cannot start virtiofsd ({binary})")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtiofsd exited at start: {log}")]
    Exited { log: String },
    #[error("virtiofsd did not create its socket {0} in time")]
    NoSocket(PathBuf),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Virtiofsd {
    /// The virtiofsd this host has: Rust on PATH first, then Debian's C one.
    pub fn detect(host: &Host) -> Option<Self> {
        if let Some(b) = host.which("virtiofsd", &[]) {
            return Some(Self {
                binary: b,
                flavor: Flavor::Rust,
            });
        }
        host.which(
            "virtiofsd",
            &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"],
        )
        .map(|b| Self {
            flavor: if b.starts_with("/usr/lib/qemu") {
                Flavor::C
            } else {
                Flavor::Rust
            },
            binary: b,
        })
    }

    /// The arguments to share `source` on `socket`.
    pub fn argv(&self, socket: &Path, source: &Path) -> Vec<OsString> {
        let s = |x: String| OsString::from(x);
        match self.flavor {
            Flavor::C => vec![
                s(format!("--socket-path={}", socket.display())),
                s("-o".into()),
                s(format!("source={}", source.display())),
                s("-o".into()),
                s("cache=none".into()),
                s("-o".into()),
                s("sandbox=namespace".into()),
                s("-o".into()),
                s("log_level=warn".into()),
            ],
            Flavor::Rust => vec![
                s(format!("--socket-path={}", socket.display())),
                s(format!("--shared-dir={}", source.display())),
                s("--cache=never".into()),
                s("--sandbox=namespace".into()),
                s("--log-level=warn".into()),
            ],
        }
    }

    /// Starts virtiofsd for `source` and waits until its socket exists.
    /// It exits by itself when its VMM disconnects.
    pub async fn start(
        &self,
        socket: &Path,
        source: &Path,
        log: &Path,
        pid_file: &Path,
    ) -> Result<u32, VirtiofsError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| VirtiofsError::Io { path, source }
        };
        // One left from before (its VMM killed, it still winding down)
        // holds the socket's lock: the new one would fail to start.
        Self::stop(pid_file, socket).await;
        let logf = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(log))?;
        let mut child = tokio::process::Command::new(&self.binary)
            .args(self.argv(socket, source))
            .stdin(std::process::Stdio::null())
            .stdout(logf.try_clone().map_err(io(log))?)
            .stderr(logf)
            .process_group(0)
            .spawn()
            .map_err(|source| VirtiofsError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(pid_file, format!("{pid}\n")).map_err(io(pid_file))?;
        let start = std::time::Instant::now();
        while !socket.exists() {
            if child.try_wait().ok().flatten().is_some() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                return Err(VirtiofsError::Exited {
                    log: crate::process::tail(&text, 5),
                });
            }
            if start.elapsed() > Duration::from_secs(5) {
                signal(pid, rustix::process::Signal::KILL);
                return Err(VirtiofsError::NoSocket(socket.to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(pid)
    }

    /// Stops a virtiofsd recorded in `pid_file` for `socket`, if it runs.
    pub async fn stop(pid_file: &Path, socket: &Path) {
        // The recorded process and any it forked: QEMU's C virtiofsd runs
        // its sandbox in a child, which holds the socket's lock and can
        // outlive a killed parent. Both name the socket.
        let needle = format!("--socket-path={}", socket.display());
        let mut pids = pids_with(&needle);
        if let Some(pid) = read_pid(pid_file).filter(|p| pid_alive(*p, &needle)) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        for sig in [rustix::process::Signal::TERM, rustix::process::Signal::KILL] {
            pids.retain(|p| pid_alive(*p, &needle));
            for p in &pids {
                signal(*p, sig);
            }
            for p in &pids {
                wait_exit(*p, &needle, Duration::from_secs(3)).await;
            }
        }
        let _ = std::fs::remove_file(pid_file);
        let _ = std::fs::remove_file(socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_flavors_share_with_the_cache_off() {
        let c = Virtiofsd {
            binary: "/usr/lib/qemu/virtiofsd".into(),
            flavor: Flavor::C,
        };
        let a: Vec<String> = c
            .argv(Path::new("/v/fs.sock"), Path::new("/src"))
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(a[0], "--socket-path=/v/fs.sock");
        assert!(a.contains(&"source=/src".to_owned()) && a.contains(&"cache=none".to_owned()));
        let r = Virtiofsd {
            binary: "/usr/bin/virtiofsd".into(),
            flavor: Flavor::Rust,
        };
        let a: Vec<String> = r
            .argv(Path::new("/v/fs.sock"), Path::new("/src"))
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert!(
            a.contains(&"--shared-dir=/src".to_owned()) && a.contains(&"--cache=never".to_owned())
        );
    }
}
