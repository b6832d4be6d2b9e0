//! Projects as instances of an Incus server or cluster
//! ([`IncusProvisioner`], `vm.backend = "incus"`).
//!
//! Kennel's host still does what only it can: the source (cloned with the
//! same guard, or made from a template), the stack, the image (built by
//! the same recipe, then imported into Incus once), the project's keys,
//! purges. Incus does the rest: the instance and its root disk, its
//! network, `/workspace`, and the proxies by which Kennel's gateways reach
//! its sshd and app. What Kennel remembers of an instance lives on it, as
//! `user.kennel.*` keys, so Incus's state is the truth after a restart.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kennel_core::provision::{CheckpointTaken, HostInfo, ResizedVm, VmKeys, VmPlace};

use super::checkpoint;
use super::*;
use crate::incus::api::{Instance, InstanceType, MemberAction, StateAction};
use crate::incus::spec::{self, Placement, ProjectInstance, Workspace};
use crate::incus::{image as incus_image, IncusClient, IncusError};

pub use crate::choice::{Listen, WorkspaceChoice};

mod volume;
use volume::{member_of, volume_of, VOLUME};

/// The `[incus]` settings the provisioner runs with.
#[derive(Debug, Clone)]
pub struct IncusSettings {
    pub placement: Placement,
    /// Where the proxies listen on the member: an address only Kennel
    /// reaches.
    pub listen: Listen,
    /// The member ports projects' proxies take, inclusive.
    pub ports: (u16, u16),
    /// Where new projects' sources live.
    pub workspace: WorkspaceChoice,
}

/// The provisioner of projects on Incus.
pub struct IncusProvisioner {
    host: LocalProvisioner,
    client: IncusClient,
    set: IncusSettings,
    /// Members' addresses, by name (`Listen::Member`), read when one is
    /// not known yet.
    members: std::sync::Mutex<BTreeMap<String, IpAddr>>,
    /// Which instances run, kept by [`IncusProvisioner::watch_events`]
    /// while Incus's event stream is open (`None` otherwise: then each
    /// question is a request).
    running: std::sync::Mutex<Option<BTreeMap<String, Option<bool>>>>,
    /// Whether Incus is a cluster, once asked (`workspace = "auto"`).
    clustered: std::sync::Mutex<Option<bool>>,
}

impl std::fmt::Debug for IncusProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncusProvisioner")
            .field("incus", &self.client.address())
            .field("placement", &self.set.placement)
            .finish_non_exhaustive()
    }
}

/// Kennel's labels on an instance (`user.kennel.<key>`).
const STACK: &str = "stack";
const SOURCE: &str = "source";
const IMAGE: &str = "image";
const UID: &str = "uid";
const GID: &str = "gid";
const SSH_PORT: &str = "ssh_port";
const APP_PORT: &str = "app_port";
const GUEST_APP_PORT: &str = "guest_app_port";
/// The member `evacuate` moved it off (until `restore`).
const EVACUATED_FROM: &str = "evacuated_from";

fn label<'a>(i: &'a Instance, key: &str) -> Option<&'a str> {
    i.config
        .get(&format!("user.kennel.{key}"))
        .map(String::as_str)
}

/// Whether instance `i` may be one of Kennel's: it carries Kennel's
/// labels, or its member does not answer (Incus lists such an instance
/// without its config, so its labels cannot be read).
fn maybe_kennels(i: &Instance) -> bool {
    label(i, STACK).is_some() || i.config.is_empty()
}

fn label_num<T: std::str::FromStr>(i: &Instance, key: &str) -> Option<T> {
    label(i, key)?.parse().ok()
}

/// The Incus snapshot that holds checkpoint `label`'s disk.
fn snapshot(label: &str) -> String {
    format!("kennel-{label}")
}

/// An Incus failure at `stage`, its message whole.
fn incus_failed(stage: Stage, e: IncusError) -> ProvisionError {
    ProvisionError::at(stage, e)
}

impl IncusProvisioner {
    /// A provisioner over `client`, with Kennel's host-side settings `s`.
    pub fn new(
        s: Settings,
        store: Store,
        runner: Arc<dyn Runner>,
        client: IncusClient,
        set: IncusSettings,
    ) -> Self {
        let host = LocalProvisioner::new(
            s,
            Arc::new(crate::vmm::Elsewhere),
            Arc::new(crate::virtiofs::Elsewhere),
            store,
            runner,
        );
        Self {
            host,
            client,
            set,
            members: std::sync::Mutex::default(),
            running: std::sync::Mutex::default(),
            clustered: std::sync::Mutex::default(),
        }
    }

