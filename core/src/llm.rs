//! Core's side of the metadata service (the LLM gateway and
//! `/kennel/v1/*`, served by the gateway crate to VMs only): who a VM is,
//! the owner's keys, the day's use against the limits, a record of each
//! request, and a line from a VM to its owner's chat.
//!
//! Which VM asks is the gateway's to know from the network path (a per-VM
//! socket); from then on it is a project name, and everything here is
//! about that project's owner.

use crate::executor::{Call, Event, Executor};
use crate::gate::Gate;
use crate::model::{AuditOutcome, Frontend, Identity, Project, User, UserId};
use crate::names::{ProjectName, UserName};
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;
use crate::store::StoreError;

/// The API families the gateway speaks, each with the owner's secret that
/// holds its key (`secret set openai-api-key …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// OpenAI's API and every server compatible with it (vLLM, Ollama's
    /// `/v1`, LiteLLM).
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

impl Provider {
    /// Its path segment (`/llm/openai/v1/…`) and configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
        }
    }

    /// The user secret holding the owner's own key.
    pub fn secret_name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai-api-key",
            Provider::Anthropic => "anthropic-api-key",
        }
    }

    /// From a path segment.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Provider::OpenAi),
            "anthropic" => Some(Provider::Anthropic),
            _ => None,
        }
    }
}

/// A project's VM as the metadata service sees it.
#[derive(Debug, Clone)]
pub struct VmWho {
    pub project: Project,
    pub owner: User,
}

impl VmWho {
    /// How the audit log names the VM acting (no person is behind it).
    pub fn identity(&self) -> Identity {
        Identity::new(Frontend::System, format!("vm:{}", self.project.name))
    }
}

/// What one LLM request needs to know, read at once
/// ([`Gate::llm_context`]).
pub struct LlmContext {
    pub who: VmWho,
    /// The owner's own key for the provider asked for.
    pub key: Option<String>,
    /// The owner's use today, when a daily limit applies.
    pub used: Option<LlmDay>,
}

impl std::fmt::Debug for LlmContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmContext")
            .field("who", &self.who)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("used", &self.used)
            .finish()
    }
}

/// One user's LLM use on one (UTC) day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LlmDay {
    pub requests: u64,
    pub tokens: u64,
}

/// What one forwarded request came to, for the audit log and the counts.
/// Never the prompt or the answer.
#[derive(Debug, Clone, Default)]
pub struct LlmRecord {
    /// `openai` (the owner's key) or an operator backend's name.
    pub backend: String,
    pub model: Option<String>,
    pub tokens: u64,
    /// The upstream's status, or the gateway's own (429, 502, 504).
    pub status: u16,
    pub ms: u64,
}

/// Today's date in UTC, the key of the day counts.
pub fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The project `name` and its owner, read on the store's connection.
fn read_vm_who(c: &rusqlite::Connection, name: &ProjectName) -> Result<Option<VmWho>, StoreError> {
    let Some(project) = repo::project_by_name(c, name)? else {
        return Ok(None);
    };
    Ok(repo::user_by_name(c, &project.owner)?.map(|owner| VmWho { project, owner }))
}

impl Gate {
    /// The project `name` and its owner; `None` when there is no such
    /// project (removed while its VM was still asking).
    pub async fn vm_who(&self, name: &ProjectName) -> Result<Option<VmWho>, StoreError> {
        let n = name.clone();
        self.exec.store.call(move |c| read_vm_who(c, &n)).await
    }

    /// Every project's name, and whether its VM runs (the metadata
    /// service keeps a socket for each, and a link into each running VM).
    pub async fn project_names(&self) -> Result<Vec<(ProjectName, bool)>, StoreError> {
        self.exec
            .store
            .call(|c| {
                Ok(repo::list_projects(c, None)?
                    .into_iter()
                    .map(|p| (p.name, p.state == crate::model::ProjectState::Running))
                    .collect())
            })
            .await
    }

    /// `user`'s use today.
    pub async fn llm_day(&self, user: UserId) -> Result<LlmDay, StoreError> {
        let day = today();
        let (requests, tokens) = self
            .exec
            .store
            .call(move |c| repo::llm_use(c, user, &day))
            .await?;
        Ok(LlmDay { requests, tokens })
    }

