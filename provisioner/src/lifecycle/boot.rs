//! Booting and stopping a VM: the config disk, virtiofsd and the VMM,
//! readiness from the serial console and an SSH banner, a graceful stop,
//! and commands run in the guest over SSH.

use super::*;

/// The devcontainer's create steps and postStartCommand on the config disk.
const DEVCONTAINER_CREATE: &str = "devcontainer-create.sh";
const DEVCONTAINER_START: &str = "devcontainer-start.sh";
const DEVCONTAINER_COMPOSE: &str = "devcontainer-compose.sh";
/// Counts a failed boot and its cause (docs/operations.md, Metrics).
fn boot_failed(cause: &'static str) {
    metrics::counter!("kennel_boots_total", "outcome" => "failed").increment(1);
    metrics::counter!("kennel_boot_failures_total", "cause" => cause).increment(1);
}

/// How long `new project` waits for the devcontainer's create steps.
const POST_CREATE_WAIT: Duration = Duration::from_secs(600);

impl LocalProvisioner {
    /// The guest config files for the devcontainer.json in `source` (none
    /// without one). Read again at every boot so that an edit applies on
    /// the next start: the guest's init runs the create steps once and
    /// postStartCommand every time, and gives every session the
    /// environment.
    pub(super) fn devcontainer_files(
        &self,
        source: &Path,
        stack: &str,
    ) -> Vec<(&'static str, String)> {
        let stack_env = Stacks::load(&self.s.stacks_dir)
            .get(stack)
            .map(|s| s.file.env.clone())
            .unwrap_or_default();
        let found = crate::devcontainer::load(source, &stack_env);
        let Some(d) = found.parsed() else {
            return Vec::new();
        };
        let mut files = Vec::new();
        for (file, script) in [
            (DEVCONTAINER_CREATE, d.create_script()),
            (DEVCONTAINER_START, d.start_script()),
            (DEVCONTAINER_COMPOSE, d.compose_script()),
        ] {
            if let Some(script) = script {
                files.push((file, script));
            }
        }
        if !d.env.is_empty() {
            files.push(("environment", d.ssh_environment()));
            files.push(("environment.sh", d.shell_environment()));
        }
        files
    }

    /// Writes the config disk: network, dev's uid, keys, the VM's host key.
    pub(super) async fn write_config(
        &self,
        r: &VmRecord,
        authorized_keys: &[String],
    ) -> Result<(), ProvisionError> {
        let dir = self.vm_dir(&r.project);
        let cfg = dir.join("config");
        let _ = std::fs::remove_dir_all(&cfg);
        std::fs::create_dir_all(&cfg).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        let (ip, gw, dns) = net::guest_config(&r.machine.net);
        let env = format!(
            "KENNEL_HOSTNAME={}\nKENNEL_IP={ip}\nKENNEL_GATEWAY={gw}\nKENNEL_DNS={dns}\nKENNEL_DEV_UID={}\nKENNEL_DEV_GID={}\nKENNEL_ONLINE={}\n",
            r.project,
            r.uid,
            r.gid,
            u8::from(self.s.online),
        );
        let project_pub =
            std::fs::read_to_string(self.project_key(&r.project).with_extension("pub"))
                .unwrap_or_default();
        let mut keys = project_pub.trim().to_owned();
        keys.push('\n');
        for k in authorized_keys {
            keys.push_str(k.trim());
            keys.push('\n');
        }
        let write = |name: &str, text: &str, mode: u32| -> Result<(), ProvisionError> {
            use std::os::unix::fs::PermissionsExt;
            let p = cfg.join(name);
            std::fs::write(&p, text)
                .map_err(|e| failed(Stage::Disk, format!("cannot write {}: {e}", p.display())))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(|e| failed(Stage::Disk, e.to_string()))
        };
        write("env", &env, 0o644)?;
        write("authorized_keys", &keys, 0o644)?;
        for (file, text) in self.devcontainer_files(&r.source, &r.stack) {
            write(file, &text, 0o644)?;
        }
        for (f, mode) in [
            ("ssh_host_ed25519_key", 0o600),
            ("ssh_host_ed25519_key.pub", 0o644),
        ] {
            let text = std::fs::read_to_string(dir.join(f))
                .map_err(|e| failed(Stage::Disk, e.to_string()))?;
            write(f, &text, mode)?;
        }
        let image = r.machine.config_disk.clone();
        self.blocking(Stage::Disk, move |runner| {
            disk::create_config(runner, &cfg, &image).map_err(|e| e.to_string())
        })
        .await
    }

