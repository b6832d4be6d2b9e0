//! VMM backends: what a machine is ([`Machine`]), and the small [`Vmm`]
//! trait that Cloud Hypervisor ([`ch`]) and QEMU ([`qemu`]) implement.
//!
//! A backend only starts, queries and force-stops the VMM process. Graceful
//! shutdown (asking the guest), readiness and supervision are the same for
//! both and live in [`crate::lifecycle`].

pub mod ch;
pub mod qemu;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Which backend runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    CloudHypervisor,
    Qemu,
    /// Instances of an Incus server or cluster ([`crate::incus`]).
    Incus,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::CloudHypervisor => "cloud-hypervisor",
            BackendKind::Qemu => "qemu",
            BackendKind::Incus => "incus",
        })
    }
}

/// How a VM's network is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum NetAttach {
    /// QEMU user-mode networking: the guest is 10.0.2.15 behind NAT; the
    /// host reaches its sshd and app through forwards bound to `host_ip`,
    /// a loopback address of this VM's own, so no other VM can reach them.
    User {
        host_ip: String,
        ssh_port: u16,
        app_port: u16,
        guest_app_port: u16,
    },
    /// A TAP on Kennel's bridge; the guest has `guest_ip` on it.
    Tap {
        tap: String,
        mac: String,
        guest_ip: String,
        prefix: u8,
        gateway: String,
    },
}

impl NetAttach {
    /// The address and port at which the host reaches the guest's sshd.
    pub fn ssh_addr(&self) -> String {
        match self {
            NetAttach::User {
                host_ip, ssh_port, ..
            } => format!("{host_ip}:{ssh_port}"),
            NetAttach::Tap { guest_ip, .. } => format!("{guest_ip}:22"),
        }
    }

    /// The address and port at which the host reaches the guest's app.
    pub fn app_addr(&self, guest_app_port: u16) -> String {
        match self {
            NetAttach::User {
                host_ip, app_port, ..
            } => format!("{host_ip}:{app_port}"),
            NetAttach::Tap { guest_ip, .. } => format!("{guest_ip}:{guest_app_port}"),
        }
    }
}

/// Everything a backend needs to run one VM. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// The qcow2 root disk (a child of the stack image).
    pub disk: PathBuf,
    /// The read-only KENNELCFG disk.
    pub config_disk: PathBuf,
    /// virtiofsd's vhost-user socket (tag `workspace`).
    pub virtiofs_socket: PathBuf,
    /// Where the serial console is written.
    pub console_log: PathBuf,
    /// The VMM's control socket (CH API or QMP).
    pub control_socket: PathBuf,
    /// The VMM's pid file.
    pub pid_file: PathBuf,
    /// The VMM's own stderr/stdout.
    pub vmm_log: PathBuf,
    pub net: NetAttach,
}

/// What a backend says about its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmmState {
    /// The VMM process is not running.
    Gone,
    Running,
    Paused,
    /// The VMM runs but the guest is not running (created, shut down).
    Stopped,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited during start-up: {log}")]
    Exited { program: String, log: String },
    /// The VM's host address (a forwarded port, a TAP) was taken by
    /// another process between choosing it and starting the VMM.
    #[error("{program} could not bind the VM's host address, which another process holds: {log}")]
    AddressInUse { program: String, log: String },
    #[error("the VMM's control socket {0} did not appear in time")]
    NoSocket(PathBuf),
    #[error("the VMM API refused {endpoint}: {message}")]
    Api { endpoint: String, message: String },
    #[error("talking to the VMM failed")]
    Io(#[from] std::io::Error),
}

