//! The QEMU backend: for hosts where KVM cannot run guests (laptops, CI,
//! nested PVM) and as a fallback.
//!
//! One `qemu-system-x86_64` per VM, started with `-daemonize` so it
//! outlives Kennel, and controlled over QMP with the `qapi` crate (status,
//! quit), never by parsing its console. Machine type `q35`: measured within
//! noise of `microvm` under TCG, and it needs none of microvm's workarounds
//! (`pit=on`, `tsc_early_khz`, non-legacy virtio-mmio for vhost-user-fs).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    pid_alive, read_pid, signal, wait_exit, BackendKind, Machine, NetAttach, Vmm, VmmError,
    VmmState,
};

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Software emulation.
    Tcg,
}

/// The CPU QEMU shows a guest under emulation (TCG) unless configured
/// (`vm.emulated_cpu`): x86-64-v2 (SSE4.2, POPCNT), which every Debian
/// and distribution binary runs on. TCG's `max` also offers AVX2, FMA,
/// AES and 5-level paging, which the guest's libraries then use and QEMU
/// emulates through slower helpers: in one run here (docs/guest.md,
/// "Measurements"), 300 process starts took 12.2–14.8 s against
/// 15.3–17.9 with `max`, and a checksum of 64 MB and a copy of
/// `/usr/lib` 6.6–7.4 s against 10.7–12.7. Under KVM the guest gets the
/// host's CPU.
pub const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
    /// The CPU model (`-cpu`) under TCG: [`TCG_CPU`] unless configured.
    pub tcg_cpu: String,
    /// The group QEMU runs in, which the host guard's rules name
    /// ([`crate::hostguard`]); `None`: unguarded.
    pub guest_gid: Option<u32>,
}

/// The guest network user-mode networking presents.
pub const USER_NET: &str = "10.0.2.0/24";

