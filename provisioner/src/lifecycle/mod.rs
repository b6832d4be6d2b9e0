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
use crate::virtiofs::{FsDaemon, Virtiofsd};
use crate::vmm::{read_pid, BackendKind, Machine, NetAttach, Vmm, VmmState};
use crate::{disk, kernel};

mod boot;
mod checkpoint;
mod copy;
mod create;
mod images;
mod incus;
mod reconcile;
mod resize;
#[cfg(test)]
mod tests;

pub use images::{BuiltImages, GuestImages};
pub use incus::{IncusProvisioner, IncusSettings, Listen};

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
    /// Hosts members may clone from although they are private
    /// (`git.allow_private_hosts`).
    pub git_allow_private_hosts: Vec<String>,
    /// Keep guests off the host's own services: QEMU's group and the
    /// host's ports guests may reach (Kennel's gateways); loaded before
    /// the first boot ([`crate::hostguard`]). `None`: unguarded.
    pub host_guard: Option<(u32, Vec<u16>)>,
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
    virtiofsd: Arc<dyn FsDaemon>,
    images: Arc<dyn GuestImages>,
    store: Store,
    runner: Arc<dyn Runner>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Whether the host guard was loaded (once per process, before the
    /// first boot).
    guard_loaded: tokio::sync::OnceCell<()>,
    /// Closed projects' egress rules and resolvers.
    egress: Arc<crate::egress::Egress>,
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
    ProvisionError::at(stage, message.into())
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

/// The guest kernel's command line. `lsm=` is the cloud kernel's default
/// list without the BPF LSM: systemd would attach a BPF program at every
/// boot for a feature no Kennel unit uses (1.4 s under emulation,
/// docs/guest.md); AppArmor, Landlock, Yama and lockdown stay.
/// `no_timer_check`: under emulation on a loaded host the kernel's check
/// that the timer ticks through the IO-APIC can miss its window and panic
/// the boot ("setup_IO_APIC", seen in a test run beside other guests);
/// the timer works, only the check is timing-sensitive.
pub const GUEST_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw panic=-1 quiet no_timer_check lsm=landlock,lockdown,yama,integrity,apparmor";

impl LocalProvisioner {
    /// A provisioner with `vmm` as backend.
    pub fn new(
        s: Settings,
        vmm: Arc<dyn Vmm>,
        virtiofsd: Arc<dyn FsDaemon>,
        store: Store,
        runner: Arc<dyn Runner>,
    ) -> Self {
        let images = Arc::new(BuiltImages {
            stacks_dir: s.stacks_dir.clone(),
            recipe_dir: s.recipe_dir.clone(),
            images_dir: s.data_dir.join("images"),
            apt_sources: s.apt_sources.clone(),
            apt_cache: s.apt_cache.clone(),
        });
        let egress = crate::egress::Egress::new(
            runner.clone(),
            s.data_dir.clone(),
            s.host_guard.as_ref().map(|(gid, _)| *gid),
        );
        Self {
            s,
            vmm,
            virtiofsd,
            images,
            store,
            egress,
            runner,
            locks: Mutex::new(HashMap::new()),
            guard_loaded: tokio::sync::OnceCell::new(),
        }
    }

    /// Takes kernels and images from `images` instead of building them.
    #[must_use]
    pub fn with_images(mut self, images: Arc<dyn GuestImages>) -> Self {
        self.images = images;
        self
    }

    /// The backend's description.
    pub fn describe(&self) -> String {
        self.vmm.describe()
    }

    /// Loads the host guard if it is configured and not loaded yet; a
    /// failure is logged, and the VM boots unguarded.
    pub async fn guard_host(&self) {
        let Some((_, ports)) = self.s.host_guard.clone() else {
            return;
        };
        self.guard_loaded
            .get_or_init(|| async {
                let dir = self.s.data_dir.clone();
                let runner = self.runner.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    crate::hostguard::install(runner.as_ref(), &dir, &ports)
                })
                .await;
                match loaded {
                    Ok(Ok(gid)) => tracing::info!(gid, "guests are kept off the host's own services"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "guests can reach services on this host's loopback (10.0.2.2) and addresses"),
                    Err(e) => tracing::warn!(error = %e, "could not load the host guard"),
                }
            })
            .await;
    }

    /// Puts project `name`'s egress policy in place for its VM `m`, before
    /// QEMU starts (or for one found running): `Err` when a closed policy
    /// cannot be enforced for it.
    pub(crate) async fn arm_egress(&self, name: &str, m: &Machine) -> Result<(), String> {
        let project = ProjectName::new(name).map_err(|e| e.to_string())?;
        let base = self.s.host_guard.as_ref().map(|(gid, _)| *gid);
        let carrier = match (&m.net, base) {
            (NetAttach::User { host_ip, .. }, Some(base)) => {
                let slot = net::user_slot(host_ip)
                    .ok_or_else(|| format!("{host_ip} is not a VM's loopback address"))?;
                let dns = host_ip
                    .parse()
                    .map_err(|_| format!("{host_ip} is not an address"))?;
                Some(crate::egress::Carrier::Group {
                    gid: crate::hostguard::vm_gid(base, slot),
                    dns,
                })
            }
            (
                NetAttach::Tap {
                    tap,
                    guest_ip,
                    gateway,
                    ..
                },
                Some(_),
            ) => {
                let slot = tap
                    .strip_prefix("kt")
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| format!("{tap} is not a VM's TAP"))?;
                let (guest, gw) = (
                    guest_ip
                        .parse()
                        .map_err(|_| format!("{guest_ip} is not an address"))?,
                    gateway
                        .parse()
                        .map_err(|_| format!("{gateway} is not an address"))?,
                );
                Some(
                    crate::egress::Carrier::tap(slot, tap, guest, gw).ok_or_else(|| {
                        format!("{tap} (slot {slot}) cannot carry an egress policy")
                    })?,
                )
            }
            _ => None,
        };
        match carrier {
            Some(c) => self.egress.arm(&project, c).await,
            None => {
                self.egress.disarm(&project).await;
                self.egress.supported(&self.egress.policy_of(name))
            }
        }
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.s.data_dir.join("vms").join(name)
    }

    /// Whether `r`'s VM runs (or is paused), for an operation that must
    /// know: a VMM that is alive but does not answer its API is an error
    /// here, never taken for a stopped VM (a checkpoint, rollback, resize
    /// or boot done as if it were stopped would write under it).
    async fn runs(&self, r: &VmRecord, stage: Stage) -> Result<bool, ProvisionError> {
        match self.vmm.state(&r.machine).await {
            Ok(s) => Ok(matches!(s, VmmState::Running | VmmState::Paused)),
            Err(e) => Err(failed(
                stage,
                format!(
                    "cannot tell whether the VM of {} runs: its VMM is alive but does not answer ({}); try again in a moment, or stop it with 'stop {}'",
                    r.project,
                    anyhow_chain(&e),
                    r.project
                ),
            )),
        }
    }

    /// Whether `r`'s VM may run: only a VMM known to be gone or stopped
    /// is not. For steps that are safe either way but must not skip a
    /// running VM (stopping it before a copy or a rename, merging layers
    /// only while it is stopped).
    async fn may_run(&self, r: &VmRecord) -> bool {
        !matches!(
            self.vmm.state(&r.machine).await,
            Ok(VmmState::Gone | VmmState::Stopped)
        )
    }

    /// Where a source being made for `name` is recorded while it is made
    /// ([`crate::source::Pending`]).
    fn pending_source(&self, name: &str) -> PathBuf {
        self.s.data_dir.join("pending-sources").join(name)
    }

    fn key_dir(&self, name: &str) -> PathBuf {
        self.s.data_dir.join("keys/projects").join(name)
    }

    /// Whether the project's virtiofsd runs (checked by its socket in its
    /// command line, so a reused pid is not taken for it).
    fn virtiofsd_alive(&self, r: &VmRecord) -> bool {
        let pid_file = self.vm_dir(&r.project).join("virtiofsd.pid");
        let needle = r.machine.virtiofs_socket.display().to_string();
        read_pid(&pid_file).is_some_and(|p| crate::vmm::pid_alive(p, &needle))
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
            BackendKind::Qemu | BackendKind::Incus => "qmp.sock",
        };
        Machine {
            name: name.to_owned(),
            vcpus,
            memory_mib,
            kernel: k.bzimage(),
            initramfs: k.initramfs(),
            cmdline: GUEST_CMDLINE.into(),
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
    pub(super) fn check_source(&self, path: &Path, stage: Stage) -> Result<(), ProvisionError> {
        kennel_core::hostpath::check_beneath_any(&self.s.project_roots, path)
            .map_err(|e| failed(stage, format!("the project's source cannot be shared: {e}")))
    }

    /// What a VMM's command line holds that tells it from other processes
    /// with a recycled pid.
    fn needle(&self, m: &Machine) -> String {
        match self.vmm.kind() {
            BackendKind::Qemu | BackendKind::Incus => format!("kennel-{}", m.name),
            BackendKind::CloudHypervisor => m.control_socket.display().to_string(),
        }
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
        // A project key restored from a backup stays.
        if !key.exists() {
            disk::keygen(runner, &key, label).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
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
                metrics::histogram!("kennel_new_project_seconds")
                    .record(started.elapsed().as_secs_f64());
                Ok(c)
            }
            Err(e) => {
                let stage = e.stage().map_or("other", Stage::as_str);
                metrics::counter!("kennel_new_project_failures_total", "stage" => stage)
                    .increment(1);
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
        let Some(mut r) = self.record(name) else {
            return self.rebuild(spec, progress).await;
        };
        if self.runs(&r, Stage::Booting).await? {
            return self.status(&spec.project).await;
        }
        // A rollback or checkpoint cut off by a crash is finished or
        // undone, and removed checkpoints' layers merged, before it boots.
        self.tidy_checkpoints(&r).await?;
        self.boot_in_a_free_slot(
            &mut r,
            &spec.authorized_keys,
            progress,
            &mut Timings::default(),
        )
        .await
    }

    async fn stop(&self, project: &ProjectName) -> Result<(), ProvisionError> {
        let _guard = self.lock(project.as_str()).await;
        let r = self
            .record(project.as_str())
            .ok_or_else(|| ProvisionError::NoVm(project.to_string()))?;
        let out = self.graceful_stop(&r).await;
        self.egress.disarm(project).await;
        out
    }

    async fn destroy(&self, project: &ProjectName) -> Result<(), ProvisionError> {
        let _guard = self.lock(project.as_str()).await;
        let record = self.record(project.as_str());
        self.teardown(project.as_str(), record.as_ref()).await;
        self.egress.disarm(project).await;
        Ok(())
    }

    fn egress_supported(&self, policy: &kennel_core::egress::EgressPolicy) -> Result<(), String> {
        self.egress.supported(policy)
    }

    fn guest_aes(&self) -> bool {
        // Under TCG the guest's AES instructions are emulated.
        !self.vmm.emulated() && crate::select::host_aes()
    }

    async fn set_egress(
        &self,
        project: &ProjectName,
        policy: &kennel_core::egress::EgressPolicy,
    ) -> Result<(), ProvisionError> {
        let refused = |e: String| ProvisionError::Unsupported(e);
        self.egress.set(project, policy).await.map_err(refused)?;
        // A VM that runs open and turns closed, or that Kennel found
        // running when it started, gets its rules now.
        if policy.mode == kennel_core::egress::EgressMode::Closed && !self.egress.armed(project) {
            if let Some(r) = self.record(project.as_str()) {
                if matches!(
                    self.vmm.state(&r.machine).await,
                    Ok(VmmState::Running | VmmState::Paused)
                ) {
                    self.arm_egress(project.as_str(), &r.machine)
                        .await
                        .map_err(refused)?;
                }
            }
        }
        Ok(())
    }

    fn egress_asks(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<kennel_core::egress::EgressAsked>> {
        self.egress.take_asks()
    }

    async fn status(&self, project: &ProjectName) -> Result<VmStatus, ProvisionError> {
        let Some(r) = self.record(project.as_str()) else {
            return Ok(VmStatus {
                state: VmState::Missing,
                ready: false,
                ssh_addr: None,
                app_addr: None,
                backend: self.vmm.describe(),
                problems: Vec::new(),
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
        let mut problems = Vec::new();
        if state == VmState::Running && !self.virtiofsd_alive(&r) {
            problems.push(format!(
                "the /workspace share (virtiofsd) has stopped: files in /workspace hang or fail in the VM; 'restart {project}' brings it back"
            ));
        }
        Ok(VmStatus {
            state,
            ready,
            ssh_addr: Some(r.machine.net.ssh_addr()),
            app_addr: Some(r.machine.net.app_addr(r.app_port)),
            backend: self.vmm.describe(),
            problems,
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
        self.copy_inner(from, None, to, progress).await
    }

    async fn checkpoint(
        &self,
        project: &ProjectName,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<kennel_core::provision::CheckpointTaken, ProvisionError> {
        let span = tracing::info_span!("checkpoint", project = %project, label);
        tracing::Instrument::instrument(self.checkpoint_inner(project, label, progress), span).await
    }

    async fn restore_checkpoint(
        &self,
        project: &ProjectName,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<(), ProvisionError> {
        let span = tracing::info_span!("rollback", project = %project, label);
        tracing::Instrument::instrument(self.restore_inner(project, label, progress), span).await
    }

    async fn remove_checkpoint(
        &self,
        project: &ProjectName,
        label: &str,
    ) -> Result<(), ProvisionError> {
        self.remove_checkpoint_inner(project, label).await
    }

    async fn copy_checkpoint(
        &self,
        from: &ProjectName,
        label: &str,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        self.copy_inner(from, Some(label), to, progress).await
    }

    async fn rename(&self, from: &ProjectName, to: &ProjectName) -> Result<(), ProvisionError> {
        self.rename_inner(from, to).await
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
        // Told whenever it may be running: a VMM that does not answer is
        // no reason to leave a removed key in a running guest.
        let state = self.vmm.state(&r.machine).await;
        if matches!(state, Ok(VmmState::Running) | Err(_)) {
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

    async fn rename_user(
        &self,
        from: &kennel_core::names::UserName,
        to: &kennel_core::names::UserName,
    ) -> Result<(), ProvisionError> {
        let (old, new) = (
            self.s.data_dir.join("keys/users").join(from.as_str()),
            self.s.data_dir.join("keys/users").join(to.as_str()),
        );
        // Kennel's own directory (names are validated: no separators).
        if old.is_dir() && !new.exists() {
            std::fs::rename(&old, &new).map_err(|e| {
                failed(
                    Stage::Validated,
                    format!("cannot move {}'s deploy key: {e}", from.as_str()),
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

    async fn resize(
        &self,
        project: &ProjectName,
        to: &kennel_core::model::Resources,
    ) -> Result<kennel_core::provision::ResizedVm, ProvisionError> {
        self.resize_vm(project, to).await
    }

    async fn set_app_port(
        &self,
        project: &ProjectName,
        port: u16,
    ) -> Result<Option<String>, ProvisionError> {
        let _guard = self.lock(project.as_str()).await;
        let Some(mut r) = self.record(project.as_str()) else {
            return Ok(None);
        };
        let running = self.runs(&r, Stage::Ready).await?;
        if running {
            self.vmm
                .set_app_forward(&r.machine, port)
                .await
                .map_err(|e| failed(Stage::Ready, anyhow_chain(&e)))?;
        }
        r.app_port = port;
        if let NetAttach::User { guest_app_port, .. } = &mut r.machine.net {
            *guest_app_port = port;
        }
        self.save(&r)?;
        Ok(running.then(|| r.machine.net.app_addr(port)))
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

    async fn cpu_time(&self, project: &ProjectName) -> Option<std::time::Duration> {
        let r = self.record(project.as_str())?;
        let needle = self.needle(&r.machine);
        crate::vmm::cpu_time(read_pid(&r.machine.pid_file)?, &needle)
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
