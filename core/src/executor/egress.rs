//! `egress`: who a project's VM may reach, and the asks a closed
//! project's VM raises (see [`crate::egress`]).

use serde::Serialize;

use super::{Call, Event, Executor};
use crate::command::EgressChange;
use crate::egress::{
    public, DestHost, EgressAsked, EgressMode, EgressPolicy, EgressRule, Verdict, MAX_RULES,
};
use crate::model::{now, Project, Role};
use crate::names::ProjectName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;

/// A project's egress as `egress NAME` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressView {
    pub mode: EgressMode,
    /// Whether the mode is the configured default (`vm.egress`).
    pub default: bool,
    pub rules: Vec<EgressRuleView>,
    /// Destinations its VM tried that nobody decided on yet.
    pub asked: Vec<String>,
}

/// One rule, for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressRuleView {
    pub dest: String,
    pub verdict: Verdict,
    /// Unix seconds, for `allow-once`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl Executor {
    /// The policy and view of project `p` now.
    async fn egress_state(&self, p: &Project) -> Result<(EgressPolicy, EgressView), CommandError> {
        let (id, owner) = (p.id, p.owner.clone());
        let ((mode, rules, asks), owner) = self
            .store
            .call(move |c| Ok((repo::egress_of(c, id)?, repo::user_by_name(c, &owner)?)))
            .await?;
        let t = now();
        let default = mode.is_none();
        let mode = mode.unwrap_or(self.settings.egress);
        let policy = EgressPolicy {
            mode,
            rules,
            private_ok: owner.is_some_and(|u| u.role == Role::Admin),
        }
        .live(t);
        let view = EgressView {
            mode,
            default,
            rules: policy
                .rules
                .iter()
                .map(|r| EgressRuleView {
                    dest: r.dest.to_string(),
                    verdict: r.verdict,
                    expires_at: r.expires_at,
                })
                .collect(),
            asked: asks.into_iter().map(|(d, _)| d).collect(),
        };
        Ok((policy, view))
    }

    /// What `status` shows of a project's egress.
    pub(crate) async fn egress_view(&self, p: &Project) -> Result<EgressView, CommandError> {
        Ok(self.egress_state(p).await?.1)
    }

    /// Hands project `p`'s policy to the provisioner before its VM boots
    /// (and when it changes): a closed policy the backend cannot enforce
    /// fails the boot, so nothing runs unguarded by mistake.
    pub(crate) async fn arm_egress(&self, p: &Project) -> Result<(), CommandError> {
        let (policy, _) = self.egress_state(p).await?;
        self.vms
            .egress_supported(&policy)
            .map_err(CommandError::Refused)?;
        self.vms.set_egress(&p.name, &policy).await?;
        Ok(())
    }

    /// `egress NAME [CHANGE]`.
    pub(super) async fn egress_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        change: Option<EgressChange>,
    ) -> Outcome {
        let project = call.project(name)?;
        let Some(change) = change else {
            return Ok(Reply::Egress {
                project: name.to_string(),
                egress: self.egress_view(&project).await?,
                changed: false,
            });
        };
        let t = now();
        let by = call.user.map(|u| u.id);
        let once_secs = self.settings.egress_once_secs;
        let id = project.id;
        // Members may not open private ranges or this host's addresses.
        if let EgressChange::Allow { dests, .. } = &change {
            if !call.is_admin() {
                if let Some(d) = dests.iter().find(|d| match d.host {
                    DestHost::Net { addr, .. } => !public(addr),
                    DestHost::Name(_) => false,
                }) {
                    return Err(CommandError::Refused(format!(
                        "{d} is a private range or this host's; only an admin may allow it"
                    )));
                }
            }
        }
        // The policy it would make: a closed one the backend cannot
        // enforce is refused before anything is written.
        let (mut policy, view) = self.egress_state(&project).await?;
        if let EgressChange::Mode(m) = &change {
            policy.mode = m.unwrap_or(self.settings.egress);
            self.vms
                .egress_supported(&policy)
                .map_err(CommandError::Refused)?;
        }
        if view.rules.len() >= MAX_RULES
            && matches!(change, EgressChange::Allow { .. } | EgressChange::Deny(_))
        {
            return Err(CommandError::Refused(format!(
                "{name} has {MAX_RULES} egress rules, the most one project holds; 'egress {name} forget ...' some first"
            )));
        }
        let forgot = self
            .store
            .write(move |tx| {
                let mut forgot = Vec::new();
                match &change {
                    EgressChange::Mode(m) => repo::set_egress_mode(tx, id, *m)?,
                    EgressChange::Allow { dests, once } => {
                        for d in dests {
                            let rule = EgressRule {
                                dest: d.clone(),
                                verdict: Verdict::Allow,
                                expires_at: once.then_some(t + once_secs),
                            };
                            repo::put_egress_rule(tx, id, &rule, by)?;
                        }
                    }
                    EgressChange::Deny(dests) => {
                        for d in dests {
                            let rule = EgressRule {
                                dest: d.clone(),
                                verdict: Verdict::Deny,
                                expires_at: None,
                            };
                            repo::put_egress_rule(tx, id, &rule, by)?;
                        }
                    }
                    EgressChange::Forget(dests) => {
                        for d in dests {
                            if !repo::remove_egress_rule(tx, id, &d.to_string())? {
                                forgot.push(d.to_string());
                            }
                        }
                    }
                }
                Ok(forgot)
            })
            .await?;
        if !forgot.is_empty() {
            tracing::debug!(project = %name, missing = ?forgot, "egress forget of destinations not on the list");
        }
        let (policy, egress) = self.egress_state(&project).await?;
        tracing::info!(project = %name, mode = %policy.mode, rules = policy.rules.len(), "egress policy changed");
        if let Err(e) = self.vms.set_egress(name, &policy).await {
            return Err(CommandError::Conflict(format!(
                "the policy is saved, but Kennel could not apply it to the running VM ({}); 'restart {name}' applies it",
                crate::outcome::chain(&e)
            )));
        }
        Ok(Reply::Egress {
            project: name.to_string(),
            egress,
            changed: true,
        })
    }

    /// Hands every project's policy to the provisioner (a VM found running
    /// gets its rules back), then passes closed projects' asks to their
    /// owners, for as long as the daemon runs.
    pub async fn watch_egress(&self) {
        match self.store.call(|c| repo::list_projects(c, None)).await {
            Ok(projects) => {
                for p in projects {
                    if let Err(e) = self.arm_egress(&p).await {
                        tracing::warn!(project = %p.name, error = %e, "could not put the egress policy in place");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read projects for their egress policies")
            }
        }
        let Some(mut asks) = self.vms.egress_asks() else {
            return;
        };
        while let Some(a) = asks.recv().await {
            self.egress_asked(a).await;
        }
    }

    /// A closed project's VM asked for a destination nobody decided on:
    /// its owner is told once (asks are remembered until decided, and at
    /// most `egress_asks_per_hour` are said per project).
    pub async fn egress_asked(&self, asked: EgressAsked) {
        let EgressAsked { project, dest } = asked;
        let n = project.clone();
        let per_hour = self.settings.egress_asks_per_hour;
        let d = dest.clone();
        let filed = self
            .store
            .write(move |tx| {
                let Some(p) = repo::project_by_name(tx, &n)? else {
                    return Ok(None);
                };
                if !repo::file_egress_ask(tx, p.id, &d, per_hour)? {
                    return Ok(None);
                }
                let owner = repo::user_by_name(tx, &p.owner)?;
                let identities = match &owner {
                    Some(u) => repo::identities_of(tx, u.id)?,
                    None => Vec::new(),
                };
                Ok(Some((p.owner, identities)))
            })
            .await;
        let (owner, identities) = match filed {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(project = %project, error = %e, "could not file an egress ask");
                return;
            }
        };
        tracing::info!(project = %project, dest = %dest, "egress asked");
        self.audit_entry(
            &crate::model::Identity::system(),
            None,
            "egress ask",
            Some(project.to_string()),
            crate::model::AuditOutcome::Ok,
            Some(dest.clone()),
        )
        .await;
        let _ = self.events.send(Event::EgressAsked {
            project,
            owner,
            identities,
            dest,
        });
    }
}

/// The line an owner gets when their closed project's VM tried `dest`.
pub fn ask_line(project: &ProjectName, dest: &str) -> String {
    format!(
        "{project} tried to reach {dest}, which its egress policy does not allow yet. Nothing gets through until you answer: 'egress {project} allow {dest}', 'egress {project} allow-once {dest}' (for a while) or 'egress {project} deny {dest}'."
    )
}

/// The project and destination of a line [`ask_line`] wrote (a chat
/// message read back after a restart, to act on a reaction to it).
pub fn ask_in(line: &str) -> Option<(ProjectName, String)> {
    let (project, rest) = line.split_once(" tried to reach ")?;
    let (dest, _) = rest.split_once(", which its egress policy")?;
    let project = ProjectName::new(project).ok()?;
    crate::egress::Destination::parse(dest).ok()?;
    Some((project, dest.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ask_line_reads_back() {
        let p = ProjectName::new("app").unwrap();
        let line = ask_line(&p, "api.example.com:443");
        assert_eq!(ask_in(&line), Some((p, "api.example.com:443".into())));
        assert_eq!(
            ask_in("app tried to reach x y, which its egress policy"),
            None
        );
        assert_eq!(ask_in("hello"), None);
    }
}