impl Qemu {
    /// The command line for `m` (without `-daemonize`), in order.
    pub fn argv(&self, m: &Machine) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", self.tcg_cpu.as_str()),
        };
        push("-name".into());
        push(format!("kennel-{},process=kennel-{}", m.name, m.name));
        push("-machine".into());
        match self.accel {
            Accel::Kvm => push(format!("q35,accel={accel}")),
            Accel::Tcg => {
                // TCG's translation cache grows toward 1 GiB by default;
                // 64 MiB boots as fast here and halves QEMU's own memory
                // (221 → 125 MiB outside guest RAM, bench/provision.sh).
                push("q35".into());
                push("-accel".into());
                push("tcg,tb-size=64".into());
            }
        }
        push("-cpu".into());
        push(cpu.into());
        push("-smp".into());
        push(m.vcpus.to_string());
        push("-m".into());
        push(format!("{}M", m.memory_mib));
        // vhost-user-fs needs guest memory the virtiofsd process can map.
        push("-object".into());
        push(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            m.memory_mib
        ));
        push("-numa".into());
        push("node,memdev=mem".into());
        push("-kernel".into());
        push(m.kernel.display().to_string());
        push("-initrd".into());
        push(m.initramfs.display().to_string());
        push("-append".into());
        push(m.cmdline.clone());
        push("-drive".into());
        push(format!(
            "file={},if=none,id=root,format=qcow2,discard=unmap",
            m.disk.display()
        ));
        push("-device".into());
        push("virtio-blk-pci,drive=root".into());
        push("-drive".into());
        push(format!(
            "file={},if=none,id=cfg,format=raw,readonly=on",
            m.config_disk.display()
        ));
        push("-device".into());
        push("virtio-blk-pci,drive=cfg".into());
        push("-chardev".into());
        push(format!(
            "socket,id=vfs,path={}",
            m.virtiofs_socket.display()
        ));
        push("-device".into());
        push("vhost-user-fs-pci,chardev=vfs,tag=workspace".into());
        push("-netdev".into());
        match &m.net {
            NetAttach::User {
                host_ip,
                ssh_port,
                app_port,
                guest_app_port,
            } => {
push(format!(
                "user,id=n0,net={USER_NET},hostfwd=tcp:{host_ip}:{ssh_port}-:22,hostfwd=tcp:{host_ip}:{app_port}-:{guest_app_port}"
            ))
            }
            NetAttach::Tap { tap, .. } => {
                push(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            }
        }
        push("-device".into());
        match &m.net {
            NetAttach::Tap { mac, .. } => push(format!("virtio-net-pci,netdev=n0,mac={mac}")),
            NetAttach::User { .. } => push("virtio-net-pci,netdev=n0".into()),
        }
        push("-device".into());
        push("virtio-rng-pci".into());
        push("-chardev".into());
        push(format!(
            "file,id=ser,path={},append=on",
            m.console_log.display()
        ));
        push("-serial".into());
        push("chardev:ser".into());
        push("-qmp".into());
        push(format!(
            "unix:{},server=on,wait=off",
            m.control_socket.display()
        ));
        for s in [
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
        ] {
            push(s.into());
        }
        push("-pidfile".into());
        push(m.pid_file.display().to_string());
        a
    }

    async fn qmp<C>(&self, m: &Machine, cmd: C) -> Result<C::Ok, VmmError>
    where
        C: qapi::qmp::QmpCommand + Send + 'static,
        C::Ok: Send,
    {
        let endpoint = C::NAME.to_owned();
        let api = |message: String| VmmError::Api {
            endpoint: endpoint.clone(),
            message,
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            qapi::futures::QmpStreamTokio::open_uds(&m.control_socket),
        )
        .await
        .map_err(|_| api("QMP did not answer in 5 s".into()))??;
        let stream = stream.negotiate().await?;
        let (qmp, handle) = stream.spawn_tokio();
        let out = tokio::time::timeout(Duration::from_secs(10), qmp.execute(cmd))
            .await
            .map_err(|_| api("no answer in 10 s".into()))?
            .map_err(|e| api(e.to_string()));
        drop(qmp);
        handle.abort();
        out
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn emulated(&self) -> bool {
        self.accel == Accel::Tcg
    }

    fn describe(&self) -> String {
        match self.accel {
            Accel::Kvm => "qemu (kvm)".into(),
            Accel::Tcg => "qemu (tcg)".into(),
        }
    }

    async fn boot(&self, m: &Machine) -> Result<u32, VmmError> {
        let _ = std::fs::remove_file(&m.control_socket);
        let _ = std::fs::remove_file(&m.pid_file);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&m.vmm_log)?;
        let program = self.binary.display().to_string();
        // -daemonize: the parent returns once the VM is set up (or failed),
        // and the daemon is nobody's child, so it outlives Kennel.
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.argv(m))
            .arg("-daemonize")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        if let Some(base) = self.guest_gid {
            // Its sockets carry this group: the host guard keeps what the
            // guest connects to off the host's own services, and the VM's
            // egress policy matches its own.
            let gid = match &m.net {
                NetAttach::User { host_ip, .. } => crate::net::user_slot(host_ip)
                    .map_or(base, |slot| crate::hostguard::vm_gid(base, slot)),
                NetAttach::Tap { .. } => base,
            };
            cmd.gid(gid);
        }
        let out = cmd.output().await.map_err(|source| VmmError::Spawn {
            program: program.clone(),
            source,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !stderr.is_empty() {
            use std::io::Write;
            let _ = (&log).write_all(stderr.as_bytes());
        }
        if !out.status.success() {
            let log = crate::process::tail(&stderr, 10);
            // QEMU's own words for a host forward whose port is taken.
            if stderr.contains("Could not set up host forwarding")
                || stderr.contains("Address already in use")
            {
                return Err(VmmError::AddressInUse { program, log });
            }
            return Err(VmmError::Exited { program, log });
        }
        read_pid(&m.pid_file).ok_or_else(|| VmmError::Exited {
            program,
            log: "no pid file after start".into(),
        })
    }

    async fn state(&self, m: &Machine) -> Result<VmmState, VmmError> {
        let alive =
            read_pid(&m.pid_file).is_some_and(|p| pid_alive(p, &format!("kennel-{}", m.name)));
        if !alive {
            return Ok(VmmState::Gone);
        }
        let status = self.qmp(m, qapi::qmp::query_status {}).await?;
        Ok(match status.status {
            qapi::qmp::RunState::running => VmmState::Running,
            qapi::qmp::RunState::paused | qapi::qmp::RunState::suspended => VmmState::Paused,
            _ => VmmState::Stopped,
        })
    }

    async fn set_app_forward(&self, m: &Machine, guest_port: u16) -> Result<(), VmmError> {
        let NetAttach::User {
            host_ip, app_port, ..
        } = &m.net
        else {
            return Ok(());
        };
        // QEMU has no QMP command for slirp forwards; its monitor does,
        // and answers in words: "... removed" to a removal, nothing to an
        // addition that worked.
        let NetAttach::User { guest_app_port, .. } = &m.net else {
            return Ok(());
        };
        let hmp = |line: String| async move {
            let said = self
                .qmp(
                    m,
                    qapi::qmp::human_monitor_command {
                        command_line: line.clone(),
                        cpu_index: None,
                    },
                )
                .await?;
            Ok::<_, VmmError>((line, said.trim().to_owned()))
        };
        let (line, said) = hmp(format!("hostfwd_remove n0 tcp:{host_ip}:{app_port}")).await?;
        if !said.is_empty() && !said.contains("removed") {
            return Err(VmmError::Api {
                endpoint: line,
                message: said,
            });
        }
        let add = |to: u16| hmp(format!("hostfwd_add n0 tcp:{host_ip}:{app_port}-:{to}"));
        let (line, said) = add(guest_port).await?;
        if said.is_empty() {
            return Ok(());
        }
        // Put the old forward back, so the app stays reachable.
        let _ = add(*guest_app_port).await;
        Err(VmmError::Api {
            endpoint: line,
            message: said,
        })
    }

    fn live_checkpoints(&self) -> bool {
        true
    }

    async fn pause(&self, m: &Machine) -> Result<(), VmmError> {
        self.qmp(m, qapi::qmp::stop {}).await.map(|_| ())
    }

    async fn resume(&self, m: &Machine) -> Result<(), VmmError> {
        self.qmp(m, qapi::qmp::cont {}).await.map(|_| ())
    }

    async fn switch_disk(&self, m: &Machine, next: &std::path::Path) -> Result<(), VmmError> {
        // `existing`: QEMU opens the child Kennel made (whose header names
        // the checkpoint's layer as its backing file) and puts the disk's
        // current node under it, without reading that header's backing.
        self.qmp(
            m,
            qapi::qmp::blockdev_snapshot_sync(qapi::qmp::BlockdevSnapshotSync {
                device: Some("root".into()),
                node_name: None,
                snapshot_file: next.display().to_string(),
                snapshot_node_name: None,
                format: Some("qcow2".into()),
                mode: Some(qapi::qmp::NewImageMode::existing),
            }),
        )
        .await
        .map(|_| ())
    }

    async fn grow_disk(&self, m: &Machine, bytes: u64) -> Result<(), VmmError> {
        self.qmp(
            m,
            qapi::qmp::block_resize {
                device: Some("root".into()),
                node_name: None,
                size: i64::try_from(bytes).unwrap_or(i64::MAX),
            },
        )
        .await
        .map(|_| ())
    }

    async fn force_stop(&self, m: &Machine) -> Result<(), VmmError> {
        let needle = format!("kennel-{}", m.name);
        let Some(pid) = read_pid(&m.pid_file).filter(|p| pid_alive(*p, &needle)) else {
            return Ok(());
        };
        if self.qmp(m, qapi::qmp::quit {}).await.is_err()
            || !wait_exit(pid, &needle, Duration::from_secs(5)).await
        {
            tracing::warn!(vm = %m.name, pid, "QEMU did not quit; killing it");
            signal(pid, rustix::process::Signal::KILL);
            wait_exit(pid, &needle, Duration::from_secs(5)).await;
        }
        let _ = std::fs::remove_file(&m.pid_file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(net: NetAttach) -> Machine {
        Machine {
            name: "demo".into(),
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/k/vmlinuz".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: "console=ttyS0".into(),
            disk: "/v/disk.qcow2".into(),
            config_disk: "/v/config.img".into(),
            virtiofs_socket: "/v/virtiofs.sock".into(),
            console_log: "/v/console.log".into(),
            control_socket: "/v/qmp.sock".into(),
            pid_file: "/v/vmm.pid".into(),
            vmm_log: "/v/vmm.log".into(),
            net,
        }
    }

    fn joined(q: &Qemu, m: &Machine) -> String {
        q.argv(m)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_user_networking_command_line() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            tcg_cpu: TCG_CPU.into(),
            guest_gid: None,
        };
        let s = joined(
            &q,
            &machine(NetAttach::User {
                host_ip: "127.77.0.2".into(),
                ssh_port: 10022,
                app_port: 18080,
                guest_app_port: 8080,
            }),
        );
        assert!(
            s.contains("-machine q35 -accel tcg,tb-size=64 -cpu qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt -smp 2 -m 1024M"),
            "{s}"
        );
        assert!(
            s.contains("memory-backend-memfd,id=mem,size=1024M,share=on"),
            "{s}"
        );
        assert!(
            s.contains("hostfwd=tcp:127.77.0.2:10022-:22,hostfwd=tcp:127.77.0.2:18080-:8080"),
            "{s}"
        );
        assert!(
            s.contains("vhost-user-fs-pci,chardev=vfs,tag=workspace"),
            "{s}"
        );
        assert!(
            s.contains("file=/v/config.img,if=none,id=cfg,format=raw,readonly=on"),
            "{s}"
        );
        assert!(
            s.contains("-qmp unix:/v/qmp.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.ends_with("-pidfile /v/vmm.pid"), "{s}");
        // Nothing of the host is forwarded into the guest (the metadata
        // service comes in over the VM's SSH link instead).
        assert!(!s.contains("guestfwd"), "{s}");
        // The root disk comes first so it is /dev/vda.
        assert!(s.find("id=root").unwrap() < s.find("id=cfg").unwrap());
    }

    #[test]
    fn kvm_tap_command_line() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Kvm,
            tcg_cpu: TCG_CPU.into(),
            guest_gid: None,
        };
        let s = joined(
            &q,
            &machine(NetAttach::Tap {
                tap: "kt-demo".into(),
                mac: "52:54:00:00:00:02".into(),
                guest_ip: "10.90.0.2".into(),
                prefix: 24,
                gateway: "10.90.0.1".into(),
            }),
        );
        assert!(s.contains("accel=kvm -cpu host"), "{s}");
        assert!(
            s.contains("tap,id=n0,ifname=kt-demo,script=no,downscript=no"),
            "{s}"
        );
        assert!(
            s.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02"),
            "{s}"
        );
    }
}