    /// For one LLM request from project `name`'s VM, in one read of the
    /// store: the project and its owner (`None` when the project is gone),
    /// the owner's own key for `provider` (read on the host for the
    /// upstream request only) and, when `with_day`, their use today.
    pub async fn llm_context(
        &self,
        name: &ProjectName,
        provider: Provider,
        with_day: bool,
    ) -> Result<Option<LlmContext>, StoreError> {
        let (n, day) = (name.clone(), today());
        self.exec
            .store
            .call(move |c| {
                let Some(who) = read_vm_who(c, &n)? else {
                    return Ok(None);
                };
                let owner = who.owner.id;
                let key = repo::secret(c, owner, provider.secret_name())?;
                let used = if with_day {
                    let (requests, tokens) = repo::llm_use(c, owner, &day)?;
                    Some(LlmDay { requests, tokens })
                } else {
                    None
                };
                Ok(Some(LlmContext { who, key, used }))
            })
            .await
    }

    /// Counts one request of `who`'s owner (the day's use, the running
    /// agent's tokens) and writes its audit line, in one transaction.
    pub async fn llm_record(&self, who: &VmWho, r: &LlmRecord) {
        let (uid, day, tokens) = (who.owner.id, today(), r.tokens);
        let project = who.project.name.clone();
        let identity = who.identity();
        let outcome = if r.status < 400 {
            AuditOutcome::Ok
        } else if r.status == 429 {
            AuditOutcome::Refused
        } else {
            AuditOutcome::Failed
        };
        let detail = format!(
            "backend={} model={} tokens={} status={} ms={}",
            r.backend,
            r.model.as_deref().unwrap_or("-"),
            r.tokens,
            r.status,
            r.ms
        );
        let written = self
            .exec
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                repo::add_llm_use(&tx, uid, &day, tokens)?;
                repo::add_agent_tokens(&tx, &project, tokens)?;
                repo::audit(
                    &tx,
                    &repo::AuditEntry {
                        user: Some(uid),
                        identity: &identity,
                        action: "llm request",
                        target: Some(project.as_str()),
                        outcome,
                        detail: Some(&detail),
                    },
                )?;
                tx.commit()?;
                Ok(())
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not count LLM use");
        }
    }

    /// Posts `text` (one line, already checked) to the chats of `who`'s
    /// owner, as the bots do for an idle stop.
    pub async fn notify_owner(&self, who: &VmWho, text: &str) {
        let uid = who.owner.id;
        let identities = self
            .exec
            .store
            .call(move |c| repo::identities_of(c, uid))
            .await
            .unwrap_or_default();
        self.exec
            .audit_entry(
                &who.identity(),
                Some(&who.owner),
                "notify",
                Some(who.project.name.to_string()),
                AuditOutcome::Ok,
                None,
            )
            .await;
        let _ = self.exec.events.send(Event::ProjectNotice {
            project: who.project.name.clone(),
            owner: who.owner.name.clone(),
            identities,
            text: text.to_owned(),
        });
    }
}

impl Executor {
    pub(crate) async fn llm_usage(&self, call: &Call<'_>, user: Option<&UserName>) -> Outcome {
        let me = call.user()?.clone();
        let target = match user {
            None => me,
            Some(n) if *n == me.name => me,
            Some(n) => {
                let n2 = n.clone();
                self.store
                    .call(move |c| repo::user_by_name(c, &n2))
                    .await?
                    .ok_or_else(|| CommandError::NotFound(format!("there is no user '{n}'")))?
            }
        };
        let day = self.gate().llm_day(target.id).await?;
        let s = self.settings();
        Ok(Reply::LlmUsage {
            user: target.name,
            day: today(),
            requests: day.requests,
            tokens: day.tokens,
            requests_per_minute: s.llm_requests_per_minute,
            tokens_per_day: s.llm_tokens_per_day,
        })
    }
}

/// The most characters of one line a VM may send its owner.
pub const NOTICE_MAX_CHARS: usize = 500;

/// How a line from a VM reads in its owner's chat: the project first, so
/// a VM cannot pass its words off as Kennel's.
pub fn notice_line(project: &ProjectName, text: &str) -> String {
    format!("[{project}] {text}")
}
