//! Making projects: new project (clone, template, adopt) and cp.

use std::path::{Path, PathBuf};

use super::{host_path_failed, Call, Executor};
use crate::command::{self, NewProjectArgs};
use crate::hostpath::{Beneath, HostPathError};
use crate::model::{Identity, Project, ProjectState, Resources, User};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::policy;
use crate::provision::{CreateRequest, Progress, ProgressSink, ProvisionError, Stage};
use crate::store::repo::{self, NewProjectRow};
use crate::store::StoreError;

impl Executor {
    /// `cp NAME NEW`: a new project from another's source and settings.
    pub(super) async fn cp(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        at: Option<&crate::command::SlugName>,
        new_name: &ProjectName,
    ) -> Outcome {
        let (who, progress) = (call.who, call.progress);
        call.project(name)?;
        let user = call.user()?.clone();
        // The copy reads the source VM's disk: no wake, stop or other copy
        // of it runs meanwhile, and nothing else makes the new name.
        let _vms = self.lock_vm_pair(name, new_name).await;
        let mut from = self.project_now(name).await?;
        // From a checkpoint: its shape and app port, not today's.
        if let Some(label) = at {
            let c = self.existing_checkpoint(name, label.as_str()).await?;
            from.resources = c.resources;
            from.app_port = c.app_port;
        }
        let root = Beneath::open(&self.settings.projects_root).map_err(host_path_failed)?;
        let rel = PathBuf::from(new_name.as_str());
        let source_path = root.join(&rel);
        match root.lookup(&rel) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(CommandError::Conflict(format!(
                    "{} already exists; remove it or pick another name",
                    source_path.display()
                )))
            }
            Err(e @ (HostPathError::Io { .. } | HostPathError::Root { .. })) => {
                return Err(host_path_failed(e))
            }
            Err(e) => return Err(CommandError::Refused(e.to_string())),
        }
        let source_path = source_path.to_string_lossy().into_owned();
        let reserved = self
            .reserve(
                &user,
                new_name,
                &from.stack,
                from.git_url.as_deref(),
                &source_path,
                from.template.as_deref(),
                from.resources,
                from.app_port,
            )
            .await?;
        let req = CreateRequest {
            project: new_name.clone(),
            owner: user.name.clone(),
            stack: Some(from.stack.clone()),
            git: None,
            path: Some(source_path),
            template: None,
            resources: from.resources,
            app_port: from.app_port,
            authorized_keys: self.authorized_keys(name).await?,
            adopt: false,
            git_token: None,
            author_name: user.name.to_string(),
            author_email: self.email_of(who, &user),
            public_hosts_only: false,
            host: None,
        };
        let result = match self.arm_egress(&reserved).await {
            Err(e) => Err(ProvisionError::Unsupported(e.to_string())),
            Ok(()) => match at {
                Some(label) => {
                    self.vms
                        .copy_checkpoint(name, label.as_str(), &req, progress)
                        .await
                }
                None => self.vms.copy(name, &req, progress).await,
            },
        };
        self.finish_create(reserved, result, progress).await
    }

    /// The e-mail address for commits made on `user`'s behalf.
    fn email_of(&self, who: &Identity, user: &User) -> String {
        let id = who.external_id.as_str();
        match (
            who.frontend,
            id.strip_prefix('@').and_then(|s| s.split_once(':')),
        ) {
            (crate::model::Frontend::Matrix, Some((local, server))) => format!("{local}@{server}"),
            _ => format!("{}@{}", user.name, self.settings.domain),
        }
    }

    /// Checks the quota and records a new project in state `creating`, in
    /// one write transaction, so two creates of one name cannot both win.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn reserve(
        &self,
        user: &User,
        name: &ProjectName,
        stack: &str,
        git: Option<&str>,
        source_path: &str,
        template: Option<&str>,
        resources: Resources,
        app_port: u16,
    ) -> Result<Project, CommandError> {
        let (uid, role) = (user.id, user.role);
        let (row_name, stack, git, sp, tmpl) = (
            name.clone(),
            stack.to_owned(),
            git.map(str::to_owned),
            source_path.to_owned(),
            template.map(str::to_owned),
        );
        self.store
            .write(move |tx| {
                let (quota, _) = repo::quota_of(tx, uid, role)?;
                let usage = repo::usage_of(tx, uid)?;
                if let Err(r) = policy::check_quota(&quota, &usage, &resources) {
                    return Ok(Err(CommandError::from(r)));
                }
                match repo::insert_project(
                    tx,
                    &NewProjectRow {
                        name: &row_name,
                        owner: uid,
                        stack: &stack,
                        git_url: git.as_deref(),
                        source_path: &sp,
                        template: tmpl.as_deref(),
                        resources,
                        app_port,
                        state: ProjectState::Creating,
                    },
                ) {
                    Ok(p) => Ok(Ok(p)),
                    Err(StoreError::AlreadyExists { .. }) => Ok(Err(CommandError::Conflict(
                        format!("a project named '{row_name}' already exists; pick another name"),
                    ))),
                    Err(e) => Err(e),
                }
            })
            .await?
    }

    /// Waits for a free build slot, telling the requester their place in
    /// line, and again each time the line moves.
    async fn queue(&self, progress: &dyn ProgressSink) -> tokio::sync::OwnedSemaphorePermit {
        if let Ok(p) = self.creates.clone().try_acquire_owned() {
            return p;
        }
        let ticket = self.line.join();
        let mut moved = self.line.moved.subscribe();
        let acquire = self.creates.clone().acquire_owned();
        tokio::pin!(acquire);
        let mut told = 0;
        loop {
            let place = self.line.place(ticket.0);
            if place != told {
                told = place;
                progress.report(Progress {
                    stage: Stage::Queued,
                    percent: None,
                    detail: Some(format!(
                        "{place} in line; {} project(s) build at once",
                        self.settings.max_parallel_creates
                    )),
                });
            }
            tokio::select! {
                permit = &mut acquire => {
                    drop(ticket);
                    // The semaphore is never closed.
                    #[allow(clippy::expect_used)]
                    return permit.expect("the create semaphore is never closed");
                }
                _ = moved.changed() => {}
            }
        }
    }

    /// Records the outcome of a create: the project runs, or its record goes.
    async fn finish_create(
        &self,
        reserved: Project,
        result: Result<crate::provision::Created, ProvisionError>,
        progress: &dyn ProgressSink,
    ) -> Outcome {
        let name = reserved.name.clone();
        match result {
            Ok(created) => {
                crate::fault::point("ready");
                self.record_route(&name, &created.status).await?;
                let (stack, src) = (created.stack.clone(), created.source_path.clone());
                let port = created.app_port.unwrap_or(reserved.app_port);
                let n = name.clone();
                let project = self
                    .store
                    .write(move |tx| {
                        tx.execute(
                            "UPDATE projects SET stack = ?2, source_path = ?3, app_port = ?4, state = 'running' WHERE name = ?1",
                            rusqlite::params![n.as_str(), stack, src, port],
                        )?;
                        repo::project_by_name(tx, &n)
                    })
                    .await?
                    .unwrap_or(reserved);
                progress.report(Progress {
                    stage: Stage::Ready,
                    percent: None,
                    detail: None,
                });
                Ok(Reply::Created {
                    connection: self.connection(&project),
                    project,
                    notes: created.notes,
                })
            }
            Err(e) => {
                self.store
                    .call(move |c| repo::delete_project(c, &name))
                    .await?;
                Err(e.into())
            }
        }
    }

    pub(super) async fn new_project(&self, call: &Call<'_>, args: NewProjectArgs) -> Outcome {
        let (who, progress) = (call.who, call.progress);
        let user = call.user()?.clone();
        if let Some(h) = &args.host {
            self.online_host(h).await?;
        }
        let d = self.settings.default_resources;
        let resources = Resources {
            vcpus: args.cpus.unwrap_or(d.vcpus),
            memory_mib: args.memory.map_or(d.memory_mib, |s| s.mib),
            disk_mib: args.disk.map_or(d.disk_mib, |s| s.mib),
        };
        // Template: must exist; gives the default stack; starts a new repo.
        let template = match &args.template {
            None => None,
            Some(t) => {
                if args.git.is_some() {
                    return Err(CommandError::Conflict(
                        "--template starts a new repository; it cannot be combined with --git"
                            .into(),
                    ));
                }
                let all = self.catalog.templates();
                match all.iter().find(|x| x.name == t.as_str()) {
                    Some(x) if x.broken.is_some() => {
                        return Err(CommandError::Conflict(format!(
                            "template {t} is broken: {}",
                            x.broken.clone().unwrap_or_default()
                        )))
                    }
                    Some(x) => Some(x.clone()),
                    None => {
                        let names: Vec<String> = all.into_iter().map(|x| x.name).collect();
                        return Err(CommandError::NotFound(format!(
                            "there is no template '{t}'; templates: {}",
                            if names.is_empty() {
                                "none installed".into()
                            } else {
                                names.join(", ")
                            }
                        )));
                    }
                }
            }
        };
        let stack = args
            .stack
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| template.as_ref().map(|t| t.stack.clone()));
        let known = self.catalog.stacks();
        let stack_info = match &stack {
            None => None,
            Some(stack) => match known.iter().find(|s| &s.name == stack) {
                Some(s) if s.broken.is_some() => {
                    return Err(CommandError::Conflict(format!(
                        "stack {stack} is broken: {}",
                        s.broken.clone().unwrap_or_default()
                    )))
                }
                Some(s) => Some(s.clone()),
                None => {
                    let names: Vec<String> = known.into_iter().map(|s| s.name).collect();
                    return Err(CommandError::NotFound(format!(
                        "there is no stack '{stack}'; known stacks: {}",
                        if names.is_empty() {
                            "none installed".into()
                        } else {
                            names.join(", ")
                        }
                    )));
                }
            },
        };
        let app_port = stack_info.map_or(self.settings.default_app_port, |s| s.app_port);
        let source_path = self.source_path(&args).await?;
        let sp = source_path.to_string_lossy().into_owned();
        let reserved = self
            .reserve(
                &user,
                &args.name,
                stack.as_deref().unwrap_or("detecting"),
                args.git.as_ref().map(|g| g.as_str()),
                &sp,
                args.template.as_ref().map(|t| t.as_str()),
                resources,
                app_port,
            )
            .await?;
        progress.report(Progress {
            stage: Stage::Validated,
            percent: None,
            detail: Some(format!(
                "{} into {sp}; stack {}; {} vCPU, {} MiB memory, {} GiB disk",
                args.git
                    .as_ref()
                    .map_or_else(|| "new repository".to_owned(), |g| format!("clone {g}")),
                stack.as_deref().unwrap_or("detected from the source"),
                resources.vcpus,
                resources.memory_mib,
                resources.disk_mib / 1024
            )),
        });
        crate::fault::point("validated");
        let _permit = self.queue(progress).await;
        let uid = user.id;
        let git_token = self
            .store
            .call(move |c| repo::secret(c, uid, "git-token"))
            .await?;
        let req = CreateRequest {
            project: args.name.clone(),
            owner: user.name.clone(),
            stack,
            git: args.git.map(|g| g.to_string()),
            path: Some(sp),
            template: args.template.map(|t| t.to_string()),
            resources,
            app_port,
            authorized_keys: self.authorized_keys(&args.name).await?,
            adopt: args.adopt,
            git_token,
            author_name: user.name.to_string(),
            author_email: self.email_of(who, &user),
            public_hosts_only: !call.is_admin(),
            host: args.host.map(|h| h.to_string()),
        };
        let result = match self.arm_egress(&reserved).await {
            Ok(()) => self.vms.create(&req, progress).await,
            Err(e) => Err(ProvisionError::Unsupported(e.to_string())),
        };
        self.finish_create(reserved, result, progress).await
    }

    /// Where a new project's source goes: `--path` (relative paths are
    /// under the projects root) or `<root>/<name>`. It must be inside the
    /// root, reached without following any link (a guest writes links into
    /// its source, which is on the host), neither inside nor around
    /// another project's source (whose guest could swap a link in later),
    /// and an existing non-empty directory needs `--adopt`.
    async fn source_path(&self, args: &command::NewProjectArgs) -> Result<PathBuf, CommandError> {
        let name = args.name.clone();
        let projects = self
            .store
            .call(move |c| {
                Ok((
                    repo::project_by_name(c, &name)?.is_some(),
                    repo::list_projects(c, None)?,
                ))
            })
            .await?;
        if projects.0 {
            return Err(CommandError::Conflict(format!(
                "a project named '{}' already exists; pick another name, or see 'status {}'",
                args.name, args.name
            )));
        }
        if args.path.is_some() || args.adopt {
            self.vms.host_sources().await.map_err(|why| {
                CommandError::Refused(format!(
                    "--path and --adopt share a directory of this host, and {why}; leave them out (the source comes from --git, a template or an empty start)"
                ))
            })?;
        }
        let root = Beneath::open(&self.settings.projects_root).map_err(host_path_failed)?;
        let rel = match &args.path {
            None => PathBuf::from(args.name.as_str()),
            Some(p) => root.relative(Path::new(p)).map_err(|e| match e {
                HostPathError::ParentDir(_) => CommandError::Refused("--path may not contain '..'".into()),
                _ => CommandError::Refused(format!(
                    "--path must be a directory inside {}; ask an operator to add another project root",
                    root.root().display()
                )),
            })?,
        };
        let p = root.join(&rel);
        for other in &projects.1 {
            let theirs = root
                .relative(Path::new(&other.source_path))
                .unwrap_or_else(|_| PathBuf::from(&other.source_path));
            if rel.starts_with(&theirs) || theirs.starts_with(&rel) {
                return Err(CommandError::Refused(format!(
                    "{} is {} the source of project '{}'; a project's source may not hold or be held by another's: pick another --path",
                    p.display(),
                    if rel.starts_with(&theirs) { "inside" } else { "around" },
                    other.name
                )));
            }
        }
        if args.adopt && args.git.is_some() {
            return Err(CommandError::Conflict(
                "--adopt uses an existing directory; it cannot also clone --git".into(),
            ));
        }
        let non_empty = root.check_dir(&rel).map_err(|e| match e {
            HostPathError::NotDir(p) => {
                CommandError::Conflict(format!("{} is not a directory", p.display()))
            }
            HostPathError::Io { .. } | HostPathError::Root { .. } => host_path_failed(e),
            e => CommandError::Refused(e.to_string()),
        })?;
        if non_empty && !args.adopt {
            return Err(CommandError::Conflict(format!(
                "{} exists and is not empty; pass --adopt to use it as this project's source, or pick another --path",
                p.display()
            )));
        }
        Ok(p)
    }

    /// Whether `rm --purge` may delete `path`: inside the projects root,
    /// reached without a link.
    pub(super) fn purgeable(&self, path: &str) -> Result<(), CommandError> {
        let root = Beneath::open(&self.settings.projects_root).map_err(host_path_failed)?;
        let refuse = |why: String| {
            CommandError::Refused(format!(
                "Kennel deletes only sources inside {} ({why}); nothing was changed. Remove the project without --purge, and delete {path} by hand if you mean it",
                root.root().display()
            ))
        };
        let rel = root
            .relative(Path::new(path))
            .map_err(|_| refuse(format!("{path} is not")))?;
        root.lookup(&rel).map_err(|e| refuse(e.to_string()))?;
        Ok(())
    }
}

/// The creates waiting for a build slot, by ticket (the semaphore admits
/// them in this order).
#[derive(Debug, Default)]
pub(crate) struct Line {
    next: std::sync::atomic::AtomicU64,
    waiting: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Bumped whenever someone leaves the line (admitted or gone).
    moved: tokio::sync::watch::Sender<u64>,
}

/// A place in the [`Line`], left when dropped.
struct Ticket<'a>(u64, &'a Line);

impl Line {
    fn join(&self) -> Ticket<'_> {
        let t = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.lock().insert(t);
        Ticket(t, self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// 1 for the first in line.
    fn place(&self, ticket: u64) -> usize {
        self.lock().range(..ticket).count() + 1
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.1.lock().remove(&self.0);
        self.1.moved.send_modify(|n| *n = n.wrapping_add(1));
    }
}
