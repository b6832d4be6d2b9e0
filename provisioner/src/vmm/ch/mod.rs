//! The Cloud Hypervisor backend: the production backend on KVM hosts.
//!
//! One `cloud-hypervisor --api-socket` process per VM, driven through
//! [`client::ChClient`]. Facts from a real CH v54 shape it:
//! - virtio-fs needs `memory.shared = true`, checked at `vm.boot`;
//! - a missing virtio-fs socket makes `vm.boot` block the whole API for
//!   60 s, so the socket must exist before booting (checked here too);
//! - the API defaults are `serial: Null` and `console: Tty`, so both are
//!   set: serial to the console log file, console off;
//! - without `--no-shutdown` a guest power-off ends the process, which is
//!   what Kennel wants (a stopped VM costs nothing);
//! - the API socket answers about 70 ms after the process starts.
//!
//! CH has no user-mode networking: it needs a TAP (bridge mode).

pub mod client;
pub mod types;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use self::client::{ChApiError, ChClient};
use self::types::{
    ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, FsConfig, ImageType, MemoryConfig,
    NetConfig, PayloadConfig, RngConfig, VmConfig, VmResize, VmResizeDisk, VmState,
};
use super::{
    pid_alive, read_pid, signal, wait_exit, BackendKind, Machine, NetAttach, Vmm, VmmError,
    VmmState,
};

/// The Cloud Hypervisor backend.
#[derive(Debug, Clone)]
pub struct CloudHypervisor {
    pub binary: PathBuf,
}

impl From<ChApiError> for VmmError {
    fn from(e: ChApiError) -> Self {
        let endpoint = match &e {
            ChApiError::Api { endpoint, .. }
            | ChApiError::Timeout { endpoint, .. }
            | ChApiError::Decode { endpoint, .. }
            | ChApiError::Body { endpoint, .. } => (*endpoint).to_owned(),
            ChApiError::Connect { .. } => "connect".to_owned(),
        };
        VmmError::Api {
            endpoint,
            message: e.to_string(),
        }
    }
}

/// The `vm.create` body for a machine.
pub fn vm_config(m: &Machine) -> Result<VmConfig, VmmError> {
    let NetAttach::Tap { tap, mac, .. } = &m.net else {
        return Err(VmmError::Api {
            endpoint: "vm.create".into(),
            message: "Cloud Hypervisor has no user-mode networking; it needs bridge networking (CAP_NET_ADMIN), or use the QEMU backend".into(),
        });
    };
    let path = |p: &std::path::Path| p.display().to_string();
    Ok(VmConfig {
        cpus: Some(CpusConfig {
            boot_vcpus: m.vcpus,
            max_vcpus: m.vcpus,
        }),
        memory: Some(MemoryConfig {
            size: i64::try_from(m.memory_mib).unwrap_or(i64::MAX / (1 << 20)) << 20,
            shared: Some(true),
            hotplug_size: None,
        }),
        payload: PayloadConfig {
            kernel: Some(path(&m.kernel)),
            initramfs: Some(path(&m.initramfs)),
            cmdline: Some(m.cmdline.clone()),
            firmware: None,
        },
        disks: Some(vec![
            DiskConfig {
                path: Some(path(&m.disk)),
                id: Some("root".into()),
                image_type: Some(ImageType::Qcow2),
                backing_files: Some(true),
                readonly: None,
            },
            DiskConfig {
                path: Some(path(&m.config_disk)),
                id: Some("config".into()),
                image_type: Some(ImageType::Raw),
                readonly: Some(true),
                backing_files: None,
            },
        ]),
        // The TAP already exists on Kennel's bridge: no host IP on it.
        net: Some(vec![NetConfig {
            tap: Some(tap.clone()),
            mac: Some(mac.clone()),
            id: Some("net0".into()),
            ip: None,
            mask: None,
        }]),
        rng: Some(RngConfig {
            src: "/dev/urandom".into(),
        }),
        fs: Some(vec![FsConfig {
            tag: "workspace".into(),
            socket: path(&m.virtiofs_socket),
            num_queues: 1,
            queue_size: 1024,
            id: Some("workspace".into()),
        }]),
        serial: Some(ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some(path(&m.console_log)),
            socket: None,
        }),
        console: Some(ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
            socket: None,
        }),
        vsock: None,
    })
}

impl CloudHypervisor {
    fn client(m: &Machine) -> ChClient {
        ChClient::new(&m.control_socket)
    }

    fn needle(m: &Machine) -> String {
        m.control_socket.display().to_string()
    }
}

