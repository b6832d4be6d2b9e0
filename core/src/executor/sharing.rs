//! Who else may use a project: share, unshare, public, private.

use super::{Call, Executor};
use crate::model::Visibility;
use crate::names::{ProjectName, UserName};
use crate::outcome::{CommandError, Outcome, Reply};
use crate::store::repo;

impl Executor {
    pub(super) async fn share(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        target: &UserName,
        ssh: bool,
        web: bool,
    ) -> Outcome {
        let project = call.project(name)?;
        let t = target.clone();
        let found = self
            .store
            .write(move |tx| {
                let Some(u) = repo::user_by_name(tx, &t)? else {
                    return Ok(false);
                };
                repo::upsert_share(tx, project.id, u.id, ssh, web)?;
                Ok(true)
            })
            .await?;
        if !found {
            return Err(CommandError::NotFound(format!(
                "there is no user '{target}'"
            )));
        }
        self.sync_access(vec![name.clone()]).await;
        Ok(Reply::Shared {
            project: name.to_string(),
            user: target.to_string(),
            ssh,
            web,
        })
    }

    pub(super) async fn unshare(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        target: &UserName,
    ) -> Outcome {
        let project = call.project(name)?;
        let t = target.clone();
        let removed = self
            .store
            .write(move |tx| match repo::user_by_name(tx, &t)? {
                Some(u) => repo::remove_share(tx, project.id, u.id),
                None => Ok(false),
            })
            .await?;
        if !removed {
            return Err(CommandError::NotFound(format!(
                "{name} is not shared with '{target}'"
            )));
        }
        self.sync_access(vec![name.clone()]).await;
        Ok(Reply::Unshared {
            project: name.to_string(),
            user: target.to_string(),
        })
    }

    /// `public` and `private`: who may open the web app without a share.
    pub(super) async fn set_visibility(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        v: Visibility,
    ) -> Outcome {
        if call.found.is_none() {
            return Err(CommandError::NotFound(format!(
                "there is no project '{name}'"
            )));
        }
        let n = name.clone();
        self.store
            .call(move |c| repo::set_visibility(c, &n, v))
            .await?;
        Ok(Reply::VisibilitySet {
            project: name.to_string(),
            https_url: self.https_url(name),
            visibility: v,
        })
    }
}
