//! Commands about one project or the list of them: projects, status, rm,
//! ssh, logs, port, rename, tag, untag.

use super::{Call, Executor};
use crate::command::SlugName;
use crate::model::{ProjectState, MAX_TAGS};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::provision::{Progress, ProvisionError, Stage};
use crate::store::repo;
use crate::store::StoreError;

impl Executor {
    /// The projects the user may see (all of them for admins).
    pub(super) async fn projects(&self, call: &Call<'_>, tag: Option<SlugName>) -> Outcome {
        let uid = (!call.is_admin())
            .then(|| call.user.map(|u| u.id))
            .flatten();
        let tag = tag.map(|t| t.as_str().to_owned());
        let t = tag.clone();
        let mut projects = self
            .store
            .call(move |c| repo::list_projects_tagged(c, uid, t.as_deref()))
            .await?;
        let places = self.vms.placements().await;
        for p in &mut projects {
            offline_note(p, &places);
        }
        Ok(Reply::Projects { projects, tag })
    }

    /// `tag NAME TAG...`: adds tags, at most [`MAX_TAGS`] in all.
    pub(super) async fn tag(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        tags: Vec<SlugName>,
    ) -> Outcome {
        let p = call.project(name)?;
        let add: Vec<String> = tags.iter().map(|t| t.as_str().to_owned()).collect();
        let id = p.id;
        let after = self
            .store
            .call(move |c| {
                let have = repo::tags_of(c, id)?;
                let total = have.len() + add.iter().filter(|t| !have.contains(t)).count();
                if total > MAX_TAGS {
                    return Ok(Err(total));
                }
                let add: Vec<&str> = add.iter().map(String::as_str).collect();
                repo::add_tags(c, id, &add).map(Ok)
            })
            .await?
            .map_err(|total| {
                CommandError::Refused(format!(
                    "a project carries at most {MAX_TAGS} tags ({total} with these); 'untag {name} TAG' removes some"
                ))
            })?;
        Ok(Reply::Tagged {
            project: name.to_string(),
            tags: after,
        })
    }

    /// `untag NAME TAG...`: removes tags; naming only tags it lacks is
    /// an error that lists the ones it has.
    pub(super) async fn untag(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        tags: Vec<SlugName>,
    ) -> Outcome {
        let id = call.project(name)?.id;
        let named = tags.len();
        let (missing, after) = self
            .store
            .call(move |c| {
                let mut missing = Vec::new();
                for t in &tags {
                    if !repo::remove_tag(c, id, t.as_str())? {
                        missing.push(t.to_string());
                    }
                }
                Ok((missing, repo::tags_of(c, id)?))
            })
            .await?;
        // Nothing named was there: say so (some of several is fine).
        if missing.len() == named {
            return Err(CommandError::NotFound(format!(
                "{name} has no tag {}; its tags: {}",
                missing.join(", "),
                if after.is_empty() {
                    "none".to_owned()
                } else {
                    after.join(", ")
                }
            )));
        }
        Ok(Reply::Tagged {
            project: name.to_string(),
            tags: after,
        })
    }

    /// `ssh-config`: a `Host kennel-NAME` block (the alias the VS Code
    /// link uses) for each project the caller may enter by SSH, all
    /// sharing one known_hosts entry for the gateway.
    pub(super) async fn ssh_config(&self, call: &Call<'_>) -> Outcome {
        let user = call.user()?.clone();
        let uid = (!call.is_admin()).then_some(user.id);
        let projects = self
            .store
            .call(move |c| repo::list_projects(c, uid))
            .await?;
        let s = self.settings();
        let gate = self.gate();
        let mut config = format!(
            "# Kennel: {}'s projects on {host}, from 'ssh-config'.\n# Save as ~/.ssh/kennel_config and put 'Include kennel_config' at the top of ~/.ssh/config.\n",
            user.name,
            host = s.ssh_host
        );
        for fp in &s.host_key_fingerprints {
            config.push_str(&format!("# The gateway's host key: {fp}\n"));
        }
        let mut aliases = Vec::new();
        for p in projects {
            if gate
                .may_enter(Some(&user), &p.name, crate::policy::Entry::Ssh)
                .await
                .is_err()
            {
                continue;
            }
            let c = self.connection(&p);
            config.push('\n');
            config.push_str(&c.ssh_config);
            // One known_hosts entry for every project behind the gateway.
            config.push_str(&format!(
                "\n    HostKeyAlias kennel-gateway-{}\n",
                s.ssh_host
            ));
            aliases.push(format!("kennel-{}", p.name));
        }
        if aliases.is_empty() {
            config.push_str("\n# You may enter no project by SSH yet.\n");
        }
        Ok(Reply::SshConfig { config, aliases })
    }

    pub(super) async fn status(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        let mut project = call.project(name)?;
        offline_note(&mut project, &self.vms.placements().await);
        let n = name.clone();
        let shares = self.store.call(move |c| repo::shares_of(c, &n)).await?;
        let vm = match self.vms.status(name).await {
            Ok(s) => Some(s),
            Err(ProvisionError::Unavailable(_)) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Reply::Status {
            idle: self.idle_view(&project),
            egress: self.egress_view(&project).await?,
            connection: self.connection(&project),
            project,
            shares,
            vm,
        })
    }

