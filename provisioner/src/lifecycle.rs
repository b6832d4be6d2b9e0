//! The provisioner: turns a project into a running VM and keeps it so.
//!
//! [`LocalProvisioner`] implements `kennel_core::provision::Provisioner`.
//! It owns `<data_dir>/vms/<name>/` (disk, config disk, sockets, logs, pid
//! files, `vm.json`) and `<data_dir>/keys/projects/<name>/`; it never
//! deletes a project's source except through an explicit purge under a
//! project root. VM processes (VMM and virtiofsd) are started in their own
//! process groups and outlive Kennel; [`LocalProvisioner::reconcile`]
//! adopts them on the next start through their pid files and sockets.
//!
//! Readiness is read from the serial console (the guest init reports the
//! workspace mount, sshd reports "Server listening"), then proven with one
//! TCP connection that must return an SSH banner: blind polling of a
//! forwarded port costs 1-4 s under QEMU user networking.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kennel_core::hostpath::Beneath;
use kennel_core::names::ProjectName;
use kennel_core::provision::{
    CreateRequest, Created, Progress, ProgressSink, ProvisionError, Provisioner, Stage, VmSpec,
    VmState, VmStatus,
};
use kennel_core::store::{repo, Store};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::image::{BuildEnv, Images, Recipe};
use crate::net::{self, NetworkMode};
use crate::process::{tail, Cmd, Runner};
use crate::stacks::Stacks;
use crate::virtiofs::Virtiofsd;
use crate::vmm::{read_pid, BackendKind, Machine, NetAttach, Vmm, VmmState};
use crate::{disk, kernel};

/// How the provisioner is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub stacks_dir: PathBuf,
    pub templates_dir: PathBuf,
    pub recipe_dir: PathBuf,
    pub apt_sources: PathBuf,
    pub apt_cache: Option<PathBuf>,
    pub network: NetworkMode,
    /// How long a VM may take from VMM start to a working sshd.
    pub boot_timeout: Duration,
    /// How long a graceful stop may take before the VM is forced off.
    pub stop_timeout: Duration,
    /// Directories under which sources may be purged.
    pub project_roots: Vec<PathBuf>,
    /// Owner given to source directories Kennel creates while running as
    /// root, and to `dev` when a source belongs to root.
    pub default_owner: (u32, u32),
    /// Tell guests they can reach the internet (runs first-boot steps).
    pub online: bool,
}

/// What Kennel remembers about a VM, in `vms/<name>/vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub project: String,
    pub backend: BackendKind,
    pub image: String,
    pub stack: String,
    pub source: PathBuf,
    pub slot: u32,
    pub uid: u32,
    pub gid: u32,
    pub app_port: u16,
    pub machine: Machine,
}

/// How long the phases of the last create or start took, in
/// `vms/<name>/timings.json` (read by bench/provision.sh).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Cloning, creating or adopting the source.
    pub source_ms: u64,
    /// Stack image lookup (or build).
    pub image_ms: u64,
    /// Root disk, keys and config disk.
    pub disk_ms: u64,
    /// virtiofsd and the VMM process started and the VM booted by its API.
    pub spawn_ms: u64,
    /// Guest kernel and init, up to sshd listening with /workspace mounted.
    pub boot_ms: u64,
    /// From sshd listening to an SSH banner on the host side.
    pub sshd_ms: u64,
}

/// The provisioner for this host.
pub struct LocalProvisioner {
    s: Settings,
    vmm: Arc<dyn Vmm>,
    virtiofsd: Virtiofsd,
    store: Store,
    runner: Arc<dyn Runner>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for LocalProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvisioner")
            .field("backend", &self.vmm.describe())
            .field("data_dir", &self.s.data_dir)
            .finish_non_exhaustive()
    }
}

fn failed(stage: Stage, message: impl Into<String>) -> ProvisionError {
    ProvisionError::Failed {
        stage,
        message: message.into(),
    }
}

fn step(progress: &dyn ProgressSink, stage: Stage, detail: impl Into<Option<String>>) {
    progress.report(Progress {
        stage,
        percent: None,
        detail: detail.into(),
    });
}

/// How often a silent image build step is reported again, with its time.
const IMAGE_HEARTBEAT: Duration = Duration::from_secs(5);

/// Free space a new VM needs in the data directory: its disk starts tiny
/// but grows as the guest writes, and QEMU pauses a guest whose disk hits
/// ENOSPC (it would just look hung).
const MIN_FREE_MIB: u64 = 512;

/// MiB free for unprivileged writers on the filesystem holding `dir`.
fn free_mib(dir: &Path) -> Option<u64> {
    let probe = dir.ancestors().find(|p| p.exists())?;
    rustix::fs::statvfs(probe)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize) >> 20)
}

/// Unix socket paths must fit in `sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

