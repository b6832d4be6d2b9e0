//! The executor's view of the provisioner: a trait, its error, the progress
//! it reports, and two implementations that live here because they need
//! nothing from the host: [`Unavailable`] (a build without VMs, which says
//! so) and, for tests, a recording fake.
//!
//! The real implementation is in the `kennel-provisioner` crate.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::Resources;
use crate::names::ProjectName;

/// The stages a long operation goes through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Validated,
    /// Waiting for a free build slot.
    Queued,
    Cloning,
    Stack,
    Image,
    Disk,
    Booting,
    Ready,
    Stopping,
    Destroying,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Stage {
    /// The stage's name, as progress and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Validated => "validated",
            Stage::Queued => "queued",
            Stage::Cloning => "cloning",
            Stage::Stack => "stack",
            Stage::Image => "image",
            Stage::Disk => "disk",
            Stage::Booting => "booting",
            Stage::Ready => "ready",
            Stage::Stopping => "stopping",
            Stage::Destroying => "destroying",
        }
    }
}

/// One step of progress, sent to whoever asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub stage: Stage,
    /// Percentage within the stage, where known (e.g. cloning 43%).
    pub percent: Option<u8>,
    pub detail: Option<String>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.stage)?;
        if let Some(p) = self.percent {
            write!(f, " {p}%")?;
        }
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// Where progress goes: a chat message being edited, SSH stderr, JSON lines.
pub trait ProgressSink: Send + Sync {
    /// Reports one step. Must not block; sinks rate-limit themselves.
    fn report(&self, p: Progress);
    /// Output of a command `run` runs in a VM, as it comes (stdout and
    /// stderr together). Front ends that stream (SSH, the API, the
    /// console) pass all of it on; chat shows the last lines. Must not
    /// block.
    fn output(&self, _bytes: &[u8]) {}
    /// Whether [`ProgressSink::output`] reaches the asker whole (so the
    /// answer need not repeat its last lines).
    fn streams_output(&self) -> bool {
        false
    }
}

/// A sink that drops everything (for callers that only want the result).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn report(&self, _: Progress) {}
}

/// What the requester asked for in `new project`, validated but not yet
/// resolved (the stack may still need detecting, the source cloning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub project: ProjectName,
    pub owner: crate::names::UserName,
    pub stack: Option<String>,
    pub git: Option<String>,
    pub path: Option<String>,
    pub template: Option<String>,
    pub resources: Resources,
    pub app_port: u16,
    /// Public keys (`type base64`) of everyone with SSH access.
    pub authorized_keys: Vec<String>,
    /// Use an existing non-empty source directory.
    pub adopt: bool,
    /// Token for https:// clones (the owner's `git-token` secret).
    pub git_token: Option<String>,
    /// Author of the initial commit and `user.name`/`user.email` in the repo.
    pub author_name: String,
    pub author_email: String,
    /// A member's request: every git URL fetched must name a public host
    /// (not loopback, link-local or the host's networks), and redirects
    /// are not followed. Admins' clones go anywhere.
    pub public_hosts_only: bool,
    /// The host to make the VM on (`--host`, backends with several);
    /// `None`: where the backend places it.
    pub host: Option<String>,
}

/// One host of a backend with several (`hosts`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostInfo {
    pub name: String,
    /// `online`, `offline`, `evacuated`, `blocked`, as the engine says.
    pub status: String,
    /// What the engine says about that state, if anything.
    pub message: String,
    /// The 1-minute load average, when the host answers.
    pub load: Option<f64>,
    /// Memory in use and in all, MiB, when the host answers.
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    /// Kennel's projects on it, by name.
    pub projects: Vec<String>,
}

impl HostInfo {
    /// Whether the host takes and runs projects.
    pub fn online(&self) -> bool {
        self.status == "online"
    }
}

/// Where a project's VM lives, on a backend with several hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlace {
    pub project: String,
    pub host: String,
    /// Whether that host answers.
    pub online: bool,
    /// The host `evacuate` moved it from, until `restore` moves it back.
    pub evacuated_from: Option<String>,
}

/// A project the provisioner created: what it resolved, and the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub stack: String,
    pub source_path: String,
    /// What the requester should know (stack evidence, warnings).
    pub notes: Vec<String>,
    pub status: VmStatus,
    /// The app port, when the provisioner chose another than the request's
    /// (the detected stack's, or the repository's devcontainer.json's).
    pub app_port: Option<u16>,
}

/// What to run for an existing project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub project: ProjectName,
    pub stack: String,
    pub source_path: String,
    pub resources: Resources,
    pub app_port: u16,
    /// Public keys (`type base64`) of everyone with SSH access.
    pub authorized_keys: Vec<String>,
}

/// The VM's state as its backend reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Stopped,
    Paused,
    Missing,
}