    /// Starts virtiofsd and the VMM, and waits until the guest is ready.
    /// Boots `record`, moving it to another slot when its host address
    /// was taken while it was down: slots are per data directory but
    /// addresses per host, so another Kennel (or any program) may have
    /// bound them meanwhile. The record is saved with the slot it got.
    pub(super) async fn boot_in_a_free_slot(
        &self,
        record: &mut VmRecord,
        authorized_keys: &[String],
        progress: &dyn ProgressSink,
        timings: &mut Timings,
    ) -> Result<VmStatus, ProvisionError> {
        let mut taken: Vec<u32> = Vec::new();
        loop {
            self.save(record)?;
            match self.boot(record, authorized_keys, progress, timings).await {
                Err(BootError::AddressInUse(_)) if taken.len() < 5 => {
                    tracing::warn!(
                        vm = %record.project,
                        slot = record.slot,
                        "the VM's address was taken meanwhile; taking another slot"
                    );
                    taken.push(record.slot);
                    let slot = self
                        .allocate_slot(&record.project, record.app_port, &taken)
                        .await?;
                    record.slot = slot;
                    record.machine.net = net::attach(&self.s.network, slot, record.app_port);
                }
                other => return other.map_err(ProvisionError::from),
            }
        }
    }

    pub(super) async fn boot(
        &self,
        r: &VmRecord,
        authorized_keys: &[String],
        progress: &dyn ProgressSink,
        timings: &mut Timings,
    ) -> Result<VmStatus, BootError> {
        let m = &r.machine;
        let t = Instant::now();
        self.write_config(r, authorized_keys).await?;
        timings.disk_ms += ms(t);
        if let NetAttach::Tap { tap, .. } = &m.net {
            if let NetworkMode::Bridge(b) = &self.s.network {
                let (b, tap) = (b.clone(), tap.clone());
                let ports = self
                    .s
                    .host_guard
                    .as_ref()
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                self.blocking(Stage::Booting, move |runner| {
                    net::ensure_bridge(runner, &b, &ports).map_err(|e| e.to_string())?;
                    net::create_tap(runner, &b, &tap).map_err(|e| e.to_string())
                })
                .await?;
            }
        }
        let dir = self.vm_dir(&r.project);
        step(progress, Stage::Booting, Some(self.vmm.describe()));
        let t = Instant::now();
        self.check_source(&r.source, Stage::Booting)?;
        self.virtiofsd
            .start(
                &m.virtiofs_socket,
                &r.source,
                &dir.join("virtiofsd.log"),
                &dir.join("virtiofsd.pid"),
            )
            .await
            .map_err(|e| {
                boot_failed("virtiofsd");
                failed(Stage::Booting, anyhow_chain(&e))
            })?;
        let offset = std::fs::metadata(&m.console_log)
            .map(|md| md.len())
            .unwrap_or(0);
        self.guard_host().await;
        if let Err(e) = self.arm_egress(&r.project, m).await {
            boot_failed("egress");
            Virtiofsd::stop(&dir.join("virtiofsd.pid"), &m.virtiofs_socket).await;
            return Err(BootError::Failed(failed(Stage::Booting, e)));
        }
        if let Err(e) = self.vmm.boot(m).await {
            boot_failed("vmm_start");
            Virtiofsd::stop(&dir.join("virtiofsd.pid"), &m.virtiofs_socket).await;
            let err = failed(Stage::Booting, anyhow_chain(&e));
            return Err(match e {
                crate::vmm::VmmError::AddressInUse { .. } => BootError::AddressInUse(err),
                _ => BootError::Failed(err),
            });
        }
        crate::cgroup::limit(
            &r.project,
            m,
            &[dir.join("vmm.pid"), dir.join("virtiofsd.pid")],
        );
        timings.spawn_ms = ms(t);
        kennel_core::fault::point("booting");
        match self.wait_ready(m, offset).await {
            Ok((boot, sshd)) => {
                metrics::counter!("kennel_boots_total", "outcome" => "ok").increment(1);
                timings.boot_ms = boot;
                timings.sshd_ms = sshd;
                if let Ok(json) = serde_json::to_vec_pretty(timings) {
                    let _ = std::fs::write(dir.join("timings.json"), json);
                }
                Ok(VmStatus {
                    state: VmState::Running,
                    ready: true,
                    ssh_addr: Some(m.net.ssh_addr()),
                    app_addr: Some(m.net.app_addr(r.app_port)),
                    backend: self.vmm.describe(),
                    problems: Vec::new(),
                })
            }
            Err(why) => {
                let cause = if why.contains("virtio-fs") {
                    "workspace"
                } else if why.contains("VMM exited") {
                    "vmm_exited"
                } else {
                    "timeout"
                };
                boot_failed(cause);
                let console = std::fs::read_to_string(&m.console_log).unwrap_or_default();
                let _ = self.vmm.force_stop(m).await;
                Virtiofsd::stop(&dir.join("virtiofsd.pid"), &m.virtiofs_socket).await;
                Err(BootError::Failed(failed(
                    Stage::Booting,
                    format!("{why}. Last console lines:\n{}", tail(&console, 12)),
                )))
            }
        }
    }

