//! Custom domains: `domain add NAME HOST`, `domain rm`, `domain approve`,
//! `domains`, and the gateway's question of which project a host is.
//!
//! `domain add` asks DNS first and says exactly which record is missing;
//! an admin's domain is served at once, a member's waits for an admin
//! (told in the admins' rooms, as access requests are). Kennel's own
//! names (`DOMAIN`, `*.DOMAIN`) are never custom domains, and a host
//! belongs to one project.

use super::{Call, Executor};
use crate::dns::{missing_record, points_here};
use crate::gate::Gate;
use crate::model::MAX_DOMAINS_PER_PROJECT;
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::{repo, StoreError};

impl Executor {
    /// Wires the resolver `domain add` checks DNS with.
    pub fn set_dns(&self, dns: std::sync::Arc<dyn crate::dns::Dns>) {
        let _ = self.dns.set(dns);
    }

    /// `domain add NAME HOST`.
    pub(super) async fn domain_add(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        host: &str,
    ) -> Outcome {
        call.project(name)?;
        let domain = self.settings().domain.to_ascii_lowercase();
        if host == domain || host.ends_with(&format!(".{domain}")) {
            return Err(CommandError::Conflict(format!(
                "{host} is one of Kennel's own names; {name} has {} already",
                self.settings().urls().app(name)
            )));
        }
        let h = host.to_owned();
        if let Some((owner, _)) = self.store.call(move |c| repo::domain(c, &h)).await? {
            return Err(CommandError::Conflict(if &owner == name {
                format!("{name} has {host} already ('domains {name}')")
            } else {
                format!("{host} belongs to another project; a host name serves one project")
            }));
        }
        let dns = self.dns.get().cloned().ok_or_else(|| {
            CommandError::Provision(crate::provision::ProvisionError::Unavailable(
                "this Kennel has no DNS resolver wired to check custom domains".into(),
            ))
        })?;
        let unavailable = |e: crate::dns::DnsError| {
            CommandError::Provision(crate::provision::ProvisionError::Unavailable(e.to_string()))
        };
        let project_host = self.settings().urls().app_host(name.as_str(), None);
        let mut ours = self.settings().public_addresses.clone();
        for own in [domain.as_str(), project_host.as_str()] {
            ours.extend(dns.lookup(own).await.map_err(unavailable)?.addrs);
        }
        let now = dns.lookup(host).await.map_err(unavailable)?;
        if !points_here(&now, &project_host, &ours) {
            return Err(CommandError::Provision(
                crate::provision::ProvisionError::Invalid {
                    stage: crate::provision::Stage::Validated,
                    message: missing_record(host, &project_host, &ours, &now),
                },
            ));
        }
        let admin = call.is_admin();
        let by = call.user.map(|u| u.id);
        let (n, h) = (name.clone(), host.to_owned());
        self.store
            .write(move |tx| {
                if repo::domain_count(tx, &n)? >= MAX_DOMAINS_PER_PROJECT {
                    return Ok(Err(CommandError::Conflict(format!(
                        "{n} has {MAX_DOMAINS_PER_PROJECT} custom domains, its limit; remove one with 'domain rm {n} HOST'"
                    ))));
                }
                match repo::add_domain(tx, &n, &h, admin, by) {
                    Ok(()) => Ok(Ok(())),
                    Err(StoreError::AlreadyExists { .. }) => Ok(Err(CommandError::Conflict(format!(
                        "{h} belongs to another project; a host name serves one project"
                    )))),
                    Err(e) => Err(e),
                }
            })
            .await??;
        if !admin {
            let who = call
                .user
                .map_or_else(|| "someone".to_owned(), |u| u.name.to_string());
            let _ = self.events.send(crate::Event::AdminNotice(format!(
                "{who} asks to serve {name} at {host} (its DNS points here). Approve with 'domain approve {host}', or refuse with 'domain rm {name} {host}'."
            )));
        }
        Ok(Reply::DomainAdded {
            project: name.to_string(),
            host: host.to_owned(),
            url: self.settings().urls().custom_domain(host),
            pending: !admin,
        })
    }

    /// `domain approve HOST` (admins).
    pub(super) async fn domain_approve(&self, call: &Call<'_>, host: &str) -> Outcome {
        let by = call.user.map(|u| u.id);
        let h = host.to_owned();
        let (found, approved) = self
            .store
            .write(move |tx| {
                let found = repo::domain(tx, &h)?;
                let approved = repo::approve_domain(tx, &h, by)?;
                Ok((found, approved))
            })
            .await?;
        match (found, approved) {
            (Some((project, _)), true) => Ok(Reply::DomainApproved {
                project: project.to_string(),
                host: host.to_owned(),
                url: self.settings().urls().custom_domain(host),
            }),
            (Some((project, _)), false) => Err(CommandError::Conflict(format!(
                "{host} is approved already; {project} is served there"
            ))),
            (None, _) => Err(CommandError::NotFound(format!(
                "no project asked for {host}; 'domains' lists them"
            ))),
        }
    }

    /// `domain rm NAME HOST`.
    pub(super) async fn domain_rm(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        host: &str,
    ) -> Outcome {
        call.project(name)?;
        let (n, h) = (name.clone(), host.to_owned());
        if self
            .store
            .call(move |c| repo::remove_domain(c, &n, &h))
            .await?
        {
            Ok(Reply::DomainRemoved {
                project: name.to_string(),
                host: host.to_owned(),
            })
        } else {
            Err(CommandError::NotFound(format!(
                "{name} has no custom domain {host}; 'domains {name}' lists them"
            )))
        }
    }

    /// `domains [NAME]`: a project's, or those of every project the
    /// caller may see (all, for admins).
    pub(super) async fn domains_cmd(&self, call: &Call<'_>, name: Option<&ProjectName>) -> Outcome {
        if let Some(n) = name {
            call.project(n)?;
        }
        let n = name.cloned();
        let all = self
            .store
            .call(move |c| repo::domains(c, n.as_ref()))
            .await?;
        let domains = if call.is_admin() || name.is_some() {
            all
        } else {
            let me = call.user()?.clone();
            let mine = self
                .store
                .call(move |c| {
                    Ok(repo::list_projects_tagged(c, Some(me.id), None)?
                        .into_iter()
                        .filter(|p| p.owner == me.name)
                        .map(|p| p.name)
                        .collect::<Vec<_>>())
                })
                .await?;
            all.into_iter()
                .filter(|d| mine.contains(&d.project))
                .collect()
        };
        Ok(Reply::Domains { domains })
    }
}

impl Gate {
    /// The project an (approved) custom domain serves.
    pub async fn custom_domain(&self, host: &str) -> Result<Option<ProjectName>, StoreError> {
        let h = host.to_owned();
        Ok(self
            .store()
            .call(move |c| repo::domain(c, &h))
            .await?
            .filter(|(_, state)| state == "active")
            .map(|(p, _)| p))
    }
}