/// What a backend says about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    pub state: VmState,
    /// Whether sshd answers and /workspace is mounted.
    pub ready: bool,
    /// Address and port at which the host reaches the VM's sshd.
    pub ssh_addr: Option<String>,
    /// Address and port at which the host reaches the VM's app.
    #[serde(default)]
    pub app_addr: Option<String>,
    pub backend: String,
    /// What is wrong with a VM that runs (its /workspace share gone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// What taking a checkpoint made and cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointTaken {
    /// Bytes of the disk layer the checkpoint keeps (what the VM wrote
    /// since the checkpoint before it, or since it was made).
    pub disk_bytes: u64,
    /// Bytes of older checkpoints' layers the new one reads through.
    pub disk_shared_bytes: u64,
    /// Bytes and files of the source copy.
    pub source_bytes: u64,
    pub source_files: u64,
    /// Whether the source was copied by reference (reflinks: btrfs, XFS)
    /// rather than byte by byte.
    pub reflinked: bool,
    /// Milliseconds the disk part took, and the source copy.
    pub disk_ms: u64,
    pub source_ms: u64,
    /// Milliseconds the running VM was paused (0 when it was stopped).
    pub paused_ms: u64,
    /// The source's git HEAD, if it is a repository.
    pub git_head: Option<String>,
}

/// The keys of a gateway's connection to a project's VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmKeys {
    /// The project's private key (OpenSSH format), which the VM's `dev`
    /// account accepts.
    pub client_key: std::path::PathBuf,
    /// The VM's host public key (one OpenSSH line), pinned: no other key
    /// is trusted for the VM. `None` if it cannot be read.
    pub host_key: Option<String>,
}