    /// Waits for the console's readiness lines, then for an SSH banner.
    /// Returns (boot ms, sshd ms).
    pub(super) async fn wait_ready(&self, m: &Machine, offset: u64) -> Result<(u64, u64), String> {
        let start = Instant::now();
        let deadline = start + self.s.boot_timeout;
        let mut listening: Option<Instant> = None;
        let mut workspace = false;
        let mut sshd = false;
        let needle = self.needle(m);
        while Instant::now() < deadline {
            let text = read_from(&m.console_log, offset);
            if text.contains("kennel-init: cannot mount the workspace")
                || text.contains("workspace mounted but does not answer")
            {
                return Err("the guest could not mount /workspace (virtio-fs)".into());
            }
            workspace |= text.contains("kennel-init: workspace mounted");
            // systemd guests say "ready" once ssh.service (Type=notify)
            // listens; images from before systemd had sshd say so itself.
            sshd |= text.contains("kennel-init: ready") || text.contains("Server listening on");
            if workspace && sshd {
                let seen = *listening.get_or_insert_with(Instant::now);
                if ssh_banner(&m.net.ssh_addr(), Duration::from_secs(5)).await {
                    return Ok((ms_between(start, seen), ms(seen)));
                }
            }
            if !read_pid(&m.pid_file).is_some_and(|p| crate::vmm::pid_alive(p, &needle)) {
                let log = std::fs::read_to_string(&m.vmm_log).unwrap_or_default();
                return Err(format!(
                    "the VMM exited while booting ({})",
                    tail(&log, 3).trim()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "the VM did not become ready within {} s (workspace mounted: {workspace}, sshd listening: {sshd})",
            self.s.boot_timeout.as_secs()
        ))
    }

    /// Waits for the guest to finish the devcontainer's create steps (its
    /// init runs them on the first boot) and says how they went.
    pub(super) async fn wait_post_create(&self, r: &VmRecord) -> String {
        wait_post_create_by(|command| async move { self.ssh_exec(r, &command).await }).await
    }

    pub(super) async fn graceful_stop(&self, r: &VmRecord) -> Result<(), ProvisionError> {
        let m = &r.machine;
        let dir = self.vm_dir(&r.project);
        let needle = self.needle(m);
        if let Some(pid) = read_pid(&m.pid_file).filter(|p| crate::vmm::pid_alive(*p, &needle)) {
            // Ask the guest to power off (through systemd, with /workspace
            // detached first so a dead virtiofsd cannot hang it); the
            // connection drops as it does, so the answer does not matter.
            // Bounded: a guest that cannot run it (hung, out of memory)
            // must not hold the stop forever.
            let _ = tokio::time::timeout(
                self.s.stop_timeout,
                self.ssh_exec(r, "sudo /sbin/kennel-shutdown"),
            )
            .await;
            if !crate::vmm::wait_exit(pid, &needle, self.s.stop_timeout).await {
                tracing::warn!(vm = %r.project, "the guest did not power off in time; forcing it");
            }
        }
        self.vmm
            .force_stop(m)
            .await
            .map_err(|e| failed(Stage::Stopping, anyhow_chain(&e)))?;
        Virtiofsd::stop(&dir.join("virtiofsd.pid"), &m.virtiofs_socket).await;
        if let NetAttach::Tap { tap, .. } = &m.net {
            net::delete_tap(self.runner.as_ref(), tap);
        }
        Ok(())
    }

    /// Runs a command in a VM as `dev` over SSH, with the project key and
    /// the VM's pinned host key.
    pub(super) async fn ssh_exec(&self, r: &VmRecord, command: &str) -> Result<String, String> {
        let addr = r.machine.net.ssh_addr();
        self.ssh_exec_at(&self.vm_dir(&r.project), &r.project, &addr, command)
            .await
    }

    /// [`Self::ssh_exec`] for the guest of `project` whose sshd answers
    /// at `addr`, with its host key kept in `dir`.
    pub(super) async fn ssh_exec_at(
        &self,
        dir: &Path,
        project: &str,
        addr: &str,
        command: &str,
    ) -> Result<String, String> {
        self.ssh_exec_with(dir, project, addr, command, None).await
    }

    /// [`Self::ssh_exec_at`] with `input` (a file) as the command's
    /// standard input.
    pub(super) async fn ssh_exec_with(
        &self,
        dir: &Path,
        project: &str,
        addr: &str,
        command: &str,
        input: Option<PathBuf>,
    ) -> Result<String, String> {
        let key = self.project_key(project);
        let host_pub =
            std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub")).unwrap_or_default();
        let known = dir.join("known_hosts");
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "22"));
        std::fs::write(&known, format!("[{host}]:{port} {}\n", host_pub.trim()))
            .map_err(|e| e.to_string())?;
        let (host, port, command) = (host.to_owned(), port.to_owned(), command.to_owned());
        let runner = self.runner.clone();
        tokio::task::spawn_blocking(move || {
            runner
                .run(
                    &Cmd::new("ssh")
                        .args([
                            "-o",
                            "BatchMode=yes",
                            "-o",
                            "ConnectTimeout=30",
                            "-o",
                            "StrictHostKeyChecking=yes",
                        ])
                        .arg("-o")
                        .arg(format!("UserKnownHostsFile={}", known.display()))
                        .arg("-i")
                        .arg(&key)
                        .args(["-p", &port, &format!("dev@{host}"), &command])
                        .with_stdin(input.as_deref()),
                )
                .map(|o| o.stdout)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Waits for a guest to finish the devcontainer's create steps (its init
/// runs them on the first boot), asking it with `exec` (a command over
/// SSH), and says how they went.
pub(super) async fn wait_post_create_by<F, Fut>(exec: F) -> String
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let start = Instant::now();
    let log = "/var/log/kennel/post-create.log";
    while start.elapsed() < POST_CREATE_WAIT {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Ok(out) =
            exec("cat /var/log/kennel/post-create.status 2>/dev/null || echo running".into()).await
        else {
            continue;
        };
        let status = out.trim();
        if status == "running" {
            continue;
        }
        let secs = start.elapsed().as_secs();
        if status == "0" {
            return format!(
                "devcontainer postCreateCommand finished in {secs} s (exit 0); its output is in {log} in the VM"
            );
        }
        let last = exec(format!("tail -n 5 {log}")).await.unwrap_or_default();
        return format!(
            "devcontainer postCreateCommand failed (exit {status}) after {secs} s; the project runs without it. Last lines of {log} in the VM:\n{}",
            last.trim_end()
        );
    }
    format!(
        "devcontainer postCreateCommand still runs after {} s; follow it with: tail -f {log} (in the VM)",
        POST_CREATE_WAIT.as_secs()
    )
}

/// Why a boot failed, as far as the caller acts on it.
#[derive(Debug, thiserror::Error)]
pub(super) enum BootError {
    /// The VM's host address was taken meanwhile: another slot may work.
    #[error("{0}")]
    AddressInUse(ProvisionError),
    #[error("{0}")]
    Failed(ProvisionError),
}

impl From<ProvisionError> for BootError {
    fn from(e: ProvisionError) -> Self {
        BootError::Failed(e)
    }
}

impl From<BootError> for ProvisionError {
    fn from(e: BootError) -> Self {
        match e {
            BootError::AddressInUse(e) | BootError::Failed(e) => e,
        }
    }
}