/// A VMM backend.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// A description for logs and `doctor` (e.g. `qemu (tcg)`).
    fn describe(&self) -> String;
    /// Whether the guest's CPU is emulated rather than virtualised (QEMU
    /// without KVM): everything in the guest takes several times longer.
    fn emulated(&self) -> bool {
        false
    }
    /// Starts the VMM process for `m` and boots the guest. The virtio-fs
    /// socket must already exist. Returns the VMM's pid.
    async fn boot(&self, m: &Machine) -> Result<u32, VmmError>;
    /// The VMM's view of the VM.
    async fn state(&self, m: &Machine) -> Result<VmmState, VmmError>;
    /// Stops the VM without the guest's help and ends the VMM process.
    async fn force_stop(&self, m: &Machine) -> Result<(), VmmError>;
    /// Points a running VM's host-side app forward at `guest_port` (`m`
    /// still names the old one). Nothing to do when the host reaches the
    /// guest's address directly (a TAP).
    async fn set_app_forward(&self, _m: &Machine, _guest_port: u16) -> Result<(), VmmError> {
        Ok(())
    }
    /// Whether a running VM's disk can be checkpointed live
    /// ([`Vmm::switch_disk`]); otherwise the VM must be stopped for it.
    fn live_checkpoints(&self) -> bool {
        false
    }
    /// Pauses a running guest (its vCPUs stop; devices settle).
    async fn pause(&self, _m: &Machine) -> Result<(), VmmError> {
        Err(unsupported(self.describe(), "pause"))
    }
    /// Resumes a paused guest.
    async fn resume(&self, _m: &Machine) -> Result<(), VmmError> {
        Err(unsupported(self.describe(), "resume"))
    }
    /// Makes a running VM write its root disk to `next` from now on: an
    /// existing qcow2 child of the disk as it is, so what the disk held
    /// until now stays as it is (a checkpoint's layer).
    async fn switch_disk(&self, _m: &Machine, _next: &std::path::Path) -> Result<(), VmmError> {
        Err(unsupported(self.describe(), "a live disk switch"))
    }
    /// Grows a running VM's root disk to `bytes` (the guest sees the new
    /// size; its filesystem is grown by the caller).
    async fn grow_disk(&self, _m: &Machine, _bytes: u64) -> Result<(), VmmError> {
        Err(unsupported(self.describe(), "a live disk resize"))
    }
    /// Gives a running VM `vcpus` CPUs and `memory_mib` of memory where
    /// it can without a restart; says which of the two took effect.
    async fn resize_live(
        &self,
        _m: &Machine,
        _vcpus: u32,
        _memory_mib: u64,
    ) -> Result<(bool, bool), VmmError> {
        Ok((false, false))
    }
}

/// The VMM of a host whose projects run elsewhere (on Incus): Kennel's
/// host side only prepares sources, images and keys there, and nothing
/// may start a VM on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Elsewhere;

#[async_trait]
impl Vmm for Elsewhere {
    fn kind(&self) -> BackendKind {
        BackendKind::Incus
    }
    fn describe(&self) -> String {
        "incus".into()
    }
    async fn boot(&self, m: &Machine) -> Result<u32, VmmError> {
        Err(unsupported(
            format!("this host (projects run on Incus; not {})", m.name),
            "boot",
        ))
    }
    async fn state(&self, _m: &Machine) -> Result<VmmState, VmmError> {
        Ok(VmmState::Gone)
    }
    async fn force_stop(&self, _m: &Machine) -> Result<(), VmmError> {
        Ok(())
    }
}

fn unsupported(backend: String, what: &str) -> VmmError {
    VmmError::Api {
        endpoint: what.to_owned(),
        message: format!("{backend} cannot do this"),
    }
}

/// Reads a pid file.
pub fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is alive and its command line contains `needle` (so a
/// recycled pid is not mistaken for our process).
pub fn pid_alive(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false);
            !zombie && String::from_utf8_lossy(&c).contains(needle)
        })
        .unwrap_or(false)
}

/// CPU time (user and system, all threads) that `pid` has used, if it is
/// still the process `needle` names.
pub fn cpu_time(pid: u32, needle: &str) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if !pid_alive(pid, needle) {
        return None;
    }
    ticks_in_stat(&stat).map(|t| {
        let hz = rustix::param::clock_ticks_per_second().max(1);
        std::time::Duration::from_millis(t.saturating_mul(1000) / hz)
    })
}

/// utime + stime from a /proc/PID/stat line, in clock ticks (fields 14
/// and 15; counted after the command name, which may hold anything).
fn ticks_in_stat(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_ascii_whitespace();
    // After ")": state is field 3, so utime (14) is the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// Waits up to `limit` for `pid` to exit.
pub async fn wait_exit(pid: u32, needle: &str, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if !pid_alive(pid, needle) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    !pid_alive(pid, needle)
}

/// Every live process whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| pid_alive(*p, needle))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends a signal to a process (no-op if it is gone).
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_any_command_name() {
        // A name with spaces and a ')' of its own, as a guest-named
        // process could have.
        let line =
            "4242 (qemu) x (y) S 1 4242 4242 0 -1 4194560 900 0 0 0 731 269 0 0 20 0 5 0 1000 0 0";
        assert_eq!(ticks_in_stat(line), Some(1000));
        assert_eq!(ticks_in_stat("garbage"), None);
        assert_eq!(ticks_in_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn cpu_time_of_a_live_process_and_of_a_wrong_one() {
        let me = std::process::id();
        let exe = std::env::args().next().unwrap();
        // Burn a little CPU so there is some to see.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        assert!(x != 1);
        assert!(cpu_time(me, &exe).is_some());
        assert_eq!(cpu_time(me, "not-this-process-at-all"), None);
    }
}