    /// Destroys a project's VM and disk, asking first; with `purge` also
    /// its source, asking twice.
    pub(super) async fn rm(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        purge: bool,
        yes: bool,
    ) -> Outcome {
        let project = call.project(name)?;
        let again = crate::command::Command::Rm {
            name: name.clone(),
            purge,
            yes: true,
        }
        .to_string();
        // A source kept elsewhere too (a storage volume on a cluster).
        let also = match self.vms.source_elsewhere(name).await {
            Some(place) => format!(" and {place}"),
            None => String::new(),
        };
        if !yes {
            let n = name.clone();
            let checkpoints = self
                .store
                .call(move |c| repo::checkpoints_of(c, &n))
                .await?
                .len();
            let mut prompt = match checkpoints {
                0 => format!("This destroys the VM and disk of {name}."),
                1 => format!("This destroys the VM and disk of {name}, and its checkpoint."),
                k => format!("This destroys the VM and disk of {name}, and its {k} checkpoints."),
            };
            if purge {
                prompt.push_str(&format!(
                    " It also DELETES the source directory {} on the host{also}.",
                    project.source_path
                ));
            } else {
                prompt.push_str(&format!(
                    " The source at {}{also} {} kept.",
                    project.source_path,
                    if also.is_empty() { "is" } else { "are" }
                ));
            }
            return self.ask(call.who, prompt, &again, 1).await;
        }
        // A purge deletes the user's files: it always asks once more,
        // naming them, even after --yes.
        if purge && call.confirmed < 2 {
            let prompt = format!(
                "Last check: this permanently DELETES {}{also} and everything in it, together with the VM of {name}.",
                project.source_path
            );
            return self.ask(call.who, prompt, &again, 2).await;
        }
        // What can be refused is refused before anything changes: a
        // purge outside the projects root, or through a link.
        if purge {
            self.purgeable(&project.source_path)?;
        }
        // Check, lock, check again: a wake or stop in flight finishes
        // first, and what it left is what is removed.
        let _vm = self.lock_vm(name).await;
        let project = self.project_now(name).await?;
        let before = project.state;
        self.set_state(name, ProjectState::Destroying).await?;
        call.progress.report(Progress {
            stage: Stage::Destroying,
            percent: None,
            detail: None,
        });
        let destroyed = async {
            self.vms.destroy(name).await?;
            if purge {
                self.vms.purge_source(name, &project.source_path).await?;
            }
            Ok::<(), ProvisionError>(())
        }
        .await;
        if destroyed.is_ok() {
            crate::fault::point("destroying");
        }
        if let Err(e) = destroyed {
            // A failed step leaves the project as it was, to be looked at
            // or removed again.
            self.set_state(name, before).await?;
            return Err(e.into());
        }
        let n = name.clone();
        self.store
            .call(move |c| repo::delete_project(c, &n))
            .await?;
        Ok(Reply::Removed {
            project: name.to_string(),
            source_path: project.source_path,
            purged: purge,
        })
    }

    pub(super) fn ssh(&self, call: &Call<'_>, name: &ProjectName) -> Outcome {
        Ok(Reply::Connection {
            connection: self.connection(&call.project(name)?),
        })
    }

    pub(super) async fn logs(&self, call: &Call<'_>, name: &ProjectName, lines: u32) -> Outcome {
        call.project(name)?;
        let lines = self.vms.logs(name, lines).await?;
        Ok(Reply::Logs {
            project: name.to_string(),
            lines,
        })
    }

    /// `port NAME PORT`: kept for the next boots, and in effect at once on
    /// a running VM (its forward and route change).
    pub(super) async fn port(&self, call: &Call<'_>, name: &ProjectName, port: u16) -> Outcome {
        call.project(name)?;
        let _vm = self.lock_vm(name).await;
        let moved = self.vms.set_app_port(name, port).await?;
        let n = name.clone();
        self.store
            .call(move |c| {
                repo::set_app_port(c, &n, port)?;
                if let (Some(app), Some(route)) = (moved, repo::route(c, &n)?) {
                    repo::set_route(c, &n, &route.ssh_addr, &app)?;
                }
                Ok(())
            })
            .await?;
        Ok(Reply::PortSet {
            project: name.to_string(),
            https_url: self.https_url(name),
            port,
        })
    }

    pub(super) async fn rename(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        new_name: &ProjectName,
    ) -> Outcome {
        call.project(name)?;
        // Both names: nothing may boot the old name's VM or make the new
        // one while the VM moves.
        let _vms = self.lock_vm_pair(name, new_name).await;
        self.project_now(name).await?;
        let (a, b) = (name.clone(), new_name.clone());
        match self
            .store
            .write(move |tx| repo::rename_project(tx, &a, &b))
            .await
        {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                return Err(CommandError::Conflict(format!(
                    "a project named '{new_name}' already exists; pick another name"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        crate::fault::point("renaming");
        if let Err(e) = self.vms.rename(name, new_name).await {
            let (a, b) = (name.clone(), new_name.clone());
            self.store
                .write(move |tx| repo::rename_project(tx, &b, &a))
                .await?;
            return Err(e.into());
        }
        Ok(Reply::Renamed {
            from: name.to_string(),
            to: new_name.to_string(),
            ssh: self.settings.urls().ssh_command(new_name.as_str()),
            https_url: self.https_url(new_name),
        })
    }

    /// `https://NAME.DOMAIN[:PORT]`, as replies about the web app name it.
    pub(super) fn https_url(&self, name: &ProjectName) -> String {
        self.settings.urls().app(name)
    }
}

/// A project whose host does not answer says so beside its state (the
/// store's state is what it was when the host was last heard from).
fn offline_note(p: &mut crate::model::Project, places: &[crate::provision::VmPlace]) {
    if let Some(place) = places
        .iter()
        .find(|v| v.project == p.name.as_str() && !v.online)
    {
        p.state_note = Some(format!("host {} is offline", place.host));
    }
}
