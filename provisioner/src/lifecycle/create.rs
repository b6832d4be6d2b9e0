//! Creating a project's VM: the source, the stack, the image, the disk,
//! the first boot; on failure everything but the source is rolled back
//! (by the caller, [`LocalProvisioner`]'s `create`).

use super::*;

/// A new project resolved ([`LocalProvisioner::resolve`]).
pub(super) struct Resolved {
    pub source: PathBuf,
    pub template: Option<crate::templates::Template>,
    pub notes: Vec<String>,
    pub stack: String,
    pub app_port: u16,
    pub devcontainer: crate::devcontainer::Found,
    pub source_ms: u64,
}

impl LocalProvisioner {
    pub(super) async fn create_inner(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let name = req.project.as_str();
        let Resolved {
            source,
            template,
            mut notes,
            stack,
            app_port,
            devcontainer,
            source_ms,
        } = self.resolve(req, progress).await?;
        kennel_core::fault::point("stack");
        let mut timings = Timings {
            source_ms,
            ..Timings::default()
        };
        let (record, root_note) = self
            .new_machine(
                name,
                &stack,
                &source,
                req.resources,
                app_port,
                progress,
                &mut timings,
            )
            .await?;
        notes.extend(root_note);
        // Slots are per data directory but addresses per host: another
        // Kennel may have bound ours since we checked.
        let mut record = record;
        let status = self
            .boot_in_a_free_slot(&mut record, &req.authorized_keys, progress, &mut timings)
            .await?;
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
        for (stage, ms) in [
            ("source", timings.source_ms),
            ("image", timings.image_ms),
            ("disk", timings.disk_ms),
            ("spawn", timings.spawn_ms),
            ("boot", timings.boot_ms),
            ("sshd", timings.sshd_ms),
        ] {
            #[allow(clippy::cast_precision_loss)] // milliseconds of one create
            metrics::histogram!("kennel_new_project_stage_seconds", "stage" => stage)
                .record(ms as f64 / 1000.0);
        }
        if devcontainer.parsed().is_some_and(|d| !d.create.is_empty()) {
            step(
                progress,
                Stage::Ready,
                Some("running the devcontainer.json's postCreateCommand".into()),
            );
            notes.push(self.wait_post_create(&record).await);
        }
        Ok(Created {
            stack,
            source_path: source.display().to_string(),
            notes,
            status,
            app_port: (app_port != req.app_port).then_some(app_port),
        })
    }