/// What caused a provisioner failure: the backend's own error, kept whole
/// so the chain reaches the operator's log.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a VM operation failed: one variant per operation, each with its
/// cause, and [`ProvisionError::Invalid`] for what the user asked that
/// cannot be done (their mistake, not the host's). Messages name the
/// stage and the cause's own message (the text users have always seen);
/// [`crate::outcome::chain`] adds the causes below it without repeating.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("VMs are not available on this host: {0}")]
    Unavailable(String),
    /// The backend cannot do this at all (a cluster command on one host).
    #[error("{0}")]
    Unsupported(String),
    #[error("project {0} has no VM")]
    NoVm(String),
    /// The host the VM lives on does not answer: nothing can be done to
    /// the VM until it does (or an admin moves it).
    #[error("host {host} is offline; {project} comes back with it, or an admin can 'move {project} HOST' it elsewhere once it is stopped")]
    HostOffline { project: String, host: String },
    /// The request cannot be done as asked: a non-empty target directory,
    /// a URL the guard refuses, an unknown template, a path through a link.
    #[error("{message}")]
    Invalid { stage: Stage, message: String },
    /// Cloning, creating or adopting the source failed on the host.
    #[error("{stage} failed: {source}")]
    Source {
        stage: Stage,
        #[source]
        source: Cause,
    },
    /// The stack's image could not be built or found.
    #[error("image failed: {0}")]
    Image(#[source] Cause),
    /// The VM's directory, disk, keys or config disk could not be made.
    #[error("disk failed: {0}")]
    Disk(#[source] Cause),
    /// The VMM or virtiofsd did not start, or the guest did not boot.
    #[error("booting failed: {0}")]
    Boot(#[source] Cause),
    /// The guest booted but did not become ready (sshd, the share).
    #[error("ready failed: {0}")]
    Ready(#[source] Cause),
    /// The VM did not stop.
    #[error("stopping failed: {0}")]
    Stop(#[source] Cause),
    /// The VM or a source could not be removed.
    #[error("destroying failed: {0}")]
    Destroy(#[source] Cause),
}

impl ProvisionError {
    /// A failure at `stage` with `cause`, as the variant for that stage.
    pub fn at(stage: Stage, cause: impl Into<Cause>) -> Self {
        let cause = cause.into();
        match stage {
            Stage::Validated | Stage::Queued | Stage::Cloning | Stage::Stack => {
                ProvisionError::Source {
                    stage,
                    source: cause,
                }
            }
            Stage::Image => ProvisionError::Image(cause),
            Stage::Disk => ProvisionError::Disk(cause),
            Stage::Booting => ProvisionError::Boot(cause),
            Stage::Ready => ProvisionError::Ready(cause),
            Stage::Stopping => ProvisionError::Stop(cause),
            Stage::Destroying => ProvisionError::Destroy(cause),
        }
    }

    /// The stage the failure belongs to (metrics' `cause` label), if any.
    pub fn stage(&self) -> Option<Stage> {
        match self {
            ProvisionError::Unavailable(_)
            | ProvisionError::Unsupported(_)
            | ProvisionError::NoVm(_)
            | ProvisionError::HostOffline { .. } => None,
            ProvisionError::Invalid { stage, .. } | ProvisionError::Source { stage, .. } => {
                Some(*stage)
            }
            ProvisionError::Image(_) => Some(Stage::Image),
            ProvisionError::Disk(_) => Some(Stage::Disk),
            ProvisionError::Boot(_) => Some(Stage::Booting),
            ProvisionError::Ready(_) => Some(Stage::Ready),
            ProvisionError::Stop(_) => Some(Stage::Stopping),
            ProvisionError::Destroy(_) => Some(Stage::Destroying),
        }
    }

    /// The class of this failure ([`crate::outcome::ErrorKind`]).
    pub fn kind(&self) -> crate::outcome::ErrorKind {
        use crate::outcome::ErrorKind;
        match self {
            ProvisionError::Unavailable(_) | ProvisionError::Unsupported(_) => {
                ErrorKind::Unavailable
            }
            ProvisionError::NoVm(_) | ProvisionError::HostOffline { .. } => ErrorKind::Conflict,
            ProvisionError::Invalid { .. } => ErrorKind::Invalid,
            ProvisionError::Source { .. }
            | ProvisionError::Image(_)
            | ProvisionError::Disk(_)
            | ProvisionError::Boot(_)
            | ProvisionError::Ready(_)
            | ProvisionError::Stop(_)
            | ProvisionError::Destroy(_) => ErrorKind::Failed,
        }
    }
}

/// What [`Provisioner::resize`] did at once on a running VM (all false
/// for a stopped one: everything applies at its next start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResizedVm {
    /// The disk grew, and the guest's filesystem with it.
    pub disk_now: bool,
    /// The guest has the new number of CPUs.
    pub cpus_now: bool,
    /// The guest has the new memory size.
    pub memory_now: bool,
}

/// Builds, runs and tears down project VMs.
#[async_trait]
pub trait Provisioner: Send + Sync {
    /// A short name for logs and `kennel doctor` (e.g. `qemu-tcg`).
    fn backend(&self) -> String;
    /// Prepares the source, resolves the stack, creates and boots the VM;
    /// returns when it is ready. On failure it has rolled back everything
    /// it created except the source.
    async fn create(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError>;
    /// Boots a stopped VM.
    async fn start(
        &self,
        spec: &VmSpec,
        progress: &dyn ProgressSink,
    ) -> Result<VmStatus, ProvisionError>;
    /// Shuts a VM down gracefully (forcing after a deadline).
    async fn stop(&self, project: &ProjectName) -> Result<(), ProvisionError>;
    /// Removes the VM and its disk; never the source.
    async fn destroy(&self, project: &ProjectName) -> Result<(), ProvisionError>;
    /// The VM's current state.
    async fn status(&self, project: &ProjectName) -> Result<VmStatus, ProvisionError>;
    /// The last `lines` lines of the console log.
    async fn logs(&self, project: &ProjectName, lines: u32) -> Result<Vec<String>, ProvisionError>;
    /// Deletes a project's source directory on the host (`rm --purge`).
    async fn purge_source(&self, project: &ProjectName, path: &str) -> Result<(), ProvisionError>;
    /// CPU time the project's VMM process has used so far (user and
    /// system, all its threads), for telling a busy guest from an idle
    /// one; `None` when there is no VM or it cannot tell.
    async fn cpu_time(&self, _project: &ProjectName) -> Option<std::time::Duration> {
        None
    }
    /// Whether the project's VMM process is alive, checked cheaply (no
    /// round trip to the guest), for noticing VMs that died; `None` when
    /// there is no VM or it cannot tell.
    async fn vm_alive(&self, _project: &ProjectName) -> Option<bool> {
        None
    }
    /// Makes `port` the VM's app port: kept for its next boots and, if it
    /// runs, in effect at once. Returns the app's new host address when
    /// the VM runs (for the route), `None` when it is stopped.
    async fn set_app_port(
        &self,
        _project: &ProjectName,
        _port: u16,
    ) -> Result<Option<String>, ProvisionError> {
        Ok(None)
    }
    /// How a gateway proves itself to a project's VM and knows it: the
    /// project's private key and the VM's pinned host key. `None` when the
    /// project has no VM.
    fn vm_keys(&self, _project: &ProjectName) -> Option<VmKeys> {
        None
    }
    /// Makes `to` a copy of `from`: a copy-on-write clone of its disk and a
    /// copy of its source at `to.path`; boots it.
    async fn copy(
        &self,
        from: &ProjectName,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError>;
    /// Takes checkpoint `label` of a project: its disk copy-on-write and
    /// a copy of its source, at one moment (a running VM is paused for
    /// it). The caller holds the project's VM lock.
    async fn checkpoint(
        &self,
        project: &ProjectName,
        _label: &str,
        _progress: &dyn ProgressSink,
    ) -> Result<CheckpointTaken, ProvisionError> {
        Err(no_checkpoints(
            self.backend(),
            format!("cannot take checkpoints (of {project})"),
        ))
    }
    /// Puts a stopped VM's disk and its source back as they were at
    /// checkpoint `label`. All or nothing, also across a crash.
    async fn restore_checkpoint(
        &self,
        project: &ProjectName,
        _label: &str,
        _progress: &dyn ProgressSink,
    ) -> Result<(), ProvisionError> {
        Err(no_checkpoints(
            self.backend(),
            format!("cannot roll back {project}"),
        ))
    }
    /// Removes checkpoint `label`'s files (a disk layer that others still
    /// read through is merged into them when the VM is next stopped).
    async fn remove_checkpoint(
        &self,
        project: &ProjectName,
        _label: &str,
    ) -> Result<(), ProvisionError> {
        Err(no_checkpoints(
            self.backend(),
            format!("has no checkpoints of {project}"),
        ))
    }
    /// Like [`Provisioner::copy`], from checkpoint `label` of `from`.
    async fn copy_checkpoint(
        &self,
        from: &ProjectName,
        _label: &str,
        _to: &CreateRequest,
        _progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        Err(no_checkpoints(
            self.backend(),
            format!("has no checkpoints of {from}"),
        ))
    }
    /// Gives a project's VM new resources (the caller holds its VM lock
    /// and checked the quota; the disk never shrinks): kept for its next
    /// boots, and at once on a running VM where the backend can. Says
    /// what took effect at once.
    async fn resize(
        &self,
        project: &ProjectName,
        _to: &Resources,
    ) -> Result<ResizedVm, ProvisionError> {
        Err(ProvisionError::Unavailable(format!(
            "{} cannot resize VMs (of {project})",
            self.backend()
        )))
    }
    /// Renames a project's VM (stopped and started again if it ran).
    async fn rename(&self, from: &ProjectName, to: &ProjectName) -> Result<(), ProvisionError>;
    /// The public half of a user's deploy key for ssh:// clones, made on first use.
    async fn deploy_key(&self, user: &crate::names::UserName) -> Result<String, ProvisionError>;
    /// A user was renamed: move what is kept under the user's name (the
    /// deploy key), so the same key serves under the new one.
    async fn rename_user(
        &self,
        _from: &crate::names::UserName,
        _to: &crate::names::UserName,
    ) -> Result<(), ProvisionError> {
        Ok(())
    }
    /// Replaces the keys allowed into a project's VM (used at its next boot,
    /// and at once if it runs), after access changed.
    async fn sync_keys(
        &self,
        project: &ProjectName,
        authorized_keys: &[String],
    ) -> Result<(), ProvisionError>;
    /// Where a project's source lives besides its directory on Kennel's
    /// host, named for a person (`storage volume kennel-src-NAME (pool
    /// default)`), for `rm`'s prompts; `None` when that directory is all.
    async fn source_elsewhere(&self, _project: &ProjectName) -> Option<String> {
        None
    }
    /// Whether guests run AES instructions at the host CPU's speed
    /// (hardware virtualization, or containers, on a host with AES-NI):
    /// then the gateway's SSH leg into them uses AES-GCM; under software
    /// emulation AES is emulated too, and chacha20-poly1305 is cheaper for
    /// the guest. Unknown: no.
    fn guest_aes(&self) -> bool {
        false
    }

    /// Whether this backend can enforce `policy`: an open one always; a
    /// closed one only where Kennel controls the VM's network (`Err` says
    /// why not, for the person who asked).
    fn egress_supported(&self, policy: &crate::egress::EgressPolicy) -> Result<(), String> {
        match policy.mode {
            crate::egress::EgressMode::Open => Ok(()),
            crate::egress::EgressMode::Closed => Err(format!(
                "the {} backend does not enforce egress policies yet; projects on it stay open",
                self.backend()
            )),
        }
    }

    /// Sets a project's egress policy: applied now where its VM runs, and
    /// at each boot.
    async fn set_egress(
        &self,
        _project: &ProjectName,
        _policy: &crate::egress::EgressPolicy,
    ) -> Result<(), ProvisionError> {
        Ok(())
    }

    /// Where the asks of closed projects' VMs arrive (taken once, by the
    /// daemon); `None` for a backend that raises none.
    fn egress_asks(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<crate::egress::EgressAsked>> {
        None
    }
    /// Whether a project's source is a directory on Kennel's host shared
    /// into its VM (`new project --path`, `--adopt`): `Err` saying where
    /// sources live instead (a storage volume on a cluster member).
    async fn host_sources(&self) -> Result<(), String> {
        Ok(())
    }
    /// The hosts projects run on, with their state, load and projects
    /// (`hosts`). Backends with one host say they have no others.
    async fn hosts(&self) -> Result<Vec<HostInfo>, ProvisionError> {
        Err(one_host(self.backend()))
    }
    /// Where each project's VM lives; empty on a backend with one host.
    /// Cheap enough for every `projects` listing (one or two requests).
    async fn placements(&self) -> Vec<VmPlace> {
        Vec::new()
    }
    /// Moves a stopped project's VM (its disk, addresses, keys) to host
    /// `to`, or, when `None`, to the online host with the fewest of
    /// Kennel's VMs other than the one it is on. `evacuated_from` marks it
    /// as moved off that host by `evacuate` (`restore` brings it back); a
    /// move without it clears the mark. Returns the host it is on now.
    async fn move_vm(
        &self,
        _project: &ProjectName,
        _to: Option<&str>,
        _evacuated_from: Option<&str>,
    ) -> Result<String, ProvisionError> {
        Err(one_host(self.backend()))
    }
    /// Marks a host as evacuated (nothing new is placed there, and what
    /// is not Kennel's moves as the engine decides) or, with `false`, as
    /// back in service.
    async fn set_host_evacuated(
        &self,
        _host: &str,
        _evacuated: bool,
    ) -> Result<(), ProvisionError> {
        Err(one_host(self.backend()))
    }
}

/// What a backend with one host says to the cluster commands.
pub(crate) fn one_host(backend: String) -> ProvisionError {
    ProvisionError::Unsupported(format!(
        "the {backend} backend runs every project on this one host; hosts, --host, move, evacuate and restore need vm.backend = \"incus\" (docs/incus.md)"
    ))
}

/// A backend without checkpoints says so, naming itself.
fn no_checkpoints(backend: String, what: String) -> ProvisionError {
    ProvisionError::Unavailable(format!("the {backend} backend {what}"))
}

/// The provisioner of a build or host that cannot run VMs: every call says
/// so plainly instead of pretending.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
}

#[async_trait]
impl Provisioner for Unavailable {
    fn backend(&self) -> String {
        "none".into()
    }
    async fn create(
        &self,
        _: &CreateRequest,
        _: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn start(&self, _: &VmSpec, _: &dyn ProgressSink) -> Result<VmStatus, ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn stop(&self, _: &ProjectName) -> Result<(), ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn destroy(&self, _: &ProjectName) -> Result<(), ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn status(&self, _: &ProjectName) -> Result<VmStatus, ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn logs(&self, _: &ProjectName, _: u32) -> Result<Vec<String>, ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn purge_source(&self, _: &ProjectName, _: &str) -> Result<(), ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn copy(
        &self,
        _: &ProjectName,
        _: &CreateRequest,
        _: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn rename(&self, _: &ProjectName, _: &ProjectName) -> Result<(), ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn deploy_key(&self, _: &crate::names::UserName) -> Result<String, ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
    async fn sync_keys(&self, _: &ProjectName, _: &[String]) -> Result<(), ProvisionError> {
        Err(ProvisionError::Unavailable(self.reason.clone()))
    }
}

/// Test doubles.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// A provisioner that records every call, keeps VMs in a map, and can
    /// be told to fail the next `create`.
    #[derive(Debug, Default)]
    pub struct RecordingProvisioner {
        pub calls: Mutex<Vec<String>>,
        vms: Mutex<BTreeMap<String, VmState>>,
        fail_next_create: Mutex<Option<(bool, String)>>,
        /// How long each create takes (to test queueing).
        pub create_delay: Mutex<std::time::Duration>,
        /// How long each start takes (to test concurrent wakes).
        pub start_delay: Mutex<std::time::Duration>,
        /// A pause after each progress step of a create (to watch progress).
        pub stage_delay: Mutex<std::time::Duration>,
        /// The app address running VMs report (default 127.0.0.1:10080).
        pub app_addr: Mutex<Option<String>>,
        /// Where `vm_keys` says each project's keys are
        /// (`<dir>/<project>/id_ed25519`); none when unset.
        pub keys_dir: Mutex<Option<std::path::PathBuf>>,
        /// What `cpu_time` reports per project (none when unset).
        pub cpu: Mutex<BTreeMap<String, std::time::Duration>>,
        /// The last create request.
        pub last_create: Mutex<Option<CreateRequest>>,
        /// How long each stop, destroy, rename and copy takes (to test
        /// that operations on one VM run one at a time).
        pub op_delay: Mutex<std::time::Duration>,
        /// Operations under way, per project.
        busy: Mutex<BTreeMap<String, Vec<&'static str>>>,
        /// Operations that began while another ran on the same project
        /// (`"rename p while start"`): the VM lock should keep this empty.
        overlaps: Mutex<Vec<String>>,
        /// Hosts, for the cluster commands (none: one host, and they say
        /// so): name → (online, evacuated).
        pub hosts: Mutex<BTreeMap<String, (bool, bool)>>,
        /// Where each VM is: project → (host, evacuated from).
        pub placed: Mutex<BTreeMap<String, (String, Option<String>)>>,
        /// The egress policy each project was given last.
        pub egress: Mutex<BTreeMap<String, crate::egress::EgressPolicy>>,
    }

    /// One operation under way on some projects; ends when dropped.
    struct InFlight<'a> {
        vms: &'a RecordingProvisioner,
        op: &'static str,
        projects: Vec<String>,
    }

    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            if let Ok(mut busy) = self.vms.busy.lock() {
                for p in &self.projects {
                    if let Some(ops) = busy.get_mut(p) {
                        if let Some(i) = ops.iter().position(|o| *o == self.op) {
                            ops.remove(i);
                        }
                    }
                }
            }
        }
    }

    impl RecordingProvisioner {
        /// Makes the next `create` fail at the boot stage with `message`
        /// (the host's failure).
        pub fn fail_next_create(&self, message: &str) {
            if let Ok(mut f) = self.fail_next_create.lock() {
                *f = Some((false, message.to_owned()));
            }
        }

        /// Makes the next `create` refuse what it was asked, as a backend
        /// refuses a non-empty target directory (the user's mistake).
        pub fn refuse_next_create(&self, message: &str) {
            if let Ok(mut f) = self.fail_next_create.lock() {
                *f = Some((true, message.to_owned()));
            }
        }

        /// Operations that overlapped another on the same project.
        pub fn overlaps(&self) -> Vec<String> {
            self.overlaps.lock().map(|o| o.clone()).unwrap_or_default()
        }

        /// Marks `op` under way on `projects`, noting any overlap, and
        /// waits `delay` (the operation's duration).
        async fn in_flight(
            &self,
            op: &'static str,
            projects: &[&str],
            delay: std::time::Duration,
        ) -> InFlight<'_> {
            if let (Ok(mut busy), Ok(mut overlaps)) = (self.busy.lock(), self.overlaps.lock()) {
                for p in projects {
                    let ops = busy.entry((*p).to_owned()).or_default();
                    for other in ops.iter() {
                        overlaps.push(format!("{op} {p} while {other}"));
                    }
                    ops.push(op);
                }
            }
            let flight = InFlight {
                vms: self,
                op,
                projects: projects.iter().map(|p| (*p).to_owned()).collect(),
            };
            tokio::time::sleep(delay).await;
            flight
        }

        fn op_delay(&self) -> std::time::Duration {
            self.op_delay.lock().map(|d| *d).unwrap_or_default()
        }

        /// Gives the fake hosts (all online, in service).
        pub fn with_hosts(&self, names: &[&str]) {
            if let Ok(mut h) = self.hosts.lock() {
                for n in names {
                    h.insert((*n).to_owned(), (true, false));
                }
            }
        }

        /// A host stops answering, or answers again.
        pub fn set_online(&self, host: &str, online: bool) {
            if let Ok(mut h) = self.hosts.lock() {
                if let Some(e) = h.get_mut(host) {
                    e.0 = online;
                }
            }
        }

        /// The host `project` is on, if the fake has hosts.
        pub fn host_of(&self, project: &str) -> Option<String> {
            self.placed.lock().ok()?.get(project).map(|p| p.0.clone())
        }

        fn place(&self, project: &str, want: Option<&str>) -> Result<(), ProvisionError> {
            let (Ok(hosts), Ok(mut placed)) = (self.hosts.lock(), self.placed.lock()) else {
                return Ok(());
            };
            if hosts.is_empty() {
                return Ok(());
            }
            let host = match want {
                Some(h) if hosts.contains_key(h) => h.to_owned(),
                Some(h) => return Err(ProvisionError::Unavailable(format!("no host {h}"))),
                None => hosts
                    .iter()
                    .filter(|(_, (on, evac))| *on && !*evac)
                    .min_by_key(|(h, _)| placed.values().filter(|p| &p.0 == *h).count())
                    .map(|(h, _)| h.clone())
                    .unwrap_or_default(),
            };
            placed.insert(project.to_owned(), (host, None));
            Ok(())
        }

        fn offline_host(&self, project: &str) -> Option<String> {
            let host = self.host_of(project)?;
            let online = self.hosts.lock().ok()?.get(&host).is_some_and(|h| h.0);
            (!online).then_some(host)
        }

        /// The calls so far, as `op project` strings.
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }

        /// The VMM of a running VM dies (as under `kill -9`).
        pub fn crash(&self, project: &str) {
            self.set(project, Some(VmState::Stopped));
        }

        /// Whether a VM exists for the project.
        pub fn has_vm(&self, project: &str) -> bool {
            self.vms.lock().is_ok_and(|v| v.contains_key(project))
        }

        fn record(&self, op: &str, p: &str) {
            if let Ok(mut c) = self.calls.lock() {
                c.push(format!("{op} {p}"));
            }
        }

        fn set(&self, p: &str, s: Option<VmState>) {
            if let Ok(mut v) = self.vms.lock() {
                match s {
                    Some(s) => v.insert(p.to_owned(), s),
                    None => v.remove(p),
                };
            }
        }

        fn status_of(&self, p: &str) -> VmStatus {
            let state = self
                .vms
                .lock()
                .ok()
                .and_then(|v| v.get(p).copied())
                .unwrap_or(VmState::Missing);
            VmStatus {
                state,
                ready: state == VmState::Running,
                ssh_addr: (state == VmState::Running).then(|| "127.0.0.1:10022".to_owned()),
                app_addr: (state == VmState::Running).then(|| {
                    self.app_addr
                        .lock()
                        .ok()
                        .and_then(|a| a.clone())
                        .unwrap_or_else(|| "127.0.0.1:10080".to_owned())
                }),
                backend: "fake".into(),
                problems: Vec::new(),
            }
        }
    }

    #[async_trait]
    impl Provisioner for RecordingProvisioner {
        fn backend(&self) -> String {
            "fake".into()
        }
        async fn create(
            &self,
            req: &CreateRequest,
            progress: &dyn ProgressSink,
        ) -> Result<Created, ProvisionError> {
            let p = req.project.as_str();
            self.record("create", p);
            if let Ok(mut last) = self.last_create.lock() {
                *last = Some(req.clone());
            }
            let fail = self.fail_next_create.lock().ok().and_then(|mut f| f.take());
            let delay = self.create_delay.lock().map(|d| *d).unwrap_or_default();
            tokio::time::sleep(delay).await;
            let pause = self.stage_delay.lock().map(|d| *d).unwrap_or_default();
            for stage in [Stage::Image, Stage::Disk, Stage::Booting] {
                progress.report(Progress {
                    stage,
                    percent: None,
                    detail: None,
                });
                tokio::time::sleep(pause).await;
            }
            match fail {
                Some((true, message)) => {
                    return Err(ProvisionError::Invalid {
                        stage: Stage::Validated,
                        message,
                    })
                }
                Some((false, message)) => return Err(ProvisionError::Boot(message.into())),
                None => {}
            }
            self.place(p, req.host.as_deref())?;
            self.set(p, Some(VmState::Running));
            Ok(Created {
                stack: req.stack.clone().unwrap_or_else(|| "rust".into()),
                source_path: req
                    .path
                    .clone()
                    .unwrap_or_else(|| format!("/srv/kennel/{p}")),
                notes: vec!["stack rust (Cargo.toml)".into()],
                status: self.status_of(p),
                app_port: None,
            })
        }
        async fn start(
            &self,
            spec: &VmSpec,
            progress: &dyn ProgressSink,
        ) -> Result<VmStatus, ProvisionError> {
            let p = spec.project.as_str();
            self.record("start", p);
            if let Some(host) = self.offline_host(p) {
                return Err(ProvisionError::HostOffline {
                    project: p.to_owned(),
                    host,
                });
            }
            // As the real backends do.
            progress.report(Progress {
                stage: Stage::Booting,
                percent: None,
                detail: Some("recording provisioner".into()),
            });
            let delay = self.start_delay.lock().map(|d| *d).unwrap_or_default();
            let _op = self.in_flight("start", &[p], delay).await;
            self.set(p, Some(VmState::Running));
            Ok(self.status_of(p))
        }
        async fn stop(&self, project: &ProjectName) -> Result<(), ProvisionError> {
            self.record("stop", project.as_str());
            let _op = self
                .in_flight("stop", &[project.as_str()], self.op_delay())
                .await;
            self.set(project.as_str(), Some(VmState::Stopped));
            Ok(())
        }
        async fn destroy(&self, project: &ProjectName) -> Result<(), ProvisionError> {
            self.record("destroy", project.as_str());
            let _op = self
                .in_flight("destroy", &[project.as_str()], self.op_delay())
                .await;
            self.set(project.as_str(), None);
            Ok(())
        }
        async fn status(&self, project: &ProjectName) -> Result<VmStatus, ProvisionError> {
            Ok(self.status_of(project.as_str()))
        }
        async fn logs(
            &self,
            project: &ProjectName,
            lines: u32,
        ) -> Result<Vec<String>, ProvisionError> {
            self.record("logs", project.as_str());
            Ok((0..lines.min(3))
                .map(|i| format!("console line {i}"))
                .collect())
        }
        async fn purge_source(&self, project: &ProjectName, _: &str) -> Result<(), ProvisionError> {
            self.record("purge", project.as_str());
            Ok(())
        }
        async fn cpu_time(&self, project: &ProjectName) -> Option<std::time::Duration> {
            self.cpu.lock().ok()?.get(project.as_str()).copied()
        }
        fn egress_supported(&self, _: &crate::egress::EgressPolicy) -> Result<(), String> {
            Ok(())
        }
        async fn set_egress(
            &self,
            project: &ProjectName,
            policy: &crate::egress::EgressPolicy,
        ) -> Result<(), ProvisionError> {
            if let Ok(mut e) = self.egress.lock() {
                e.insert(project.to_string(), policy.clone());
            }
            Ok(())
        }
        async fn source_elsewhere(&self, project: &ProjectName) -> Option<String> {
            self.host_sources()
                .await
                .err()
                .map(|_| format!("storage volume kennel-src-{project}"))
        }
        async fn host_sources(&self) -> Result<(), String> {
            // With hosts, like a cluster: sources live in volumes.
            match self.hosts.lock() {
                Ok(h) if !h.is_empty() => {
                    Err("projects' sources live in storage volumes on the cluster's hosts".into())
                }
                _ => Ok(()),
            }
        }
        async fn hosts(&self) -> Result<Vec<HostInfo>, ProvisionError> {
            let (hosts, placed) = match (self.hosts.lock(), self.placed.lock()) {
                (Ok(h), Ok(p)) => (h.clone(), p.clone()),
                _ => return Ok(Vec::new()),
            };
            if hosts.is_empty() {
                return Err(super::one_host(self.backend()));
            }
            Ok(hosts
                .into_iter()
                .map(|(name, (online, evacuated))| HostInfo {
                    projects: placed
                        .iter()
                        .filter(|(_, (h, _))| *h == name)
                        .map(|(p, _)| p.clone())
                        .collect(),
                    name,
                    status: match (online, evacuated) {
                        (false, _) => "offline",
                        (true, true) => "evacuated",
                        (true, false) => "online",
                    }
                    .into(),
                    message: String::new(),
                    load: online.then_some(0.5),
                    memory_used_mib: None,
                    memory_total_mib: None,
                })
                .collect())
        }
        async fn placements(&self) -> Vec<VmPlace> {
            let (hosts, placed) = match (self.hosts.lock(), self.placed.lock()) {
                (Ok(h), Ok(p)) => (h.clone(), p.clone()),
                _ => return Vec::new(),
            };
            placed
                .into_iter()
                .map(|(project, (host, evacuated_from))| VmPlace {
                    online: hosts.get(&host).is_some_and(|h| h.0),
                    project,
                    host,
                    evacuated_from,
                })
                .collect()
        }
        async fn move_vm(
            &self,
            project: &ProjectName,
            to: Option<&str>,
            evacuated_from: Option<&str>,
        ) -> Result<String, ProvisionError> {
            self.record("move", project.as_str());
            let from = self.host_of(project.as_str()).unwrap_or_default();
            let (Ok(hosts), Ok(mut placed)) = (self.hosts.lock(), self.placed.lock()) else {
                return Err(ProvisionError::Unavailable("poisoned".into()));
            };
            if hosts.is_empty() {
                return Err(super::one_host(self.backend()));
            }
            let to = match to {
                Some(t) if hosts.get(t).is_some_and(|h| h.0) => t.to_owned(),
                Some(t) => {
                    return Err(ProvisionError::Unavailable(format!(
                        "host {t} cannot take it"
                    )))
                }
                None => hosts
                    .iter()
                    .filter(|(h, (on, evac))| *on && !*evac && **h != from)
                    .min_by_key(|(h, _)| placed.values().filter(|p| &p.0 == *h).count())
                    .map(|(h, _)| h.clone())
                    .ok_or_else(|| ProvisionError::Unavailable("no other host".into()))?,
            };
            placed.insert(
                project.to_string(),
                (to.clone(), evacuated_from.map(str::to_owned)),
            );
            Ok(to)
        }
        async fn set_host_evacuated(
            &self,
            host: &str,
            evacuated: bool,
        ) -> Result<(), ProvisionError> {
            self.record(if evacuated { "evacuate" } else { "restore" }, host);
            if let Ok(mut h) = self.hosts.lock() {
                if let Some(e) = h.get_mut(host) {
                    e.1 = evacuated;
                }
            }
            Ok(())
        }
        async fn vm_alive(&self, project: &ProjectName) -> Option<bool> {
            self.vms
                .lock()
                .ok()
                .and_then(|v| v.get(project.as_str()).map(|s| *s == VmState::Running))
        }
        fn vm_keys(&self, project: &ProjectName) -> Option<super::VmKeys> {
            let dir = self.keys_dir.lock().ok()?.clone()?;
            let dir = dir.join(project.as_str());
            Some(super::VmKeys {
                client_key: dir.join("id_ed25519"),
                host_key: std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub"))
                    .ok()
                    .map(|k| k.trim().to_owned()),
            })
        }
        async fn copy(
            &self,
            from: &ProjectName,
            to: &CreateRequest,
            progress: &dyn ProgressSink,
        ) -> Result<Created, ProvisionError> {
            self.record("copy", from.as_str());
            let _op = self
                .in_flight(
                    "copy",
                    &[from.as_str(), to.project.as_str()],
                    self.op_delay(),
                )
                .await;
            self.create(to, progress).await
        }
        async fn checkpoint(
            &self,
            project: &ProjectName,
            label: &str,
            progress: &dyn ProgressSink,
        ) -> Result<CheckpointTaken, ProvisionError> {
            self.record("checkpoint", &format!("{project} {label}"));
            if !self.has_vm(project.as_str()) {
                return Err(ProvisionError::NoVm(project.to_string()));
            }
            progress.report(Progress {
                stage: Stage::Disk,
                percent: None,
                detail: Some(format!("checkpoint {label}")),
            });
            let _op = self
                .in_flight("checkpoint", &[project.as_str()], self.op_delay())
                .await;
            Ok(CheckpointTaken {
                disk_bytes: 1 << 20,
                source_bytes: 4096,
                source_files: 1,
                ..CheckpointTaken::default()
            })
        }
        async fn restore_checkpoint(
            &self,
            project: &ProjectName,
            label: &str,
            _progress: &dyn ProgressSink,
        ) -> Result<(), ProvisionError> {
            self.record("restore", &format!("{project} {label}"));
            if self.status_of(project.as_str()).state == VmState::Running {
                return Err(ProvisionError::Invalid {
                    stage: Stage::Disk,
                    message: format!("{project} runs: stop it before rolling back"),
                });
            }
            let _op = self
                .in_flight("restore", &[project.as_str()], self.op_delay())
                .await;
            Ok(())
        }
        async fn remove_checkpoint(
            &self,
            project: &ProjectName,
            label: &str,
        ) -> Result<(), ProvisionError> {
            self.record("remove_checkpoint", &format!("{project} {label}"));
            let _op = self
                .in_flight("remove_checkpoint", &[project.as_str()], self.op_delay())
                .await;
            Ok(())
        }
        async fn copy_checkpoint(
            &self,
            from: &ProjectName,
            label: &str,
            to: &CreateRequest,
            progress: &dyn ProgressSink,
        ) -> Result<Created, ProvisionError> {
            self.record("copy_checkpoint", &format!("{from} {label}"));
            let _op = self
                .in_flight(
                    "copy",
                    &[from.as_str(), to.project.as_str()],
                    self.op_delay(),
                )
                .await;
            self.create(to, progress).await
        }
        async fn rename(&self, from: &ProjectName, to: &ProjectName) -> Result<(), ProvisionError> {
            self.record("rename", from.as_str());
            // As the real one: the VM is moved stopped, under its new
            // name, and started again.
            let state = self
                .vms
                .lock()
                .ok()
                .and_then(|mut v| v.remove(from.as_str()));
            self.set(to.as_str(), state.map(|_| VmState::Stopped));
            let _op = self
                .in_flight("rename", &[from.as_str(), to.as_str()], self.op_delay())
                .await;
            self.set(to.as_str(), state);
            Ok(())
        }
        async fn set_app_port(
            &self,
            project: &ProjectName,
            _port: u16,
        ) -> Result<Option<String>, ProvisionError> {
            let _op = self
                .in_flight("set_app_port", &[project.as_str()], self.op_delay())
                .await;
            Ok(None)
        }
        async fn resize(
            &self,
            project: &ProjectName,
            to: &Resources,
        ) -> Result<ResizedVm, ProvisionError> {
            self.record(
                "resize",
                &format!("{project} {} {} {}", to.vcpus, to.memory_mib, to.disk_mib),
            );
            // A running VM's disk grows at once, as QEMU's does.
            let running = self.status_of(project.as_str()).state == VmState::Running;
            Ok(ResizedVm {
                disk_now: running,
                ..ResizedVm::default()
            })
        }
        async fn sync_keys(
            &self,
            project: &ProjectName,
            keys: &[String],
        ) -> Result<(), ProvisionError> {
            self.record("sync_keys", &format!("{project} {}", keys.len()));
            Ok(())
        }
        async fn deploy_key(
            &self,
            user: &crate::names::UserName,
        ) -> Result<String, ProvisionError> {
            Ok(format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAK kennel-deploy-{user}"))
        }
    }
}
