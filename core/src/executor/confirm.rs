//! Questions and `yes`: a destructive command asks first, and `yes`
//! within the time limit runs it, through policy again.

use super::{audited, Call, Executor};
use crate::command;
use crate::model::{AuditOutcome, Identity};
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;

impl Executor {
    /// Asks `who` to confirm `line` with `yes` (at `step`).
    pub(super) async fn ask(
        &self,
        who: &Identity,
        prompt: String,
        line: &str,
        step: u32,
    ) -> Outcome {
        let w = who.clone();
        let l = line.to_owned();
        let expires = crate::model::now() + self.settings.confirm_secs;
        self.store
            .call(move |c| repo::set_confirmation(c, &w, &l, step, expires))
            .await?;
        Ok(Reply::Confirm {
            prompt: format!(
                "{prompt} Reply 'yes' within {} minutes to go ahead.",
                self.settings.confirm_secs / 60
            ),
            confirm_with: "yes".into(),
        })
    }

    /// Runs the command `who` was asked to confirm.
    pub(super) async fn yes(&self, call: &Call<'_>) -> Outcome {
        let w = call.who.clone();
        let pending = self
            .store
            .call(move |c| repo::take_confirmation(c, &w))
            .await?;
        let Some((line, step)) = pending else {
            return Err(CommandError::NotFound(format!(
                "there is nothing to confirm (a question lasts {} minutes)",
                self.settings.confirm_secs / 60
            )));
        };
        let cmd = command::parse(&line)?.command;
        // The confirmed command goes through policy again, and is what the
        // audit log records.
        let out =
            Box::pin(self.authorized(call.who, call.user, cmd.clone(), call.progress, step)).await;
        let outcome = match &out {
            Ok(Reply::Confirm { .. }) => None,
            Ok(_) => Some(AuditOutcome::Ok),
            Err(CommandError::Refused(_)) => Some(AuditOutcome::Refused),
            Err(_) => Some(AuditOutcome::Failed),
        };
        if let Some(o) = outcome.filter(|_| audited(&cmd)) {
            let detail = out
                .as_ref()
                .err()
                .map(|e| crate::redact::redact(&e.to_string()).into_owned());
            self.audit(call.who, call.user, &cmd, o, detail).await;
        }
        out
    }
}