    /// What a new project will be, before any VM: its source (cloned,
    /// made from a template or adopted), its stack (asked for or
    /// detected), its app port, its devcontainer.json, and the notes for
    /// the person who asked. Shared by every backend.
    pub(super) async fn resolve(
        &self,
        req: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Resolved, ProvisionError> {
        let source = PathBuf::from(
            req.path
                .clone()
                .ok_or_else(|| failed(Stage::Validated, "no source path was given"))?,
        );
        let templates = crate::templates::Templates::load(&self.s.templates_dir);
        let template = match &req.template {
            Some(t) => Some(
                templates
                    .get(t)
                    .cloned()
                    .ok_or_else(|| ProvisionError::Invalid {
                        stage: Stage::Validated,
                        message: format!("there is no template '{t}'; see 'templates'"),
                    })?,
            ),
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
        let stacks = Stacks::load(&self.s.stacks_dir);
        let stack = match &req.stack {
            Some(s) => s.clone(),
            None => {
                let d = stacks.detect(&source);
                notes.push(format!("stack {}", d.summary()));
                notes.extend(d.warnings.iter().cloned());
                d.stack
            }
        };
        let stack_file = stacks.get(&stack).map(|s| s.file.clone());
        notes.extend(crate::pins::differences(
            &crate::pins::find(&source),
            &stack,
            &stack_file
                .as_ref()
                .map(|f| f.versions.clone())
                .unwrap_or_default(),
        ));
        // The repository's devcontainer.json: its first forwarded port is
        // the app's; a detected stack brings its own default port.
        let devcontainer = crate::devcontainer::load(
            &source,
            &stack_file
                .as_ref()
                .map(|f| f.env.clone())
                .unwrap_or_default(),
        );
        notes.extend(devcontainer.notes(&stack));
        let app_port = devcontainer
            .app_port()
            .or_else(|| {
                req.stack
                    .is_none()
                    .then(|| stack_file.as_ref().map(|f| f.app_port))
                    .flatten()
            })
            .unwrap_or(req.app_port);
        step(progress, Stage::Stack, Some(stack.clone()));
        Ok(Resolved {
            source,
            template,
            notes,
            stack,
            app_port,
            devcontainer,
            source_ms,
        })
    }

    /// A new VM for `name` over `source`: the stack's image, a slot, the
    /// root disk and keys (a project key already there is kept), and its
    /// record (not saved yet). Everything it makes is rolled back by the
    /// caller on failure. Also returns a note when the source is root's.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn new_machine(
        &self,
        name: &str,
        stack: &str,
        source: &Path,
        resources: kennel_core::model::Resources,
        app_port: u16,
        progress: &dyn ProgressSink,
        timings: &mut Timings,
    ) -> Result<(VmRecord, Option<String>), ProvisionError> {
        let t = Instant::now();
        let (k, image) = self.image_for(stack, progress).await?;
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
        let slot = self.allocate_slot(name, app_port, &[]).await?;
        let m = self.machine(
            name,
            &k,
            resources.vcpus,
            resources.memory_mib,
            net::attach(&self.s.network, slot, app_port),
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
                resources.disk_mib, image.id
            )),
        );
        let (rootfs, disk_path, size) = (image.rootfs(), m.disk.clone(), resources.disk_mib);
        let (kd, vd, label) = (self.key_dir(name), dir.clone(), format!("kennel-{name}"));
        self.blocking(Stage::Disk, move |runner| {
            disk::create_root(runner, &rootfs, &disk_path, size).map_err(|e| e.to_string())?;
            new_keypairs(runner, &kd, &vd, &label)
        })
        .await?;
        kennel_core::fault::point("disk");
        timings.disk_ms = ms(t);
        let (uid, gid) = owner_of(source, self.s.default_owner);
        let note = (uid == 0).then(|| {
            format!(
                "{} belongs to root; files the VM creates there will belong to uid {}",
                source.display(),
                self.s.default_owner.0
            )
        });
        let (uid, gid) = if uid == 0 {
            self.s.default_owner
        } else {
            (uid, gid)
        };
        let record = VmRecord {
            project: name.to_owned(),
            backend: self.vmm.kind(),
            image: image.id.clone(),
            stack: stack.to_owned(),
            source: source.to_owned(),
            slot,
            uid,
            gid,
            app_port,
            machine: m,
        };
        Ok((record, note))
    }

    /// A project the store knows but whose VM is gone (a data directory
    /// restored from `kennel backup`, a lost `vms/`): a new VM from its
    /// stack over the same source, booted. The source is never touched.
    pub(super) async fn rebuild(
        &self,
        spec: &VmSpec,
        progress: &dyn ProgressSink,
    ) -> Result<VmStatus, ProvisionError> {
        let name = spec.project.as_str();
        let source = PathBuf::from(&spec.source_path);
        self.check_source(&source, Stage::Validated)?;
        if !source.is_dir() {
            return Err(failed(
                Stage::Validated,
                format!(
                    "{name} has no VM and its source {} is gone; restore the source there, or remove the project",
                    source.display()
                ),
            ));
        }
        tracing::info!(
            project = name,
            "no VM for this project; building one from its stack"
        );
        step(
            progress,
            Stage::Stack,
            Some(format!("{} (rebuilding the VM)", spec.stack)),
        );
        let mut timings = Timings::default();
        let built = match self
            .new_machine(
                name,
                &spec.stack,
                &source,
                spec.resources,
                spec.app_port,
                progress,
                &mut timings,
            )
            .await
        {
            Ok((mut record, _)) => {
                self.boot_in_a_free_slot(&mut record, &spec.authorized_keys, progress, &mut timings)
                    .await
            }
            Err(e) => Err(e),
        };
        if built.is_err() {
            let record = self.record(name);
            self.teardown(name, record.as_ref()).await;
        }
        built
    }

    /// Clones, creates or adopts the source, reporting clone progress.
    pub(super) async fn prepare_source(
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
        let guard = req.public_hosts_only.then(|| crate::netguard::NetGuard {
            allowed: self.s.git_allow_private_hosts.clone(),
        });
        let marker = self.pending_source(req.project.as_str());
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
                guard: guard.as_ref(),
                pending: Some(&marker),
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
                        .map_err(|e| source_failed(stage, e));
                }
            }
        }
    }
}

/// A source that could not be prepared: the user's to fix (a non-empty
/// directory, a refused URL, a path through a link) or the host's.
fn source_failed(stage: Stage, e: crate::source::SourceError) -> ProvisionError {
    if e.is_callers() {
        ProvisionError::Invalid {
            stage,
            message: e.to_string(),
        }
    } else {
        ProvisionError::Source {
            stage,
            source: Box::new(e),
        }
    }
}