#[async_trait]
impl Vmm for CloudHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::CloudHypervisor
    }

    fn describe(&self) -> String {
        "cloud-hypervisor (kvm)".into()
    }

    async fn boot(&self, m: &Machine) -> Result<u32, VmmError> {
        let config = vm_config(m)?;
        if !m.virtiofs_socket.exists() {
            // vm.boot would block the whole API for 60 s and then fail.
            return Err(VmmError::NoSocket(m.virtiofs_socket.clone()));
        }
        let _ = std::fs::remove_file(&m.control_socket);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&m.vmm_log)?;
        let program = self.binary.display().to_string();
        let mut child = tokio::process::Command::new(&self.binary)
            .arg("--api-socket")
            .arg(format!("path={}", m.control_socket.display()))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                program: program.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(&m.pid_file, format!("{pid}\n"))?;
        let client = Self::client(m);
        let start = std::time::Instant::now();
        loop {
            if client.ping().await.is_ok() {
                break;
            }
            // Our own child: ask it (its /proc cmdline may predate exec).
            if child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(&m.vmm_log).unwrap_or_default();
                return Err(VmmError::Exited {
                    program,
                    log: crate::process::tail(&log, 10),
                });
            }
            if start.elapsed() > Duration::from_secs(5) {
                signal(pid, rustix::process::Signal::KILL);
                return Err(VmmError::NoSocket(m.control_socket.clone()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Tokio reaps the child if it exits while Kennel runs; if Kennel
        // goes first, it is re-parented and adopted on the next start.
        drop(child);
        let booted = async {
            client.create(&config).await?;
            client.with_timeout(Duration::from_secs(30)).boot().await
        }
        .await;
        if let Err(e) = booted {
            let _ = self.force_stop(m).await;
            return Err(e.into());
        }
        Ok(pid)
    }

    async fn state(&self, m: &Machine) -> Result<VmmState, VmmError> {
        let alive = read_pid(&m.pid_file).is_some_and(|p| pid_alive(p, &Self::needle(m)));
        if !alive {
            return Ok(VmmState::Gone);
        }
        match Self::client(m).info().await {
            Ok(info) => Ok(match info.state {
                VmState::Running => VmmState::Running,
                VmState::Paused | VmState::BreakPoint => VmmState::Paused,
                VmState::Created | VmState::Shutdown => VmmState::Stopped,
            }),
            Err(e) if e.status() == Some(404) => Ok(VmmState::Stopped),
            Err(e) => Err(e.into()),
        }
    }

    async fn grow_disk(&self, m: &Machine, bytes: u64) -> Result<(), VmmError> {
        Self::client(m)
            .resize_disk(&VmResizeDisk {
                id: Some("root".into()),
                desired_size: Some(i64::try_from(bytes).unwrap_or(i64::MAX)),
            })
            .await
            .map_err(Into::into)
    }

    /// `vm.resize` where the VM was booted to allow it: CPUs up to the
    /// `max_vcpus` it booted with, memory within its hotplug size (Kennel
    /// boots without, so memory waits for the next start).
    async fn resize_live(
        &self,
        m: &Machine,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(bool, bool), VmmError> {
        let client = Self::client(m);
        let info = client.info().await?;
        let (boot, max) = info
            .config
            .cpus
            .as_ref()
            .map_or((0, 0), |c| (c.boot_vcpus, c.max_vcpus));
        let mem = info.config.memory.as_ref();
        let size = mem.map_or(0, |m| m.size);
        let ceiling = size.saturating_add(mem.and_then(|m| m.hotplug_size).unwrap_or(0));
        let want_ram = i64::try_from(memory_mib).unwrap_or(i64::MAX / (1 << 20)) << 20;
        let cpus = vcpus != boot && vcpus <= max;
        let ram = want_ram > size && want_ram <= ceiling;
        if !cpus && !ram {
            return Ok((vcpus == boot, want_ram == size));
        }
        client
            .resize(&VmResize {
                desired_vcpus: cpus.then_some(vcpus),
                desired_ram: ram.then_some(want_ram),
                desired_balloon: None,
            })
            .await?;
        Ok((cpus || vcpus == boot, ram || want_ram == size))
    }

    async fn force_stop(&self, m: &Machine) -> Result<(), VmmError> {
        let needle = Self::needle(m);
        let Some(pid) = read_pid(&m.pid_file).filter(|p| pid_alive(*p, &needle)) else {
            return Ok(());
        };
        let client = Self::client(m).with_timeout(Duration::from_secs(5));
        // Not running is fine: the point is to end the process.
        let _ = client.shutdown().await;
        let _ = client.vmm_shutdown().await;
        if !wait_exit(pid, &needle, Duration::from_secs(5)).await {
            tracing::warn!(vm = %m.name, pid, "cloud-hypervisor did not exit; killing it");
            signal(pid, rustix::process::Signal::KILL);
            wait_exit(pid, &needle, Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_file(&m.pid_file);
        let _ = std::fs::remove_file(&m.control_socket);
        Ok(())
    }
}