impl LocalProvisioner {
    /// A provisioner with `vmm` as backend.
    pub fn new(
        s: Settings,
        vmm: Arc<dyn Vmm>,
        virtiofsd: Virtiofsd,
        store: Store,
        runner: Arc<dyn Runner>,
    ) -> Self {
        Self {
            s,
            vmm,
            virtiofsd,
            store,
            runner,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The backend's description.
    pub fn describe(&self) -> String {
        self.vmm.describe()
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.s.data_dir.join("vms").join(name)
    }

    fn key_dir(&self, name: &str) -> PathBuf {
        self.s.data_dir.join("keys/projects").join(name)
    }

    /// The private key the gateways use to reach a project's VM.
    pub fn project_key(&self, name: &str) -> PathBuf {
        self.key_dir(name).join("id_ed25519")
    }

    async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(name.to_owned()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// The record of a VM, if it has one.
    pub fn record(&self, name: &str) -> Option<VmRecord> {
        let bytes = std::fs::read(self.vm_dir(name).join("vm.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, r: &VmRecord) -> Result<(), ProvisionError> {
        let dir = self.vm_dir(&r.project);
        let json = serde_json::to_vec_pretty(r).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        std::fs::write(dir.join("vm.json"), json)
            .map_err(|e| failed(Stage::Disk, format!("cannot write vm.json: {e}")))?;
        std::fs::write(dir.join("image"), format!("{}\n", r.image)).map_err(|e| {
            failed(
                Stage::Disk,
                format!("cannot write the image reference: {e}"),
            )
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        stage: Stage,
        f: impl FnOnce(&dyn Runner) -> Result<T, String> + Send + 'static,
    ) -> Result<T, ProvisionError> {
        let runner = self.runner.clone();
        tokio::task::spawn_blocking(move || f(runner.as_ref()))
            .await
            .map_err(|e| failed(stage, e.to_string()))?
            .map_err(|m| failed(stage, m))
    }

    /// Kernel and stack image, building them on demand.
    async fn image_for(
        &self,
        stack: &str,
        progress: &dyn ProgressSink,
    ) -> Result<(kernel::KernelSet, crate::image::ImageInfo), ProvisionError> {
        let (stacks_dir, recipe_dir, images_dir) = (
            self.s.stacks_dir.clone(),
            self.s.recipe_dir.clone(),
            self.s.data_dir.join("images"),
        );
        let (sources, cache) = (self.s.apt_sources.clone(), self.s.apt_cache.clone());
        let stack = stack.to_owned();
        step(
            progress,
            Stage::Image,
            Some(format!("{stack} (built once, then cached)")),
        );
        // The build runs on a blocking thread and says what it does through
        // a channel; this side passes that on and, while a long step is
        // silent (mmdebstrap installing packages), repeats it with the time
        // so far, so the person who asked never waits a minute in silence.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let st_name = stack.clone();
        let build = self.blocking(Stage::Image, move |runner| {
            let say = |what: &str, s: &str| {
                let _ = tx.send(format!("{what}: {s}"));
            };
            let stacks = Stacks::load(&stacks_dir);
            let base = stacks
                .get(crate::stacks::BASE)
                .ok_or("the base stack is missing")?;
            let st = stacks
                .get(&st_name)
                .ok_or_else(|| format!("there is no usable stack '{st_name}'"))?;
            let images = Images::new(&images_dir);
            // The newest kernel already built, without asking apt which is
            // current (that takes a second); `kennel image build` refreshes it.
            let k = match kernel::KernelSet::latest(images.dir()) {
                Some(k) => k,
                None => kernel::ensure(images.dir(), runner, &mut |s| say("kernel", s))
                    .map_err(|e| anyhow_chain(&e))?,
            };
            let recipe = Recipe::load(&recipe_dir).map_err(|e| e.to_string())?;
            let env = BuildEnv {
                recipe: &recipe,
                kernel: &k.manifest,
                apt_sources: &sources,
                apt_cache: cache.as_deref(),
            };
            let what = format!("building the {st_name} image");
            let (info, _) = images
                .ensure(&env, base, st, runner, &mut |s| say(&what, s))
                .map_err(|e| anyhow_chain(&e))?;
            Ok((k, info))
        });
        tokio::pin!(build);
        let started = Instant::now();
        let mut last: Option<String> = None;
        let mut tick = tokio::time::interval(IMAGE_HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut build => return r,
                Some(m) = rx.recv() => {
                    step(progress, Stage::Image, Some(format!("{m} ({}s)", started.elapsed().as_secs())));
                    last = Some(m);
                    tick.reset();
                }
                _ = tick.tick() => {
                    if let Some(m) = &last {
                        step(progress, Stage::Image, Some(format!("{m} ({}s)", started.elapsed().as_secs())));
                    }
                }
            }
        }
    }

    fn machine(
        &self,
        name: &str,
        k: &kernel::KernelSet,
        vcpus: u32,
        memory_mib: u64,
        net: NetAttach,
    ) -> Machine {
        let dir = self.vm_dir(name);
        let control = match self.vmm.kind() {
            BackendKind::CloudHypervisor => "api.sock",
            BackendKind::Qemu => "qmp.sock",
        };
        Machine {
            name: name.to_owned(),
            vcpus,
            memory_mib,
            kernel: k.bzimage(),
            initramfs: k.initramfs(),
            cmdline: "console=ttyS0 root=/dev/vda rw panic=-1 quiet".into(),
            disk: dir.join("disk.qcow2"),
            config_disk: dir.join("config.img"),
            virtiofs_socket: dir.join("fs.sock"),
            console_log: dir.join("console.log"),
            control_socket: dir.join(control),
            pid_file: dir.join("vmm.pid"),
            vmm_log: dir.join("vmm.log"),
            net,
        }
    }

    /// Writes the config disk: network, dev's uid, keys, the VM's host key.
    async fn write_config(
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
            u8::from(self.s.online)
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
    async fn boot(
        &self,
        r: &VmRecord,
        authorized_keys: &[String],
        progress: &dyn ProgressSink,
        timings: &mut Timings,
    ) -> Result<VmStatus, ProvisionError> {
        let m = &r.machine;
        let t = Instant::now();
        self.write_config(r, authorized_keys).await?;
        timings.disk_ms += ms(t);
        if let NetAttach::Tap { tap, .. } = &m.net {
            if let NetworkMode::Bridge(b) = &self.s.network {
                let (b, tap) = (b.clone(), tap.clone());
                self.blocking(Stage::Booting, move |runner| {
                    net::ensure_bridge(runner, &b).map_err(|e| e.to_string())?;
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
            .map_err(|e| failed(Stage::Booting, anyhow_chain(&e)))?;
        let offset = std::fs::metadata(&m.console_log)
            .map(|md| md.len())
            .unwrap_or(0);
        if let Err(e) = self.vmm.boot(m).await {
            Virtiofsd::stop(&dir.join("virtiofsd.pid"), &m.virtiofs_socket).await;
            return Err(failed(Stage::Booting, anyhow_chain(&e)));
        }
        crate::cgroup::limit(
            &r.project,
            m,
            &[dir.join("vmm.pid"), dir.join("virtiofsd.pid")],
        );
        timings.spawn_ms = ms(t);
        match self.wait_ready(m, offset).await {
            Ok((boot, sshd)) => {
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
                })
            }
            Err(why) => {
                let console = std::fs::read_to_string(&m.console_log).unwrap_or_default();
                let _ = self.vmm.force_stop(m).await;
                Virtiofsd::stop(&dir.join("virtiofsd.pid"), &m.virtiofs_socket).await;
                Err(failed(
                    Stage::Booting,
                    format!("{why}. Last console lines:\n{}", tail(&console, 12)),
                ))
            }
        }
    }

    /// Waits for the console's readiness lines, then for an SSH banner.
    /// Returns (boot ms, sshd ms).
    async fn wait_ready(&self, m: &Machine, offset: u64) -> Result<(u64, u64), String> {
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
            sshd |= text.contains("Server listening on");
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

    /// Removes everything of a VM but the source. Best effort: used by
    /// destroy and by rollback.
    async fn teardown(&self, name: &str, record: Option<&VmRecord>) {
        let dir = self.vm_dir(name);
        if let Some(r) = record {
            let _ = self.vmm.force_stop(&r.machine).await;
            Virtiofsd::stop(&dir.join("virtiofsd.pid"), &r.machine.virtiofs_socket).await;
            if let NetAttach::Tap { tap, .. } = &r.machine.net {
                net::delete_tap(self.runner.as_ref(), tap);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.key_dir(name));
        crate::cgroup::remove(name);
        let n = name.to_owned();
        if let Err(e) = self.store.call(move |c| repo::release_slot(c, &n)).await {
            tracing::warn!(vm = name, error = %e, "could not release the VM's slot");
        }
    }

    async fn create_inner(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let name = req.project.as_str();
        let source = PathBuf::from(
            req.path
                .clone()
                .ok_or_else(|| failed(Stage::Validated, "no source path was given"))?,
        );
        let templates = crate::templates::Templates::load(&self.s.templates_dir);
        let template =
            match &req.template {
                Some(t) => Some(templates.get(t).cloned().ok_or_else(|| {
                    failed(Stage::Validated, format!("there is no template '{t}'"))
                })?),
                None => None,
            };
        let mut notes = Vec::new();
        if req.git.is_some() {
            step(progress, Stage::Cloning, req.git.clone());
        }
        let vms = self.s.data_dir.join("vms");
        if let Some(free) = free_mib(&vms).filter(|f| *f < MIN_FREE_MIB) {
            return Err(failed(
                Stage::Validated,
                format!(
                    "the data directory {} has only {free} MiB free; a VM needs at least {MIN_FREE_MIB} MiB (no space left for its disk). Free some space or move data_dir",
                    self.s.data_dir.display()
                ),
            ));
        }
        let t_source = Instant::now();
        let summary = self
            .prepare_source(req, template.as_ref(), &source, progress)
            .await?;
        let source_ms = ms(t_source);
        notes.push(format!("source: {summary}, at {}", source.display()));
        // Stack: asked for, or detected from the tree.
        let stack = match &req.stack {
            Some(s) => s.clone(),
            None => {
                let stacks = Stacks::load(&self.s.stacks_dir);
                let d = stacks.detect(&source);
                notes.push(format!("stack {}", d.summary()));
                notes.extend(d.warnings.iter().cloned());
                d.stack
            }
        };
        step(progress, Stage::Stack, Some(stack.clone()));
        let mut timings = Timings {
            source_ms,
            ..Timings::default()
        };
        let t = Instant::now();
        let (k, image) = self.image_for(&stack, progress).await?;
        timings.image_ms = ms(t);
        let t = Instant::now();

        let dir = self.vm_dir(name);
        if dir.exists() {
            if self.record(name).is_some() {
                return Err(failed(
                    Stage::Disk,
                    format!("{name} already has a VM; destroy it first"),
                ));
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        // Everything from here on is rolled back on failure.
        let slot = self.allocate_slot(name, req.app_port, &[]).await?;
        let m = self.machine(
            name,
            &k,
            req.resources.vcpus,
            req.resources.memory_mib,
            net::attach(&self.s.network, slot, req.app_port),
        );
        let longest = [&m.virtiofs_socket, &m.control_socket]
            .iter()
            .map(|p| p.as_os_str().len())
            .max()
            .unwrap_or(0);
        if longest > MAX_SOCKET_PATH {
            return Err(failed(Stage::Disk, format!("the data directory path is too long for Unix sockets ({longest} > {MAX_SOCKET_PATH} bytes); use a shorter data_dir")));
        }
        step(
            progress,
            Stage::Disk,
            Some(format!(
                "{} MiB copy-on-write over {}",
                req.resources.disk_mib, image.id
            )),
        );
        let (rootfs, disk_path, size) = (image.rootfs(), m.disk.clone(), req.resources.disk_mib);
        let (kd, vd, label) = (self.key_dir(name), dir.clone(), format!("kennel-{name}"));
        self.blocking(Stage::Disk, move |runner| {
            disk::create_root(runner, &rootfs, &disk_path, size).map_err(|e| e.to_string())?;
            new_keypairs(runner, &kd, &vd, &label)
        })
        .await?;
        timings.disk_ms = ms(t);
        let (uid, gid) = owner_of(&source, self.s.default_owner);
        if uid == 0 {
            notes.push(format!(
                "{} belongs to root; files the VM creates there will belong to uid {}",
                source.display(),
                self.s.default_owner.0
            ));
        }
        let record = VmRecord {
            project: name.to_owned(),
            backend: self.vmm.kind(),
            image: image.id.clone(),
            stack: stack.clone(),
            source: source.clone(),
            slot,
            uid: if uid == 0 {
                self.s.default_owner.0
            } else {
                uid
            },
            gid: if uid == 0 {
                self.s.default_owner.1
            } else {
                gid
            },
            app_port: req.app_port,
            machine: m,
        };
        // Slots are per data directory but addresses per host: another
        // Kennel may have bound ours since we checked. Take another slot.
        let mut record = record;
        let mut taken: Vec<u32> = Vec::new();
        let status = loop {
            self.save(&record)?;
            match self
                .boot(&record, &req.authorized_keys, progress, &mut timings)
                .await
            {
                Err(e) if address_taken(&e) && taken.len() < 5 => {
                    tracing::warn!(
                        vm = name,
                        slot = record.slot,
                        "the VM's address was taken meanwhile; taking another slot"
                    );
                    taken.push(record.slot);
                    let slot = self.allocate_slot(name, req.app_port, &taken).await?;
                    record.slot = slot;
                    record.machine.net = net::attach(&self.s.network, slot, req.app_port);
                }
                other => break other?,
            }
        };
        if let Some(cmd) = template.as_ref().and_then(|t| t.file.post_create.clone()) {
            step(
                progress,
                Stage::Ready,
                Some("running the template's post-create command".into()),
            );
            let out = self
                .ssh_exec(&record, &format!("cd /workspace && {cmd}"))
                .await;
            notes.push(match out {
                Ok(_) => format!("post-create ran: {cmd}"),
                Err(e) => format!("post-create failed ({cmd}): {e}"),
            });
        }
        Ok(Created {
            stack,
            source_path: source.display().to_string(),
            notes,
            status,
        })
    }

    /// Clones, creates or adopts the source, reporting clone progress.
    async fn prepare_source(
        &self,
        req: &CreateRequest,
        template: Option<&crate::templates::Template>,
        source: &Path,
        progress: &dyn ProgressSink,
    ) -> Result<String, ProvisionError> {
        let path = source.to_owned();
        let git = req.git.clone();
        let token = req.git_token.clone();
        let key = self.deploy_key_path(req.owner.as_str());
        let key = key.exists().then_some(key);
        let files = template.map(|t| t.files.clone());
        let (adopt, owner) = (req.adopt, self.s.default_owner);
        let (name, email) = (req.author_name.clone(), req.author_email.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u8, String)>();
        let root = self.root_for(&path, Stage::Validated)?.root().to_owned();
        let mut job = tokio::task::spawn_blocking(move || {
            let plan = crate::source::SourcePlan {
                root: &root,
                path: &path,
                git: git.as_deref(),
                token: token.as_deref(),
                deploy_key: key.as_deref(),
                template_files: files.as_deref(),
                adopt,
                author_name: &name,
                author_email: &email,
                owner,
            };
            crate::source::prepare(&plan, &mut |pct, detail| {
                let _ = tx.send((pct, detail));
            })
        });
        let stage = if req.git.is_some() {
            Stage::Cloning
        } else {
            Stage::Validated
        };
        loop {
            tokio::select! {
                Some((pct, detail)) = rx.recv() => progress.report(Progress {
                    stage: Stage::Cloning,
                    percent: Some(pct),
                    detail: Some(detail),
                }),
                done = &mut job => {
                    return done
                        .map_err(|e| failed(stage, e.to_string()))?
                        .map(|p| p.summary)
                        .map_err(|e| failed(stage, e.to_string()));
                }
            }
        }
    }

    /// Runs a command in a VM as `dev` over SSH, with the project key and
    /// the VM's pinned host key.
    async fn ssh_exec(&self, r: &VmRecord, command: &str) -> Result<String, String> {
        let dir = self.vm_dir(&r.project);
        let key = self.project_key(&r.project);
        let addr = r.machine.net.ssh_addr();
        let host_pub =
            std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub")).unwrap_or_default();
        let known = dir.join("known_hosts");
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "22"));
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
                            "ConnectTimeout=10",
                            "-o",
                            "StrictHostKeyChecking=yes",
                        ])
                        .arg("-o")
                        .arg(format!("UserKnownHostsFile={}", known.display()))
                        .arg("-i")
                        .arg(&key)
                        .args(["-p", &port, &format!("dev@{host}"), &command]),
                )
                .map(|o| o.stdout)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The user keys installed at the VM's last boot (without the project key).
    fn current_keys(&self, name: &str) -> Vec<String> {
        let project = std::fs::read_to_string(self.project_key(name).with_extension("pub"))
            .unwrap_or_default();
        std::fs::read_to_string(self.vm_dir(name).join("config/authorized_keys"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty() && l.trim() != project.trim())
            .map(str::to_owned)
            .collect()
    }

    fn deploy_key_path(&self, user: &str) -> PathBuf {
        self.s
            .data_dir
            .join("keys/users")
            .join(user)
            .join("deploy_ed25519")
    }

    /// Takes a slot whose host addresses are free: slots are per data
    /// directory, but user-mode addresses are shared by the whole host.
    async fn allocate_slot(
        &self,
        name: &str,
        app_port: u16,
        taken: &[u32],
    ) -> Result<u32, ProvisionError> {
        let mut skip: Vec<u32> = taken.to_vec();
        for _ in 0..64 {
            let (n, sk) = (name.to_owned(), skip.clone());
            let slot = self
                .store
                .write(move |tx| repo::allocate_slot(tx, &n, net::MAX_SLOT, &sk))
                .await
                .map_err(|e| failed(Stage::Disk, e.to_string()))?;
            let free = match net::attach(&self.s.network, slot, app_port) {
                NetAttach::User {
                    host_ip,
                    ssh_port,
                    app_port,
                    ..
                } => [ssh_port, app_port]
                    .iter()
                    .all(|p| std::net::TcpListener::bind((host_ip.as_str(), *p)).is_ok()),
                NetAttach::Tap { tap, .. } => !Path::new("/sys/class/net").join(tap).exists(),
            };
            if free {
                return Ok(slot);
            }
            tracing::warn!(
                vm = name,
                slot,
                "slot's addresses are in use on this host; trying another"
            );
            skip.push(slot);
        }
        Err(failed(Stage::Disk, "no VM slot with free host addresses"))
    }

    /// Adopts VMs that outlived a previous Kennel and cleans up after the
    /// dead: returns each known VM and whether it runs.
    pub async fn reconcile(&self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let vms = self.s.data_dir.join("vms");
        let entries: Vec<PathBuf> = std::fs::read_dir(&vms)
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        for dir in entries {
            let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let Some(r) = self.record(&name) else {
                // Half-created: no record was ever written.
                tracing::warn!(vm = %name, "removing a half-created VM directory");
                self.teardown(&name, None).await;
                continue;
            };
            let running = matches!(
                self.vmm.state(&r.machine).await,
                Ok(VmmState::Running | VmmState::Paused)
            );
            if running {
                tracing::info!(vm = %name, "adopted a running VM");
            } else {
                // Dead VMM: stop its virtiofsd, drop its TAP, clear stale files.
                let _ = self.vmm.force_stop(&r.machine).await;
                Virtiofsd::stop(&dir.join("virtiofsd.pid"), &r.machine.virtiofs_socket).await;
                if let NetAttach::Tap { tap, .. } = &r.machine.net {
                    net::delete_tap(self.runner.as_ref(), tap);
                }
                let _ = std::fs::remove_file(&r.machine.pid_file);
                let _ = std::fs::remove_file(&r.machine.control_socket);
            }
            out.push((name, running));
        }
        // TAPs on our bridge whose VM is gone (a crash between TAP and record).
        if let NetworkMode::Bridge(b) = &self.s.network {
            let ours: Vec<String> = out
                .iter()
                .filter_map(|(n, _)| self.record(n))
                .filter_map(|r| match r.machine.net {
                    NetAttach::Tap { tap, .. } => Some(tap),
                    NetAttach::User { .. } => None,
                })
                .collect();
            let brif = Path::new("/sys/class/net").join(&b.name).join("brif");
            if let Ok(rd) = std::fs::read_dir(brif) {
                for e in rd.filter_map(Result::ok) {
                    let tap = e.file_name().to_string_lossy().into_owned();
                    if tap.starts_with("kt") && !ours.contains(&tap) {
                        tracing::warn!(%tap, "removing an orphaned TAP");
                        net::delete_tap(self.runner.as_ref(), &tap);
                    }
                }
            }
        }
        // Slots whose VM directory is gone.
        if let Ok(slots) = self.store.call(|c| repo::all_slots(c)).await {
            for (project, _) in slots {
                if !vms.join(&project).exists() {
                    let p = project.clone();
                    let _ = self.store.call(move |c| repo::release_slot(c, &p)).await;
                }
            }
        }
        // Image builds interrupted mid-way (work directories and the mounts
        // mmdebstrap made in them), unless a build is running now.
        Images::new(&self.s.data_dir.join("images")).clean_interrupted();
        out
    }

    /// The project root that holds `path` (lexically), opened for lookups
    /// beneath it.
    fn root_for(&self, path: &Path, stage: Stage) -> Result<Beneath, ProvisionError> {
        for r in &self.s.project_roots {
            let b = Beneath::open(r).map_err(|e| failed(stage, anyhow_chain(&e)))?;
            if b.relative(path).is_ok() {
                return Ok(b);
            }
        }
        Err(failed(
            stage,
            format!("{} is not inside a project root", path.display()),
        ))
    }

    /// Checks, before a source is shared into a guest again, that it is
    /// still reached beneath its root without a link on the way: the
    /// guests of other projects, or people on the host, may have swapped
    /// one in since it was created.
    fn check_source(&self, path: &Path, stage: Stage) -> Result<(), ProvisionError> {
        kennel_core::hostpath::check_beneath_any(&self.s.project_roots, path)
            .map_err(|e| failed(stage, format!("the project's source cannot be shared: {e}")))
    }

    /// What a VMM's command line holds that tells it from other processes
    /// with a recycled pid.
    fn needle(&self, m: &Machine) -> String {
        match self.vmm.kind() {
            BackendKind::Qemu => format!("kennel-{}", m.name),
            BackendKind::CloudHypervisor => m.control_socket.display().to_string(),
        }
    }

    async fn graceful_stop(&self, r: &VmRecord) -> Result<(), ProvisionError> {
        let m = &r.machine;
        let dir = self.vm_dir(&r.project);
        let needle = self.needle(m);
        if let Some(pid) = read_pid(&m.pid_file).filter(|p| crate::vmm::pid_alive(*p, &needle)) {
            // Ask the guest to power off (no init system to catch ACPI); the
            // connection drops as it does, so the answer does not matter.
            let _ = self.ssh_exec(r, "sudo /sbin/kennel-shutdown").await;
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
}

/// The project key (for the gateways) and the VM's host key.
fn new_keypairs(
    runner: &dyn Runner,
    key_dir: &Path,
    vm_dir: &Path,
    label: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(key_dir).map_err(|e| e.to_string())?;
    for key in [
        key_dir.join("id_ed25519"),
        vm_dir.join("ssh_host_ed25519_key"),
    ] {
        disk::keygen(runner, &key, label).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether a boot failed because the VM's host address was taken.
fn address_taken(e: &ProvisionError) -> bool {
    let m = e.to_string();
    m.contains("Could not set up host forwarding") || m.contains("Address already in use")
}

fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn ms_between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_millis()).unwrap_or(u64::MAX)
}

/// An error and its sources, one line.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn owner_of(p: &Path, default: (u32, u32)) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(default, |m| (m.uid(), m.gid()))
}

fn read_from(path: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            s = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    s
}

/// Whether `addr` answers with an SSH banner within `limit`.
pub async fn ssh_banner(addr: &str, limit: Duration) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"SSH-"))
    };
    matches!(tokio::time::timeout(limit, attempt).await, Ok(Some(true)))
}

#[async_trait]
impl Provisioner for LocalProvisioner {
    fn backend(&self) -> String {
        self.vmm.describe()
    }

    async fn create(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let name = req.project.as_str().to_owned();
        let _guard = self.lock(&name).await;
        let span = tracing::info_span!("create", project = %name, owner = %req.owner);
        let started = Instant::now();
        match tracing::Instrument::instrument(self.create_inner(req, progress), span).await {
            Ok(c) => {
                tracing::info!(project = %name, seconds = started.elapsed().as_secs_f64(), "VM ready");
                Ok(c)
            }
            Err(e) => {
                let record = self.record(&name);
                self.teardown(&name, record.as_ref()).await;
                tracing::error!(project = %name, error = %e, "create failed; rolled back everything but the source");
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        spec: &VmSpec,
        progress: &dyn ProgressSink,
    ) -> Result<VmStatus, ProvisionError> {
        let name = spec.project.as_str();
        let _guard = self.lock(name).await;
        let r = self
            .record(name)
            .ok_or_else(|| ProvisionError::NoVm(name.to_owned()))?;
        if matches!(
            self.vmm.state(&r.machine).await,
            Ok(VmmState::Running | VmmState::Paused)
        ) {
            return self.status(&spec.project).await;
        }
        self.boot(&r, &spec.authorized_keys, progress, &mut Timings::default())
            .await
    }

    async fn stop(&self, project: &ProjectName) -> Result<(), ProvisionError> {
        let _guard = self.lock(project.as_str()).await;
        let r = self
            .record(project.as_str())
            .ok_or_else(|| ProvisionError::NoVm(project.to_string()))?;
        self.graceful_stop(&r).await
    }

    async fn destroy(&self, project: &ProjectName) -> Result<(), ProvisionError> {
        let _guard = self.lock(project.as_str()).await;
        let record = self.record(project.as_str());
        self.teardown(project.as_str(), record.as_ref()).await;
        Ok(())
    }

    async fn status(&self, project: &ProjectName) -> Result<VmStatus, ProvisionError> {
        let Some(r) = self.record(project.as_str()) else {
            return Ok(VmStatus {
                state: VmState::Missing,
                ready: false,
                ssh_addr: None,
                app_addr: None,
                backend: self.vmm.describe(),
            });
        };
        let st = self
            .vmm
            .state(&r.machine)
            .await
            .map_err(|e| failed(Stage::Ready, anyhow_chain(&e)))?;
        let state = match st {
            VmmState::Running => VmState::Running,
            VmmState::Paused => VmState::Paused,
            VmmState::Gone | VmmState::Stopped => VmState::Stopped,
        };
        let ready = state == VmState::Running
            && ssh_banner(&r.machine.net.ssh_addr(), Duration::from_secs(2)).await;
        Ok(VmStatus {
            state,
            ready,
            ssh_addr: Some(r.machine.net.ssh_addr()),
            app_addr: Some(r.machine.net.app_addr(r.app_port)),
            backend: self.vmm.describe(),
        })
    }

    async fn logs(&self, project: &ProjectName, lines: u32) -> Result<Vec<String>, ProvisionError> {
        let r = self
            .record(project.as_str())
            .ok_or_else(|| ProvisionError::NoVm(project.to_string()))?;
        let text = read_from(&r.machine.console_log, 0);
        Ok(tail(&text, lines as usize)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    async fn copy(
        &self,
        from: &ProjectName,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let src = self
            .record(from.as_str())
            .ok_or_else(|| ProvisionError::NoVm(from.to_string()))?;
        let name = to.project.as_str().to_owned();
        let dest_source = PathBuf::from(
            to.path
                .clone()
                .ok_or_else(|| failed(Stage::Validated, "no source path was given"))?,
        );
        // Both ends beneath a root, no link on the way; the copy itself
        // (cp -a) copies links as links.
        self.check_source(&src.source, Stage::Validated)?;
        let root = self.root_for(&dest_source, Stage::Validated)?;
        let rel = root
            .relative(&dest_source)
            .map_err(|e| failed(Stage::Validated, e.to_string()))?;
        if root
            .lookup(&rel)
            .map_err(|e| failed(Stage::Validated, e.to_string()))?
            .is_some()
        {
            return Err(failed(
                Stage::Validated,
                format!("{} already exists", dest_source.display()),
            ));
        }
        // A consistent disk needs the VM stopped; it is started again after.
        let was_running = {
            let _g = self.lock(from.as_str()).await;
            let running = matches!(
                self.vmm.state(&src.machine).await,
                Ok(VmmState::Running | VmmState::Paused)
            );
            if running {
                step(
                    progress,
                    Stage::Stopping,
                    Some(format!("{from}, to copy its disk")),
                );
                self.graceful_stop(&src).await?;
            }
            running
        };
        let _guard = self.lock(&name).await;
        let result = async {
            let dir = self.vm_dir(&name);
            std::fs::create_dir_all(&dir).map_err(|e| failed(Stage::Disk, e.to_string()))?;
            let slot = self.allocate_slot(&name, to.app_port, &[]).await?;
            let k = kernel::KernelSet::open(src.machine.kernel.parent().unwrap_or(Path::new("/")))
                .ok_or_else(|| failed(Stage::Image, "the source VM's kernel is gone"))?;
            let m = self.machine(
                &name,
                &k,
                to.resources.vcpus,
                to.resources.memory_mib,
                net::attach(&self.s.network, slot, to.app_port),
            );
            step(
                progress,
                Stage::Disk,
                Some(format!("copy-on-write copy of {from}'s disk and source")),
            );
            let (from_disk, to_disk) = (src.machine.disk.clone(), m.disk.clone());
            let (from_src, to_src) = (src.source.clone(), dest_source.clone());
            let (kd, vd, label) = (self.key_dir(&name), dir.clone(), format!("kennel-{name}"));
            self.blocking(Stage::Disk, move |runner| {
                // --reflink=auto: a copy-on-write clone where the filesystem can.
                runner
                    .run(
                        &Cmd::new("cp")
                            .args(["--reflink=auto", "--sparse=always"])
                            .arg(&from_disk)
                            .arg(&to_disk),
                    )
                    .map_err(|e| e.to_string())?;
                runner
                    .run(
                        &Cmd::new("cp")
                            .args(["-a", "--reflink=auto"])
                            .arg(&from_src)
                            .arg(&to_src),
                    )
                    .map_err(|e| e.to_string())?;
                new_keypairs(runner, &kd, &vd, &label)
            })
            .await?;
            let record = VmRecord {
                project: name.clone(),
                image: src.image.clone(),
                stack: src.stack.clone(),
                source: dest_source.clone(),
                slot,
                app_port: to.app_port,
                machine: m,
                ..src.clone()
            };
            self.save(&record)?;
            let status = self
                .boot(
                    &record,
                    &to.authorized_keys,
                    progress,
                    &mut Timings::default(),
                )
                .await?;
            Ok(Created {
                stack: record.stack.clone(),
                source_path: dest_source.display().to_string(),
                notes: vec![format!("a copy of {from}")],
                status,
            })
        }
        .await;
        if result.is_err() {
            let record = self.record(&name);
            self.teardown(&name, record.as_ref()).await;
            // The copied source is this attempt's own; the original is untouched.
            let _ = std::fs::remove_dir_all(&dest_source);
        }
        if was_running {
            let _g = self.lock(from.as_str()).await;
            let keys = self.current_keys(from.as_str());
            if let Err(e) = self
                .boot(&src, &keys, progress, &mut Timings::default())
                .await
            {
                tracing::error!(vm = %from, error = %e, "could not restart the VM after copying it");
            }
        }
        result
    }

    async fn rename(&self, from: &ProjectName, to: &ProjectName) -> Result<(), ProvisionError> {
        let _g1 = self.lock(from.as_str()).await;
        let _g2 = self.lock(to.as_str()).await;
        let Some(r) = self.record(from.as_str()) else {
            return Ok(()); // no VM: nothing of ours to rename
        };
        let running = matches!(
            self.vmm.state(&r.machine).await,
            Ok(VmmState::Running | VmmState::Paused)
        );
        let keys = self.current_keys(from.as_str());
        if running {
            self.graceful_stop(&r).await?;
        }
        let (old_dir, new_dir) = (self.vm_dir(from.as_str()), self.vm_dir(to.as_str()));
        if new_dir.exists() {
            return Err(failed(
                Stage::Validated,
                format!("{} already exists", new_dir.display()),
            ));
        }
        let io = |e: std::io::Error| failed(Stage::Disk, e.to_string());
        std::fs::rename(&old_dir, &new_dir).map_err(io)?;
        if self.key_dir(from.as_str()).exists() {
            std::fs::rename(self.key_dir(from.as_str()), self.key_dir(to.as_str())).map_err(io)?;
        }
        let k = kernel::KernelSet::open(r.machine.kernel.parent().unwrap_or(Path::new("/")))
            .ok_or_else(|| failed(Stage::Image, "the VM's kernel is gone"))?;
        let mut m = self.machine(
            to.as_str(),
            &k,
            r.machine.vcpus,
            r.machine.memory_mib,
            r.machine.net.clone(),
        );
        m.kernel = r.machine.kernel.clone();
        m.initramfs = r.machine.initramfs.clone();
        let record = VmRecord {
            project: to.to_string(),
            machine: m,
            ..r
        };
        self.save(&record)?;
        if running {
            self.boot(
                &record,
                &keys,
                &kennel_core::provision::NoProgress,
                &mut Timings::default(),
            )
            .await?;
        }
        Ok(())
    }

    async fn sync_keys(
        &self,
        project: &ProjectName,
        authorized_keys: &[String],
    ) -> Result<(), ProvisionError> {
        let _guard = self.lock(project.as_str()).await;
        let Some(r) = self.record(project.as_str()) else {
            return Ok(());
        };
        // The next boot reads the config disk; a running VM is told now.
        self.write_config(&r, authorized_keys).await?;
        if matches!(self.vmm.state(&r.machine).await, Ok(VmmState::Running)) {
            let project_pub =
                std::fs::read_to_string(self.project_key(project.as_str()).with_extension("pub"))
                    .unwrap_or_default();
            let mut all = vec![project_pub.trim().to_owned()];
            all.extend(authorized_keys.iter().map(|k| k.trim().to_owned()));
            // Keys are `type base64` (validated when added); each is one
            // single-quoted printf argument, never part of its format.
            let args: Vec<String> = all
                .iter()
                .map(|k| format!("'{}'", k.replace('\'', "")))
                .collect();
            let cmd = format!(
                "printf '%s\\n' {} > ~/.ssh/authorized_keys.new && mv ~/.ssh/authorized_keys.new ~/.ssh/authorized_keys",
                args.join(" ")
            );
            self.ssh_exec(&r, &cmd).await.map_err(|e| {
                failed(
                    Stage::Ready,
                    format!("could not update the keys in the running VM: {e}"),
                )
            })?;
        }
        Ok(())
    }

    async fn deploy_key(
        &self,
        user: &kennel_core::names::UserName,
    ) -> Result<String, ProvisionError> {
        let key = self.deploy_key_path(user.as_str());
        if !key.exists() {
            let (k, label) = (key.clone(), format!("kennel-deploy-{user}"));
            self.blocking(Stage::Validated, move |runner| {
                if let Some(parent) = k.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                disk::keygen(runner, &k, &label).map_err(|e| e.to_string())
            })
            .await?;
        }
        std::fs::read_to_string(key.with_extension("pub"))
            .map(|s| s.trim().to_owned())
            .map_err(|e| failed(Stage::Validated, e.to_string()))
    }

    fn vm_keys(&self, project: &ProjectName) -> Option<kennel_core::provision::VmKeys> {
        let name = project.as_str();
        self.record(name)?;
        Some(kennel_core::provision::VmKeys {
            client_key: self.project_key(name),
            host_key: std::fs::read_to_string(self.vm_dir(name).join("ssh_host_ed25519_key.pub"))
                .ok()
                .map(|k| k.trim().to_owned()),
        })
    }

    async fn vm_alive(&self, project: &ProjectName) -> Option<bool> {
        let r = self.record(project.as_str())?;
        let needle = self.needle(&r.machine);
        Some(read_pid(&r.machine.pid_file).is_some_and(|p| crate::vmm::pid_alive(p, &needle)))
    }

    async fn purge_source(&self, project: &ProjectName, path: &str) -> Result<(), ProvisionError> {
        let p = Path::new(path);
        // Reached beneath a project root without a link on the way; the
        // removal itself never follows links (std's remove_dir_all works
        // with openat/unlinkat and O_NOFOLLOW).
        let refuse = |why: String| {
            failed(
                Stage::Destroying,
                format!("refusing to delete {path}: {why}; delete it by hand if you mean it"),
            )
        };
        let root = self
            .root_for(p, Stage::Destroying)
            .map_err(|_| refuse("it is not inside a project root".into()))?;
        let rel = root.relative(p).map_err(|e| refuse(e.to_string()))?;
        if root
            .lookup(&rel)
            .map_err(|e| refuse(e.to_string()))?
            .is_none()
        {
            return Ok(());
        }
        tracing::warn!(project = %project, path, "purging the project's source");
        std::fs::remove_dir_all(p)
            .map_err(|e| failed(Stage::Destroying, format!("cannot delete {path}: {e}")))
    }
}
