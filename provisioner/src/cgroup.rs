//! cgroup v2 limits on a VM's processes (VMM and virtiofsd), where the
//! host offers a writable unified hierarchy: `kennel/<project>` with
//! `memory.max` (guest memory plus room for the VMM) and `cpu.max` (the
//! VM's vCPUs). Best effort: a host without it only loses the limits,
//! which is logged once per VM.

use std::path::{Path, PathBuf};

use crate::vmm::{read_pid, Machine};

const ROOT: &str = "/sys/fs/cgroup";
/// Memory the VMM and virtiofsd may use beyond the guest's RAM.
const OVERHEAD_MIB: u64 = 384;

fn dir(name: &str) -> PathBuf {
    Path::new(ROOT).join("kennel").join(name)
}

/// Puts the processes in `pid_files` under limits fitting `m`.
pub fn limit(name: &str, m: &Machine, pid_files: &[PathBuf]) {
    if let Err(e) = try_limit(name, m, pid_files) {
        tracing::debug!(vm = name, error = %e, "no cgroup v2 limits for this VM");
    }
}

fn try_limit(name: &str, m: &Machine, pid_files: &[PathBuf]) -> std::io::Result<()> {
    let root = Path::new(ROOT);
    if !root.join("cgroup.controllers").exists() {
        return Err(std::io::Error::other("no cgroup v2 hierarchy"));
    }
    let parent = root.join("kennel");
    std::fs::create_dir_all(&parent)?;
    std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
    let d = dir(name);
    std::fs::create_dir_all(&d)?;
    std::fs::write(
        d.join("memory.max"),
        ((m.memory_mib + OVERHEAD_MIB) << 20).to_string(),
    )?;
    std::fs::write(
        d.join("cpu.max"),
        format!("{} 100000", u64::from(m.vcpus) * 100_000),
    )?;
    for f in pid_files {
        if let Some(pid) = read_pid(f) {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
    }
    Ok(())
}

/// Removes a VM's cgroup once its processes are gone.
pub fn remove(name: &str) {
    let _ = std::fs::remove_dir(dir(name));
}