    /// Follows Incus's lifecycle events until `shutdown`: while the
    /// stream is open, whether an instance runs is known here (the VM
    /// watcher asks every 2 s about every running project; without this,
    /// each of those is a request to Incus). The picture is read anew
    /// after every instance event and every reconnect, so a missed event
    /// costs nothing but a moment.
    pub async fn watch_events(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => return,
                s = self.client.events() => s,
            };
            match stream {
                Ok(mut events) => {
                    tracing::info!("following Incus's events");
                    self.refresh_running().await;
                    loop {
                        let event = tokio::select! {
                            () = &mut shutdown => {
                                self.set_running(None);
                                return;
                            }
                            e = events.next() => e,
                        };
                        match event {
                            Some(e) if e.instance().is_some() => {
                                tracing::debug!(action = %e.action, source = %e.source, "Incus event");
                                self.refresh_running().await;
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                    tracing::warn!(
                        "Incus's event stream ended; asking Incus directly until it is back"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow Incus's events; asking Incus directly")
                }
            }
            self.set_running(None);
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// Reads which instances run (one request).
    async fn refresh_running(&self) {
        match self.client.instances().await {
            Ok(all) => self.set_running(Some(
                all.into_iter()
                    .map(|i| {
                        // Listed without its config, in state Error: its
                        // member does not answer, so nobody can tell.
                        let known = !(i.config.is_empty() && i.status == "Error");
                        let running = known.then(|| i.running());
                        (i.name, running)
                    })
                    .collect(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list Incus instances");
                self.set_running(None);
            }
        }
    }

    fn set_running(&self, to: Option<BTreeMap<String, Option<bool>>>) {
        if let Ok(mut r) = self.running.lock() {
            *r = to;
        }
    }

    /// Takes kernels and images from `images` instead of building them.
    #[must_use]
    pub fn with_images(mut self, images: Arc<dyn GuestImages>) -> Self {
        self.host = self.host.with_images(images);
        self
    }

    /// The backend's description.
    pub fn describe(&self) -> String {
        format!(
            "incus ({}s, pool {}, network {}) at {}",
            self.set.placement.instance_type,
            self.set.placement.storage_pool,
            self.set.placement.network,
            self.client.address()
        )
    }

    /// The Incus client (for `doctor` and the cluster commands).
    pub fn client(&self) -> &IncusClient {
        &self.client
    }

    /// Kennel's instances and whether each runs, from Incus itself.
    pub async fn reconcile(&self) -> Vec<(String, bool)> {
        match self.client.instances().await {
            Ok(all) => all
                .into_iter()
                .filter(|i| label(i, STACK).is_some())
                .map(|i| {
                    let running = i.running();
                    (i.name, running)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list Incus instances");
                Vec::new()
            }
        }
    }

    /// The address the proxies listen on for an instance on `member`.
    async fn listen_ip(&self, member: &str) -> IpAddr {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let Listen::At(ip) = self.set.listen else {
            let known = |m: &str| self.members.lock().ok().and_then(|c| c.get(m).copied());
            if let Some(ip) = known(member) {
                return ip;
            }
            match self.client.members().await {
                Ok(all) => {
                    if let Ok(mut c) = self.members.lock() {
                        for m in all {
                            if let Some(ip) = m.address() {
                                c.insert(m.server_name, ip);
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the cluster's members"),
            }
            return known(member).unwrap_or_else(|| {
                tracing::warn!(member, "no address known for this member; using loopback");
                loopback
            });
        };
        ip
    }

    /// The SSH and app addresses of instance `i`'s proxies.
    async fn addrs(&self, i: &Instance) -> (String, String) {
        let ip = self.listen_ip(&i.location).await;
        let at = |key| std::net::SocketAddr::new(ip, label_num(i, key).unwrap_or(0)).to_string();
        (at(SSH_PORT), at(APP_PORT))
    }

    /// Points instance `name`'s proxies at `ip` (the member it is on
    /// now) and sets or clears its evacuation mark, in one write.
    async fn retarget(
        &self,
        name: &str,
        ip: Option<IpAddr>,
        evacuated_from: Option<&str>,
    ) -> Result<(), IncusError> {
        self.client
            .update_instance(name, |inst| {
                if let Some(ip) = ip {
                    for dev in ["kennel-ssh", "kennel-app"] {
                        if let Some(d) = inst.pointer_mut(&format!("/devices/{dev}")) {
                            let old = d["listen"].as_str().unwrap_or("tcp:0.0.0.0:0");
                            let port: u16 = old
                                .rsplit_once(':')
                                .and_then(|(_, p)| p.parse().ok())
                                .unwrap_or(0);
                            d["listen"] = serde_json::Value::String(format!(
                                "tcp:{}",
                                std::net::SocketAddr::new(ip, port)
                            ));
                        }
                    }
                }
                if let Some(serde_json::Value::Object(c)) = inst.get_mut("config") {
                    let key = format!("user.kennel.{EVACUATED_FROM}");
                    match evacuated_from {
                        Some(m) => {
                            c.insert(key, serde_json::Value::String(m.to_owned()));
                        }
                        None => {
                            c.remove(&key);
                        }
                    }
                }
            })
            .await
    }

    /// After instance `i`'s disk went back to a snapshot, whose config is
    /// that of the checkpoint's moment: its proxies listen where it is
    /// now (it may have moved since) and `/workspace` is its volume as
    /// named now (it may have been renamed since).
    async fn after_restore(&self, i: &Instance) -> Result<(), ProvisionError> {
        if self.set.listen == Listen::Member {
            let ip = self.listen_ip(&i.location).await;
            self.retarget(&i.name, Some(ip), label(i, EVACUATED_FROM))
                .await
                .map_err(|e| incus_failed(Stage::Disk, e))?;
        }
        if let Some(v) = volume_of(i) {
            self.repoint_volume(&i.name, v).await?;
        }
        Ok(())
    }

    /// What an Incus failure about instance `name` means for Kennel: a
    /// member that does not answer is [`ProvisionError::HostOffline`]
    /// (told at once), the rest a failure at `stage`.
    async fn explain(&self, name: &str, stage: Stage, e: IncusError) -> ProvisionError {
        let offline = |host: String| ProvisionError::HostOffline {
            project: name.to_owned(),
            host,
        };
        match e {
            IncusError::MemberOffline { member } => offline(member),
            IncusError::NotFound { .. } => ProvisionError::NoVm(name.to_owned()),
            e => {
                if let Some(member) = self.client.location(name).await {
                    if matches!(self.client.member(&member).await, Ok(m) if !m.online()) {
                        return offline(member);
                    }
                }
                incus_failed(stage, e)
            }
        }
    }

    /// Two member ports no instance of Kennel's holds (and, where the
    /// proxies listen on this host, nothing else binds).
    async fn free_ports(&self) -> Result<(u16, u16), ProvisionError> {
        let all = self
            .client
            .instances()
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        let taken: std::collections::BTreeSet<u16> = all
            .iter()
            .flat_map(|i| [label_num(i, SSH_PORT), label_num(i, APP_PORT)])
            .flatten()
            .collect();
        let local = match self.set.listen {
            Listen::At(ip) if ip.is_loopback() => Some(ip),
            _ => None,
        };
        let mut free = (self.set.ports.0..=self.set.ports.1).filter(|p| {
            !taken.contains(p)
                && local.is_none_or(|ip| std::net::TcpListener::bind((ip, *p)).is_ok())
        });
        match (free.next(), free.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(failed(
                Stage::Disk,
                format!(
                    "no free ports left in incus.ports {}-{}; widen the range",
                    self.set.ports.0, self.set.ports.1
                ),
            )),
        }
    }

    /// Writes the guest's config files (Kennel's KENNELCFG contract) into
    /// the instance; the keys into `dev`'s account too when it runs.
    async fn push_config(
        &self,
        name: &str,
        (uid, gid): (u32, u32),
        user_keys: &[String],
        running: bool,
        devcontainer: Vec<(&'static str, String)>,
    ) -> Result<(), IncusError> {
        let root = (0, 0, 0o600);
        let project_pub =
            std::fs::read_to_string(self.host.project_key(name).with_extension("pub"))
                .unwrap_or_default();
        let mut keys = user_keys.join("\n");
        keys.push('\n');
        keys.push_str(project_pub.trim());
        keys.push('\n');
        if running {
            self.client
                .push_file(
                    name,
                    "/home/dev/.ssh/authorized_keys",
                    keys.clone().into_bytes(),
                    (uid, gid, 0o600),
                )
                .await?;
        }
        let host_key = self.host.key_dir(name).join("ssh_host_ed25519_key");
        let mut files = vec![
            (
                "env",
                spec::guest_env(name, uid, gid, self.host.s.online).into_bytes(),
            ),
            ("authorized_keys", keys.into_bytes()),
        ];
        if let (Ok(k), Ok(p)) = (
            std::fs::read(&host_key),
            std::fs::read(host_key.with_extension("pub")),
        ) {
            files.push(("ssh_host_ed25519_key", k));
            files.push(("ssh_host_ed25519_key.pub", p));
        }
        files.extend(devcontainer.into_iter().map(|(f, t)| (f, t.into_bytes())));
        // What was written last is remembered beside the project's keys:
        // a start with nothing changed writes nothing (5 API calls less).
        let digest = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for (file, content) in &files {
                h.update(file.as_bytes());
                h.update((content.len() as u64).to_le_bytes());
                h.update(content);
            }
            hex::encode(h.finalize())
        };
        let written = self.host.key_dir(name).join("incus-config.sha256");
        if std::fs::read_to_string(&written).is_ok_and(|d| d.trim() == digest) {
            return Ok(());
        }
        self.client
            .push_dir(name, spec::CONFIG_DIR, (0, 0, 0o700))
            .await?;
        for (file, content) in files {
            self.client
                .push_file(name, &format!("{}/{file}", spec::CONFIG_DIR), content, root)
                .await?;
        }
        if let Err(e) = std::fs::write(&written, format!("{digest}\n")) {
            tracing::warn!(project = name, error = %e, "cannot remember the guest config written");
        }
        Ok(())
    }

    /// The guest config files for the devcontainer.json of instance `i`'s
    /// source on Kennel's host (with a volume: the tree it started from).
    fn devcontainer_of(&self, i: &Instance) -> Vec<(&'static str, String)> {
        self.host.devcontainer_files(
            Path::new(label(i, SOURCE).unwrap_or_default()),
            label(i, STACK).unwrap_or_default(),
        )
    }

    /// The uid and gid the guest's `dev` has (the source owner's).
    fn owner(&self, i: &Instance) -> (u32, u32) {
        let (uid, gid) = self.host.s.default_owner;
        (
            label_num(i, UID).unwrap_or(uid),
            label_num(i, GID).unwrap_or(gid),
        )
    }

    /// The user keys the guest was last given (its config's
    /// `authorized_keys` without the project key).
    async fn user_keys_in(&self, name: &str) -> Vec<String> {
        let project = std::fs::read_to_string(self.host.project_key(name).with_extension("pub"))
            .unwrap_or_default();
        let path = format!("{}/authorized_keys", spec::CONFIG_DIR);
        match self.client.pull_file(name, &path).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && *l != project.trim())
                .map(str::to_owned)
                .collect(),
            Err(e) => {
                tracing::warn!(project = name, error = %e, "cannot read the guest's keys");
                Vec::new()
            }
        }
    }

    /// Starts `name` and waits for its sshd behind the proxy.
    async fn boot(
        &self,
        i: &Instance,
        progress: &dyn ProgressSink,
    ) -> Result<VmStatus, ProvisionError> {
        let name = i.name.as_str();
        step(
            progress,
            Stage::Booting,
            Some(format!("starting {name} on Incus")),
        );
        match self
            .client
            .change_state(name, StateAction::Start, false, Duration::ZERO)
            .await
        {
            Ok(()) | Err(IncusError::AlreadyRunning { .. }) => {}
            Err(e) => return Err(self.explain(name, Stage::Booting, e).await),
        }
        let (ssh, _) = self.addrs(i).await;
        let started = Instant::now();
        while !ssh_banner(&ssh, Duration::from_secs(2)).await {
            if started.elapsed() > self.host.s.boot_timeout {
                return Err(failed(
                    Stage::Ready,
                    format!(
                        "{name} started but its sshd did not answer at {ssh} within {} s; see `logs {name}`",
                        self.host.s.boot_timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        step(
            progress,
            Stage::Ready,
            Some(format!("sshd answers at {ssh}")),
        );
        self.status_of(i).await
    }

    async fn status_of(&self, i: &Instance) -> Result<VmStatus, ProvisionError> {
        let (ssh, app) = self.addrs(i).await;
        let mut problems = Vec::new();
        let state = match self.client.instance_state(&i.name).await {
            Ok(st) if st.running() => VmState::Running,
            Ok(st) if st.status.eq_ignore_ascii_case("frozen") => VmState::Paused,
            Ok(_) => VmState::Stopped,
            Err(e @ IncusError::MemberOffline { .. }) => {
                problems.push(e.to_string());
                VmState::Stopped
            }
            Err(e) => return Err(incus_failed(Stage::Ready, e)),
        };
        let ready = state == VmState::Running && ssh_banner(&ssh, Duration::from_secs(2)).await;
        Ok(VmStatus {
            state,
            ready,
            ssh_addr: Some(ssh),
            app_addr: Some(app),
            backend: self.backend(),
            problems,
        })
    }

    async fn instance(&self, name: &str) -> Result<Instance, ProvisionError> {
        match self.client.instance(name).await {
            Ok(Some(i)) => Ok(i),
            Ok(None) => Err(ProvisionError::NoVm(name.to_owned())),
            Err(e) => Err(self.explain(name, Stage::Booting, e).await),
        }
    }

    /// Waits (up to 30 s) for the member holding `name` to answer: one
    /// the cluster calls online again may still be starting (Incus says
    /// "Server isn't ready yet" then), while one that is offline is
    /// [`ProvisionError::HostOffline`] at once.
    async fn member_ready(&self, name: &str) -> Result<(), ProvisionError> {
        let started = Instant::now();
        loop {
            match self.client.instance_state(name).await {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.to_string().contains("isn't ready")
                        && started.elapsed() < Duration::from_secs(30) =>
                {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(self.explain(name, Stage::Booting, e).await),
            }
        }
    }

    /// The online member with the fewest of Kennel's instances, other
    /// than `not` (where `move` without a host and `evacuate` send one).
    async fn least_busy(&self, not: &str) -> Result<String, ProvisionError> {
        let members = self
            .client
            .members()
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        let all = self
            .client
            .instances()
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        members
            .into_iter()
            .filter(|m| m.online() && m.server_name != not)
            .min_by_key(|m| {
                all.iter()
                    .filter(|i| label(i, STACK).is_some() && i.location == m.server_name)
                    .count()
            })
            .map(|m| m.server_name)
            .ok_or_else(|| {
                failed(
                    Stage::Disk,
                    format!("no other online host to move to (besides {not}); see 'hosts'"),
                )
            })
    }

    async fn create_instance(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let name = req.project.as_str();
        let super::create::Resolved {
            source,
            mut notes,
            stack,
            app_port,
            template,
            ..
        } = self.host.resolve(req, progress).await?;
        step(progress, Stage::Stack, Some(stack.clone()));
        let (_kernel, image) = self.host.image_for(&stack, progress).await?;
        let work = self.host.s.data_dir.join("tmp");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut say = move |s: &str| {
            let _ = tx.send(s.to_owned());
        };
        let import = incus_image::ensure(
            &self.client,
            self.host.runner.clone(),
            &image,
            &work,
            &mut say,
        );
        tokio::pin!(import);
        let fingerprint = loop {
            tokio::select! {
                r = &mut import => break r.map_err(|e| ProvisionError::Image(Box::new(e)))?,
                Some(m) = rx.recv() => step(progress, Stage::Image, Some(m)),
            }
        };
        let (kd, label_text) = (self.host.key_dir(name), format!("kennel-{name}"));
        let kd2 = kd.clone();
        self.host
            .blocking(Stage::Disk, move |runner| {
                new_keypairs(runner, &kd2, &kd2, &label_text)
            })
            .await?;
        let (uid, gid) = owner_of(&source, self.host.s.default_owner);
        if uid == 0 {
            notes.push(format!(
                "{} belongs to root; files the project creates there will belong to uid {}",
                source.display(),
                self.host.s.default_owner.0
            ));
        }
        let (uid, gid) = if uid == 0 {
            self.host.s.default_owner
        } else {
            (uid, gid)
        };
        let (ssh_port, host_app_port) = self.free_ports().await?;
        let in_volume = self.volumes().await?;
        let labels = BTreeMap::from([
            (STACK.to_owned(), stack.clone()),
            (SOURCE.to_owned(), source.display().to_string()),
            (IMAGE.to_owned(), image.id.clone()),
            (UID.to_owned(), uid.to_string()),
            (GID.to_owned(), gid.to_string()),
            (SSH_PORT.to_owned(), ssh_port.to_string()),
            (APP_PORT.to_owned(), host_app_port.to_string()),
            (GUEST_APP_PORT.to_owned(), app_port.to_string()),
        ]);
        let post = spec::instance_post(
            &self.set.placement,
            &ProjectInstance {
                name: name.to_owned(),
                image: fingerprint,
                vcpus: req.resources.vcpus,
                memory_mib: req.resources.memory_mib,
                disk_gib: req.resources.disk_mib.div_ceil(1024),
                workspace: if in_volume {
                    Workspace::Later
                } else {
                    Workspace::HostPath(source.display().to_string())
                },
                // Member: set to the member's address once Incus placed it.
                listen: match self.set.listen {
                    Listen::At(ip) => ip,
                    Listen::Member => IpAddr::from([0, 0, 0, 0]),
                },
                ssh_port,
                app_port: host_app_port,
                guest_app_port: app_port,
                guest_ip: None,
                labels,
            },
        );
        step(
            progress,
            Stage::Disk,
            Some(format!(
                "an Incus {} from {}",
                self.set.placement.instance_type, image.id
            )),
        );
        self.client
            .create_instance(&post, req.host.as_deref(), Duration::from_secs(600))
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        if self.set.listen == Listen::Member {
            let member = self.client.location(name).await.unwrap_or_default();
            let ip = self.listen_ip(&member).await;
            self.retarget(name, Some(ip), None)
                .await
                .map_err(|e| incus_failed(Stage::Disk, e))?;
        }
        if in_volume {
            let volume = self.attach_new_volume(name).await?;
            notes.push(format!(
                "the source lives in storage volume {volume} (pool {}) beside the instance; {} is the tree it started from",
                self.set.placement.storage_pool,
                source.display()
            ));
        }
        // The devcontainer.json's steps run on the first boot, on the
        // source: with a volume, that is the boot after it was filled.
        let devcontainer = self.host.devcontainer_files(&source, &stack);
        let first = if in_volume {
            Vec::new()
        } else {
            devcontainer.clone()
        };
        self.push_config(name, (uid, gid), &req.authorized_keys, false, first)
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        let i = self.instance(name).await?;
        let mut status = self.boot(&i, progress).await?;
        let (ssh, _) = self.addrs(&i).await;
        if in_volume {
            self.fill_volume(name, &ssh, &source, progress).await?;
            if !devcontainer.is_empty() {
                self.client
                    .change_state(name, StateAction::Stop, false, self.host.s.stop_timeout)
                    .await
                    .map_err(|e| incus_failed(Stage::Ready, e))?;
                self.push_config(
                    name,
                    (uid, gid),
                    &req.authorized_keys,
                    false,
                    devcontainer.clone(),
                )
                .await
                .map_err(|e| incus_failed(Stage::Ready, e))?;
                status = self.boot(&i, progress).await?;
            }
        }
        if devcontainer
            .iter()
            .any(|(f, _)| *f == "devcontainer-create.sh")
        {
            step(
                progress,
                Stage::Ready,
                Some("running the devcontainer.json's postCreateCommand".into()),
            );
            let dir = self.host.key_dir(name);
            notes.push(
                super::boot::wait_post_create_by(|command| {
                    let (dir, ssh) = (&dir, &ssh);
                    async move { self.host.ssh_exec_at(dir, name, ssh, &command).await }
                })
                .await,
            );
        }
        if let Some(cmd) = template.as_ref().and_then(|t| t.file.post_create.clone()) {
            step(
                progress,
                Stage::Ready,
                Some("running the template's post-create command".into()),
            );
            let (ssh, _) = self.addrs(&i).await;
            let out = self
                .host
                .ssh_exec_at(
                    &self.host.key_dir(name),
                    name,
                    &ssh,
                    &format!("cd /workspace && {cmd}"),
                )
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
            app_port: (app_port != req.app_port).then_some(app_port),
        })
    }

    /// Where checkpoint `label`'s copy of the source is kept (beside the
    /// project's keys, on Kennel's host).
    fn kept(&self, name: &str, label: &str) -> PathBuf {
        self.host.key_dir(name).join("checkpoints").join(label)
    }

    /// The project's source on Kennel's host, checked as every use of it
    /// is (no links on the way).
    fn source_of(&self, i: &Instance) -> Result<PathBuf, ProvisionError> {
        let source = PathBuf::from(label(i, SOURCE).unwrap_or_default());
        self.host.check_source(&source, Stage::Disk)?;
        Ok(source)
    }

    async fn checkpoint_inner(
        &self,
        name: &str,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<CheckpointTaken, ProvisionError> {
        checkpoint::check_label(label)?;
        let _g = self.host.lock(name).await;
        let i = self.instance(name).await?;
        let volume = volume_of(&i).map(str::to_owned);
        let source = match volume {
            Some(_) => None,
            None => Some(self.source_of(&i)?),
        };
        let kept = self.kept(name, label);
        if kept.exists() {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!("{name} has a checkpoint '{label}' already"),
            });
        }
        let dir = kept.with_file_name(format!(".partial-{label}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        // A running instance is frozen for both parts, so the disk and
        // the source are of one moment.
        let running = i.running();
        if running {
            self.client
                .change_state(name, StateAction::Freeze, false, Duration::ZERO)
                .await
                .map_err(|e| incus_failed(Stage::Disk, e))?;
        }
        let frozen_at = Instant::now();
        let mut cost = CheckpointTaken::default();
        let made = async {
            let t = Instant::now();
            if let Some(source) = &source {
                step(
                    progress,
                    Stage::Disk,
                    Some(format!("checkpoint {label}: copying the source")),
                );
                let (from, to) = (source.clone(), dir.join("source"));
                cost.reflinked = self
                    .host
                    .blocking(Stage::Disk, move |runner| {
                        checkpoint::copy_tree(runner, &from, &to)
                    })
                    .await?;
            }
            if let Some(v) = &volume {
                step(
                    progress,
                    Stage::Disk,
                    Some(format!(
                        "checkpoint {label}: an Incus snapshot of the source volume"
                    )),
                );
                self.volume_snapshot(&i, v, &snapshot(label), false).await?;
            }
            cost.source_ms = ms(t);
            step(
                progress,
                Stage::Disk,
                Some(format!("checkpoint {label}: an Incus snapshot of the disk")),
            );
            let t = Instant::now();
            if let Err(e) = self
                .client
                .create_snapshot(name, &snapshot(label), Duration::from_secs(1800))
                .await
            {
                if let Some(v) = &volume {
                    let _ = self.delete_volume_snapshot(&i, v, &snapshot(label)).await;
                }
                return Err(incus_failed(Stage::Disk, e));
            }
            cost.disk_ms = ms(t);
            std::fs::rename(&dir, &kept).map_err(|e| failed(Stage::Disk, e.to_string()))
        }
        .await;
        if running {
            if let Err(e) = self
                .client
                .change_state(name, StateAction::Unfreeze, false, Duration::ZERO)
                .await
            {
                tracing::error!(project = name, error = %e, "could not unfreeze the instance after a checkpoint");
            }
            cost.paused_ms = ms(frozen_at);
        }
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let (bytes, files) = checkpoint::tree_size(&kept.join("source"));
        cost.source_bytes = bytes;
        cost.source_files = files;
        cost.git_head = checkpoint::git_head(&kept.join("source"));
        Ok(cost)
    }

    async fn rollback_inner(
        &self,
        name: &str,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<(), ProvisionError> {
        checkpoint::check_label(label)?;
        let _g = self.host.lock(name).await;
        let i = self.instance(name).await?;
        if i.running() {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!("{name} runs; stop it before rolling back"),
            });
        }
        let kept = self.kept(name, label);
        let volume = volume_of(&i).map(str::to_owned);
        if !kept.join("source").is_dir() && (volume.is_none() || !kept.is_dir()) {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!("the files of checkpoint '{label}' of {name} are missing"),
            });
        }
        if let Some(v) = volume {
            step(
                progress,
                Stage::Disk,
                Some(format!(
                    "rollback to {label}: the disk and the source volume (Incus snapshots)"
                )),
            );
            self.client
                .restore_snapshot(name, &snapshot(label), Duration::from_secs(1800))
                .await
                .map_err(|e| incus_failed(Stage::Disk, e))?;
            self.after_restore(&i).await?;
            return self.volume_snapshot(&i, &v, &snapshot(label), true).await;
        }
        let source = self.source_of(&i)?;
        step(
            progress,
            Stage::Disk,
            Some(format!("rollback to {label}: copying the source back")),
        );
        let staging = checkpoint::sibling(&source, "kennel-rollback")?;
        let (from, to) = (kept.join("source"), staging.clone());
        self.host
            .blocking(Stage::Disk, move |runner| {
                let _ = std::fs::remove_dir_all(&to);
                checkpoint::copy_tree(runner, &from, &to).map(drop)
            })
            .await?;
        step(
            progress,
            Stage::Disk,
            Some(format!("rollback to {label}: the disk (Incus snapshot)")),
        );
        // The disk first: a failure there leaves the source untouched.
        if let Err(e) = self
            .client
            .restore_snapshot(name, &snapshot(label), Duration::from_secs(1800))
            .await
        {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(incus_failed(Stage::Disk, e));
        }
        self.after_restore(&i).await?;
        let replaced = checkpoint::sibling(&source, "kennel-replaced")?;
        self.host
            .blocking(Stage::Disk, move |_| {
                let _ = std::fs::remove_dir_all(&replaced);
                std::fs::rename(&source, &replaced).map_err(|e| e.to_string())?;
                std::fs::rename(&staging, &source).map_err(|e| e.to_string())?;
                std::fs::remove_dir_all(&replaced).map_err(|e| e.to_string())
            })
            .await
    }

    /// `cp`: a copy of `from`'s instance (as at checkpoint `label`, or
    /// now: a running one is frozen meanwhile, so its disk and source
    /// are of one moment) with its own keys, ports and source copy.
    async fn copy_inner(
        &self,
        from: &str,
        label: Option<&str>,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let src = self.instance(from).await?;
        let in_volume = volume_of(&src).is_some();
        let from_source = match label {
            // A volume's copy comes from Incus (its snapshot, or itself).
            Some(l) if in_volume => {
                checkpoint::check_label(l)?;
                if !self.kept(from, l).is_dir() {
                    return Err(ProvisionError::Invalid {
                        stage: Stage::Validated,
                        message: format!("{from} has no checkpoint '{l}'"),
                    });
                }
                PathBuf::new()
            }
            None if in_volume => PathBuf::new(),
            Some(l) => {
                checkpoint::check_label(l)?;
                let kept = self.kept(from, l).join("source");
                if !kept.is_dir() {
                    return Err(ProvisionError::Invalid {
                        stage: Stage::Validated,
                        message: format!("the files of checkpoint '{l}' of {from} are missing"),
                    });
                }
                kept
            }
            None => self.source_of(&src)?,
        };
        let name = to.project.as_str();
        let dest = self.host.copy_destination(to)?;
        if in_volume {
            self.no_volume_left(name).await?;
        }
        let _g = self.host.lock(name).await;
        // Until the copy is a project, a restart removes its source.
        let marker = self.host.pending_source(name);
        crate::source::Pending {
            path: dest.clone(),
            whole: true,
        }
        .record(&marker)
        .map_err(|e| {
            failed(
                Stage::Disk,
                format!("cannot write {}: {e}", marker.display()),
            )
        })?;
        let result = self
            .copy_instance(&src, label, &from_source, &dest, to, progress)
            .await;
        if result.is_err() {
            if let Err(e) = self.remove(name).await {
                tracing::warn!(project = name, error = %e, "could not remove a failed copy's instance");
            }
            let _ = std::fs::remove_dir_all(self.host.key_dir(name));
            // The copied source is this attempt's own; the original is untouched.
            let _ = std::fs::remove_dir_all(&dest);
            if in_volume {
                if let Err(e) = self.delete_volume_of(name).await {
                    tracing::warn!(project = name, error = %e, "could not remove a failed copy's volume");
                }
            }
        }
        crate::source::Pending::clear(&marker);
        result
    }

    async fn copy_instance(
        &self,
        src: &Instance,
        at: Option<&str>,
        from_source: &Path,
        dest: &Path,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let (from, name) = (src.name.as_str(), to.project.as_str());
        let freeze = at.is_none() && src.running();
        if freeze {
            self.client
                .change_state(from, StateAction::Freeze, false, Duration::ZERO)
                .await
                .map_err(|e| incus_failed(Stage::Disk, e))?;
        }
        step(
            progress,
            Stage::Disk,
            Some(format!("a copy of {from}'s disk (Incus) and source")),
        );
        let (ssh_port, app_port) = self.free_ports().await?;
        let guest_app_port = label_num(src, GUEST_APP_PORT).unwrap_or(to.app_port);
        let (uid, gid) = self.owner(src);
        let mut labels: BTreeMap<String, String> = src
            .config
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("user.kennel.")?.to_owned(), v.clone())))
            .filter(|(k, _)| k != EVACUATED_FROM)
            .collect();
        labels.insert(SOURCE.to_owned(), dest.display().to_string());
        let src_volume = volume_of(src).map(str::to_owned);
        let workspace = match &src_volume {
            Some(_) => {
                let v = volume::volume_name(name);
                labels.insert(VOLUME.to_owned(), v.clone());
                Workspace::Volume(v)
            }
            None => Workspace::HostPath(dest.display().to_string()),
        };
        labels.insert(SSH_PORT.to_owned(), ssh_port.to_string());
        labels.insert(APP_PORT.to_owned(), app_port.to_string());
        let mut post = spec::instance_post(
            &self.set.placement,
            &ProjectInstance {
                name: name.to_owned(),
                image: String::new(),
                vcpus: to.resources.vcpus,
                memory_mib: to.resources.memory_mib,
                disk_gib: to.resources.disk_mib.div_ceil(1024),
                workspace,
                listen: match self.set.listen {
                    Listen::At(ip) => ip,
                    Listen::Member => self.listen_ip(&src.location).await,
                },
                ssh_port,
                app_port,
                guest_app_port,
                guest_ip: None,
                labels,
            },
        );
        post.source = crate::incus::api::InstanceSource::copy_of(&match at {
            Some(l) => format!("{from}/{}", snapshot(l)),
            None => from.to_owned(),
        });
        let (f, d) = (from_source.to_path_buf(), dest.to_path_buf());
        let copied = async {
            match &src_volume {
                Some(v) => {
                    self.copy_volume(src, v, at.map(snapshot).as_deref(), name)
                        .await?;
                }
                None => {
                    self.host
                        .blocking(Stage::Disk, move |runner| {
                            checkpoint::copy_tree(runner, &f, &d).map(drop)
                        })
                        .await?;
                }
            }
            // On the source's member: a copy on a member's own pool is
            // made there (a move can take it elsewhere).
            let target = (!src.location.is_empty() && src.location != "none")
                .then_some(src.location.as_str());
            self.client
                .create_instance(&post, target, Duration::from_secs(1800))
                .await
                .map_err(|e| incus_failed(Stage::Disk, e))
        }
        .await;
        if freeze {
            if let Err(e) = self
                .client
                .change_state(from, StateAction::Unfreeze, false, Duration::ZERO)
                .await
            {
                tracing::error!(project = from, error = %e, "could not unfreeze the instance after copying it");
            }
        }
        copied?;
        let (kd, key_label) = (self.host.key_dir(name), format!("kennel-{name}"));
        let kd2 = kd.clone();
        self.host
            .blocking(Stage::Disk, move |runner| {
                new_keypairs(runner, &kd2, &kd2, &key_label)
            })
            .await?;
        self.push_config(
            name,
            (uid, gid),
            &to.authorized_keys,
            false,
            self.devcontainer_of(src),
        )
        .await
        .map_err(|e| incus_failed(Stage::Disk, e))?;
        let i = self.instance(name).await?;
        let status = self.boot(&i, progress).await?;
        Ok(Created {
            stack: label(&i, STACK).unwrap_or_default().to_owned(),
            source_path: dest.display().to_string(),
            notes: vec![match at {
                Some(l) => format!("a copy of {from} as at checkpoint {l}"),
                None => format!("a copy of {from}"),
            }],
            status,
            app_port: None,
        })
    }

    /// Stops and deletes instance `name` (nothing when it is gone).
    async fn remove(&self, name: &str) -> Result<(), IncusError> {
        match self
            .client
            .change_state(name, StateAction::Stop, true, Duration::from_secs(30))
            .await
        {
            Ok(()) | Err(IncusError::NotRunning { .. } | IncusError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        match self
            .client
            .delete_instance(name, Duration::from_secs(300))
            .await
        {
            Ok(()) | Err(IncusError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Provisioner for IncusProvisioner {
    fn guest_aes(&self) -> bool {
        // Containers run on the host's CPU; Incus's VMs on KVM with it.
        crate::select::host_aes()
    }

    fn backend(&self) -> String {
        match self.set.placement.instance_type {
            InstanceType::Container => "incus-container".into(),
            InstanceType::VirtualMachine => "incus-vm".into(),
        }
    }

    async fn create(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let name = req.project.as_str();
        let _g = self.host.lock(name).await;
        if matches!(self.client.instance(name).await, Ok(Some(_))) {
            return Err(failed(
                Stage::Disk,
                format!("{name} already has an Incus instance; remove it first"),
            ));
        }
        let in_volume = self.volumes().await?;
        if in_volume {
            self.no_volume_left(name).await?;
        }
        let r = self.create_instance(req, progress).await;
        if r.is_err() {
            // Everything but the source goes (on Kennel's host: a source
            // volume is this attempt's own copy of it).
            if let Err(e) = self.remove(name).await {
                tracing::warn!(project = name, error = %e, "could not remove a failed create's instance");
            }
            if in_volume {
                if let Err(e) = self.delete_volume_of(name).await {
                    tracing::warn!(project = name, error = %e, "could not remove a failed create's volume");
                }
            }
            let _ = std::fs::remove_dir_all(self.host.key_dir(name));
        }
        r
    }

    async fn start(
        &self,
        spec: &VmSpec,
        progress: &dyn ProgressSink,
    ) -> Result<VmStatus, ProvisionError> {
        let name = spec.project.as_str();
        let _g = self.host.lock(name).await;
        self.member_ready(name).await?;
        let i = self.instance(name).await?;
        let owner = self.owner(&i);
        let running = i.running();
        if let Err(e) = self
            .push_config(
                name,
                owner,
                &spec.authorized_keys,
                running,
                self.devcontainer_of(&i),
            )
            .await
        {
            // An offline member: say so at once instead of hanging.
            let e = self.explain(name, Stage::Booting, e).await;
            if let ProvisionError::HostOffline { .. } = e {
                return Err(e);
            }
            tracing::warn!(project = name, error = %e, "could not refresh the guest's keys");
        }
        self.boot(&i, progress).await
    }

    async fn stop(&self, project: &ProjectName) -> Result<(), ProvisionError> {
        let name = project.as_str();
        let _g = self.host.lock(name).await;
        let clean = self
            .client
            .change_state(name, StateAction::Stop, false, self.host.s.stop_timeout)
            .await;
        match clean {
            Ok(()) | Err(IncusError::NotRunning { .. }) => Ok(()),
            Err(IncusError::NotFound { .. }) => Err(ProvisionError::NoVm(name.to_owned())),
            Err(e @ IncusError::MemberOffline { .. }) => {
                Err(self.explain(name, Stage::Stopping, e).await)
            }
            Err(e) => {
                tracing::warn!(project = name, error = %e, "clean stop failed; forcing");
                match self
                    .client
                    .change_state(name, StateAction::Stop, true, Duration::from_secs(30))
                    .await
                {
                    Ok(()) | Err(IncusError::NotRunning { .. }) => Ok(()),
                    Err(e) => Err(incus_failed(Stage::Stopping, e)),
                }
            }
        }
    }

    async fn destroy(&self, project: &ProjectName) -> Result<(), ProvisionError> {
        let name = project.as_str();
        let _g = self.host.lock(name).await;
        self.remove(name)
            .await
            .map_err(|e| incus_failed(Stage::Destroying, e))?;
        let _ = std::fs::remove_dir_all(self.host.key_dir(name));
        Ok(())
    }

    async fn status(&self, project: &ProjectName) -> Result<VmStatus, ProvisionError> {
        match self.client.instance(project.as_str()).await {
            Ok(Some(i)) => self.status_of(&i).await,
            Err(e) if !e.is_not_found() => {
                match self.explain(project.as_str(), Stage::Ready, e).await {
                    ProvisionError::HostOffline { host, .. } => Ok(VmStatus {
                        state: VmState::Stopped,
                        ready: false,
                        ssh_addr: None,
                        app_addr: None,
                        backend: self.backend(),
                        problems: vec![format!("host {host} is offline")],
                    }),
                    e => Err(e),
                }
            }
            Ok(None) => Ok(VmStatus {
                state: VmState::Missing,
                ready: false,
                ssh_addr: None,
                app_addr: None,
                backend: self.backend(),
                problems: Vec::new(),
            }),
            Err(e) => Err(incus_failed(Stage::Ready, e)),
        }
    }

    async fn logs(&self, project: &ProjectName, lines: u32) -> Result<Vec<String>, ProvisionError> {
        let log = self
            .client
            .console_log(project.as_str())
            .await
            .map_err(|e| incus_failed(Stage::Ready, e))?;
        let all: Vec<String> = log.lines().map(str::to_owned).collect();
        let skip = all
            .len()
            .saturating_sub(usize::try_from(lines).unwrap_or(usize::MAX));
        Ok(all.into_iter().skip(skip).collect())
    }

    async fn purge_source(&self, project: &ProjectName, path: &str) -> Result<(), ProvisionError> {
        self.delete_volume_of(project.as_str()).await?;
        self.host.purge_source(project, path).await
    }

    async fn source_elsewhere(&self, project: &ProjectName) -> Option<String> {
        let i = self.client.instance(project.as_str()).await.ok()??;
        volume_of(&i).map(|v| {
            format!(
                "storage volume {v} (pool {})",
                self.set.placement.storage_pool
            )
        })
    }

    async fn host_sources(&self) -> Result<(), String> {
        match self.volumes().await {
            Ok(false) => Ok(()),
            Ok(true) => Err(format!(
                "projects' sources live in storage volumes of pool {} on their Incus member (incus.workspace)",
                self.set.placement.storage_pool
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn cpu_time(&self, project: &ProjectName) -> Option<Duration> {
        let st = self.client.instance_state(project.as_str()).await.ok()?;
        let ns = u64::try_from(st.cpu?.usage).ok()?;
        Some(Duration::from_nanos(ns))
    }

    async fn vm_alive(&self, project: &ProjectName) -> Option<bool> {
        // From the events' picture while it is kept: gone is not running.
        if let Some(known) = self.running.lock().ok().and_then(|r| {
            r.as_ref()
                .map(|r| r.get(project.as_str()).copied().unwrap_or(Some(false)))
        }) {
            return known;
        }
        match self.client.instance_state(project.as_str()).await {
            Ok(st) => Some(st.running()),
            Err(IncusError::NotFound { .. }) => Some(false),
            Err(_) => None,
        }
    }

    async fn set_app_port(
        &self,
        project: &ProjectName,
        port: u16,
    ) -> Result<Option<String>, ProvisionError> {
        let name = project.as_str();
        let _g = self.host.lock(name).await;
        let i = self.instance(name).await?;
        self.client
            .update_instance(name, |inst| {
                if let Some(d) = inst.pointer_mut("/devices/kennel-app") {
                    // The same guest address (loopback, or a VM's own),
                    // another port.
                    let old = d["connect"].as_str().unwrap_or("tcp:127.0.0.1:0");
                    let host = old.rsplit_once(':').map_or("tcp:127.0.0.1", |(h, _)| h);
                    d["connect"] = serde_json::Value::String(format!("{host}:{port}"));
                }
                if let Some(c) = inst.get_mut("config") {
                    c[format!("user.kennel.{GUEST_APP_PORT}")] =
                        serde_json::Value::String(port.to_string());
                }
            })
            .await
            .map_err(|e| incus_failed(Stage::Ready, e))?;
        if !i.running() {
            return Ok(None);
        }
        Ok(Some(self.addrs(&i).await.1))
    }

    fn vm_keys(&self, project: &ProjectName) -> Option<VmKeys> {
        let dir = self.host.key_dir(project.as_str());
        let client_key = dir.join("id_ed25519");
        client_key.exists().then(|| VmKeys {
            host_key: std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub"))
                .ok()
                .map(|s| s.trim().to_owned()),
            client_key,
        })
    }

    async fn copy(
        &self,
        from: &ProjectName,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        self.copy_inner(from.as_str(), None, to, progress).await
    }

    async fn copy_checkpoint(
        &self,
        from: &ProjectName,
        label: &str,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        self.copy_inner(from.as_str(), Some(label), to, progress)
            .await
    }

    async fn rename(&self, from: &ProjectName, to: &ProjectName) -> Result<(), ProvisionError> {
        let (a, b) = (from.as_str(), to.as_str());
        let _g = self.host.lock(a).await;
        let i = self.instance(a).await?;
        let running = i.running();
        if running {
            self.client
                .change_state(a, StateAction::Stop, false, self.host.s.stop_timeout)
                .await
                .map_err(|e| incus_failed(Stage::Stopping, e))?;
        }
        self.client
            .rename_instance(a, b, Duration::from_secs(120))
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        let (old, new) = (self.host.key_dir(a), self.host.key_dir(b));
        if old.exists() {
            std::fs::rename(&old, &new).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        }
        // The guest's name is in its env: written anew (for its next boot
        // if it was stopped), the keys as they were.
        let i = self.instance(b).await?;
        // Its source volume takes the new name too (the old one is then
        // free for a new project).
        if let Some(v) = volume_of(&i).map(str::to_owned) {
            self.rename_volume(&i, &v, b).await?;
        }
        let owner = self.owner(&i);
        let keys = self.user_keys_in(b).await;
        self.push_config(b, owner, &keys, false, self.devcontainer_of(&i))
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        if running {
            self.boot(&i, &NoProgressSink).await?;
        }
        Ok(())
    }

    async fn deploy_key(
        &self,
        user: &kennel_core::names::UserName,
    ) -> Result<String, ProvisionError> {
        self.host.deploy_key(user).await
    }

    async fn rename_user(
        &self,
        from: &kennel_core::names::UserName,
        to: &kennel_core::names::UserName,
    ) -> Result<(), ProvisionError> {
        self.host.rename_user(from, to).await
    }

    async fn sync_keys(
        &self,
        project: &ProjectName,
        authorized_keys: &[String],
    ) -> Result<(), ProvisionError> {
        let name = project.as_str();
        let i = self.instance(name).await?;
        let owner = self.owner(&i);
        let running = i.running();
        self.push_config(
            name,
            owner,
            authorized_keys,
            running,
            self.devcontainer_of(&i),
        )
        .await
        .map_err(|e| incus_failed(Stage::Ready, e))
    }

    async fn checkpoint(
        &self,
        project: &ProjectName,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<CheckpointTaken, ProvisionError> {
        let span = tracing::info_span!("checkpoint", project = %project, label);
        tracing::Instrument::instrument(
            self.checkpoint_inner(project.as_str(), label, progress),
            span,
        )
        .await
    }

    async fn restore_checkpoint(
        &self,
        project: &ProjectName,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<(), ProvisionError> {
        let span = tracing::info_span!("rollback", project = %project, label);
        tracing::Instrument::instrument(
            self.rollback_inner(project.as_str(), label, progress),
            span,
        )
        .await
    }

    async fn remove_checkpoint(
        &self,
        project: &ProjectName,
        label: &str,
    ) -> Result<(), ProvisionError> {
        let name = project.as_str();
        checkpoint::check_label(label)?;
        let _g = self.host.lock(name).await;
        match self
            .client
            .delete_snapshot(name, &snapshot(label), Duration::from_secs(600))
            .await
        {
            Ok(()) | Err(IncusError::NotFound { .. }) => {}
            Err(e) => return Err(incus_failed(Stage::Disk, e)),
        }
        if let Ok(i) = self.instance(name).await {
            if let Some(v) = volume_of(&i) {
                self.delete_volume_snapshot(&i, v, &snapshot(label)).await?;
            }
        }
        let kept = self.kept(name, label);
        if kept.exists() {
            std::fs::remove_dir_all(&kept).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        }
        Ok(())
    }

    async fn resize(
        &self,
        project: &ProjectName,
        to: &kennel_core::model::Resources,
    ) -> Result<ResizedVm, ProvisionError> {
        let name = project.as_str();
        let _g = self.host.lock(name).await;
        let i = self.instance(name).await?;
        let running = i.running();
        self.client
            .update_instance(name, |inst| {
                if let Some(serde_json::Value::Object(c)) = inst.get_mut("config") {
                    c.insert("limits.cpu".into(), spec::limits_cpu(to.vcpus).into());
                    c.insert(
                        "limits.memory".into(),
                        spec::limits_memory(to.memory_mib).into(),
                    );
                }
                if let Some(d) = inst.pointer_mut("/devices/root") {
                    d["size"] = spec::disk_size(to.disk_mib.div_ceil(1024)).into();
                }
            })
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        // Incus applies all three to a running container at once; a VM
        // takes CPUs and a larger disk live, its memory at the next boot.
        let vm = self.set.placement.instance_type == InstanceType::VirtualMachine;
        Ok(ResizedVm {
            disk_now: running,
            cpus_now: running,
            memory_now: running && !vm,
        })
    }

    async fn hosts(&self) -> Result<Vec<HostInfo>, ProvisionError> {
        let unavailable = |e: IncusError| ProvisionError::Unavailable(e.to_string());
        let members = self.client.members().await.map_err(unavailable)?;
        if members.is_empty() {
            return Err(ProvisionError::Unsupported(format!(
                "Incus at {} is one server, not a cluster: every project runs on it",
                self.client.address()
            )));
        }
        let all = self.client.instances().await.map_err(unavailable)?;
        let mut hosts = Vec::with_capacity(members.len());
        for m in members {
            let sys = if m.online() {
                self.client
                    .member_sysinfo(&m.server_name)
                    .await
                    .ok()
                    .map(|st| st.sysinfo)
            } else {
                None
            };
            let mib = |b: u64| b / (1024 * 1024);
            hosts.push(HostInfo {
                projects: all
                    .iter()
                    .filter(|i| maybe_kennels(i) && i.location == m.server_name)
                    .map(|i| i.name.clone())
                    .collect(),
                status: m.status.to_ascii_lowercase(),
                message: m.message,
                load: sys.as_ref().and_then(|s| s.load_averages.first().copied()),
                memory_used_mib: sys
                    .as_ref()
                    .filter(|s| s.total_ram > 0)
                    .map(|s| mib(s.total_ram.saturating_sub(s.free_ram))),
                memory_total_mib: sys
                    .as_ref()
                    .filter(|s| s.total_ram > 0)
                    .map(|s| mib(s.total_ram)),
                name: m.server_name,
            });
        }
        Ok(hosts)
    }

    async fn placements(&self) -> Vec<VmPlace> {
        // One server: every project is on it (one request, not two).
        let members = match self.client.members().await {
            Ok(m) if m.is_empty() => return Vec::new(),
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read where projects are");
                return Vec::new();
            }
        };
        let all = match self.client.instances().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read where projects are");
                return Vec::new();
            }
        };
        all.iter()
            .filter(|i| maybe_kennels(i))
            .map(|i| VmPlace {
                project: i.name.clone(),
                host: i.location.clone(),
                // An evacuated member still answers.
                online: members.iter().any(|m| {
                    m.server_name == i.location && !m.status.eq_ignore_ascii_case("offline")
                }),
                evacuated_from: label(i, EVACUATED_FROM).map(str::to_owned),
            })
            .collect()
    }

    async fn move_vm(
        &self,
        project: &ProjectName,
        to: Option<&str>,
        evacuated_from: Option<&str>,
    ) -> Result<String, ProvisionError> {
        let name = project.as_str();
        let _g = self.host.lock(name).await;
        let i = self.instance(name).await?;
        if i.running() {
            return Err(failed(
                Stage::Disk,
                format!("{name} runs; stop it before it moves"),
            ));
        }
        let target = match to {
            Some(t) => t.to_owned(),
            None => self.least_busy(&i.location).await?,
        };
        // A source volume goes first (copied, with its snapshots), so the
        // instance finds it where it lands; the side it is not on then
        // loses its copy.
        let volume = volume_of(&i).map(str::to_owned);
        // A migration between members that Incus cuts off by its own
        // deadline (seen on a loaded host: "context deadline exceeded")
        // leaves the instance where it was: tried once more.
        for attempt in 1..=2 {
            if let Some(v) = &volume {
                self.volume_to(&i, v, &target).await?;
            }
            let moved = self
                .client
                .move_instance(name, &target, Duration::from_secs(1800))
                .await;
            if let Some(v) = &volume {
                let from = member_of(&i).unwrap_or_default();
                if let Err(e) = self.volume_moved(v, from, &target, moved.is_ok()).await {
                    tracing::warn!(project = name, volume = v, error = %e, "could not delete the copy of the source volume left behind");
                }
            }
            match moved {
                Ok(()) => break,
                Err(e)
                    if attempt == 1
                        && e.to_string().contains("deadline exceeded")
                        && self.client.location(name).await.as_deref() == member_of(&i) =>
                {
                    tracing::warn!(project = name, error = %e, "Incus cut the move off; trying once more");
                }
                Err(e) => return Err(incus_failed(Stage::Disk, e)),
            }
        }
        let ip = match self.set.listen {
            Listen::Member => Some(self.listen_ip(&target).await),
            Listen::At(_) => None,
        };
        self.retarget(name, ip, evacuated_from)
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        Ok(target)
    }

    async fn set_host_evacuated(&self, host: &str, evacuated: bool) -> Result<(), ProvisionError> {
        let action = if evacuated {
            MemberAction::Evacuate
        } else {
            MemberAction::Restore
        };
        self.client
            .member_state(host, action, Duration::from_secs(1800))
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))
    }
}

/// A sink for steps nobody waits on.
struct NoProgressSink;

impl ProgressSink for NoProgressSink {
    fn report(&self, _: Progress) {}
}
