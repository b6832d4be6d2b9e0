//! What a user keeps with Kennel for their clones: secrets (a git token)
//! and their deploy key.

use super::{Call, Executor};
use crate::command::SlugName;
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;

impl Executor {
    pub(super) async fn secret_set(
        &self,
        call: &Call<'_>,
        name: &SlugName,
        value: String,
    ) -> Outcome {
        let uid = call.user()?.id;
        let n = name.to_string();
        self.store
            .call(move |c| repo::set_secret(c, uid, &n, &value))
            .await?;
        Ok(Reply::SecretStored {
            name: name.to_string(),
        })
    }

    pub(super) async fn secret_rm(&self, call: &Call<'_>, name: &SlugName) -> Outcome {
        let uid = call.user()?.id;
        let n = name.to_string();
        if self
            .store
            .call(move |c| repo::remove_secret(c, uid, &n))
            .await?
        {
            Ok(Reply::SecretDeleted {
                name: name.to_string(),
            })
        } else {
            Err(CommandError::NotFound(format!(
                "you have no secret '{name}'; see 'secrets'"
            )))
        }
    }

    pub(super) async fn secrets(&self, call: &Call<'_>) -> Outcome {
        let uid = call.user()?.id;
        let names = self.store.call(move |c| repo::secret_names(c, uid)).await?;
        Ok(Reply::Secrets { names })
    }

    pub(super) async fn deploy_key(&self, call: &Call<'_>) -> Outcome {
        let key = self.vms.deploy_key(&call.user()?.name).await?;
        Ok(Reply::DeployKey { public_key: key })
    }
}
