//! Sources as custom storage volumes (`incus.workspace = "volume"`, the
//! default on a cluster): a project's `/workspace` is a volume of the
//! storage pool on its instance's member, so the source moves, copies and
//! snapshots with the instance and needs no storage shared between
//! members. Kennel still clones (or makes from a template) on its own
//! host, with the same guard, and copies that tree into the volume once,
//! through the guest's sshd; the host keeps the tree it started from.
//!
//! An instance says which kind it has: the volume's name is its
//! `user.kennel.volume` label (none: its source is a host directory), so
//! a change of `incus.workspace` leaves existing projects as they were.

use super::*;

/// The label naming an instance's source volume.
pub(super) const VOLUME: &str = "volume";

/// The volume that holds project `project`'s source.
pub(super) fn volume_name(project: &str) -> String {
    format!("kennel-src-{project}")
}

/// The member instance `i` lives on, on a cluster.
pub(super) fn member_of(i: &Instance) -> Option<&str> {
    (!i.location.is_empty() && i.location != "none").then_some(i.location.as_str())
}

/// The source volume of instance `i`, if its source is one.
pub(super) fn volume_of(i: &Instance) -> Option<&str> {
    label(i, VOLUME)
}

const LONG: Duration = Duration::from_secs(1800);

/// Sets an instance's `/workspace` device and its volume label (`key`)
/// in `put`, its configuration as Incus gave it.
fn set_workspace(
    put: &mut serde_json::Value,
    device: Option<crate::incus::api::Device>,
    key: String,
    volume: String,
) {
    if let (Some(devices), Some(device)) = (
        put.get_mut("devices").and_then(|d| d.as_object_mut()),
        device,
    ) {
        let device = device
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        devices.insert("workspace".into(), serde_json::Value::Object(device));
    }
    if let Some(config) = put.get_mut("config").and_then(|c| c.as_object_mut()) {
        config.insert(key, serde_json::Value::String(volume));
    }
}

impl IncusProvisioner {
    /// Whether new projects keep their source in a volume: as configured,
    /// or, for `auto`, when Incus is a cluster (asked once).
    pub(super) async fn volumes(&self) -> Result<bool, ProvisionError> {
        match self.set.workspace {
            WorkspaceChoice::Host => Ok(false),
            WorkspaceChoice::Volume => Ok(true),
            WorkspaceChoice::Auto => {
                if let Ok(Some(v)) = self.clustered.lock().map(|c| *c) {
                    return Ok(v);
                }
                let clustered = self
                    .client
                    .server()
                    .await
                    .map_err(|e| incus_failed(Stage::Validated, e))?
                    .environment
                    .server_clustered;
                if let Ok(mut c) = self.clustered.lock() {
                    *c = Some(clustered);
                }
                Ok(clustered)
            }
        }
    }

    /// Refuses a new project `name` while a source volume of that name
    /// is left from an earlier one (removed without a purge), naming it.
    pub(super) async fn no_volume_left(&self, name: &str) -> Result<(), ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        let volume = volume_name(name);
        if let Some(at) = self
            .client
            .volume_location(pool, &volume)
            .await
            .map_err(|e| incus_failed(Stage::Validated, e))?
        {
            let at = if at.is_empty() {
                String::new()
            } else {
                format!(" on {at}")
            };
            return Err(ProvisionError::Invalid {
                stage: Stage::Validated,
                message: format!(
                    "storage volume {volume} of pool {pool}{at} is left from an earlier project {name} (removed without --purge): delete it (`incus storage volume delete {pool} {volume}`) or pick another name"
                ),
            });
        }
        Ok(())
    }

    /// Makes the source volume of new instance `name` on its member and
    /// attaches it at `/workspace`; returns the volume's name.
    pub(super) async fn attach_new_volume(&self, name: &str) -> Result<String, ProvisionError> {
        let pool = self.set.placement.storage_pool.clone();
        let volume = volume_name(name);
        let i = self.instance(name).await?;
        self.client
            .create_volume(&pool, &volume, None, member_of(&i), LONG)
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        let device = spec::workspace_device(
            &self.set.placement,
            &spec::Workspace::Volume(volume.clone()),
        );
        let key = format!("user.kennel.{VOLUME}");
        let v = volume.clone();
        self.client
            .update_instance(name, move |put| set_workspace(put, device, key, v))
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        Ok(volume)
    }

    /// Copies the tree at `seed` (Kennel's clone) into the running
    /// guest's `/workspace` over its sshd (`ssh` is the proxy's address),
    /// owned by the guest's `dev`.
    pub(super) async fn fill_volume(
        &self,
        name: &str,
        ssh: &str,
        seed: &Path,
        progress: &dyn ProgressSink,
    ) -> Result<(), ProvisionError> {
        step(
            progress,
            Stage::Ready,
            Some("copying the source into its volume".into()),
        );
        let tmp = self.host.s.data_dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| failed(Stage::Ready, e.to_string()))?;
        let tar = tmp.join(format!("{name}.source.tar"));
        let (from, to) = (seed.to_path_buf(), tar.clone());
        self.host
            .blocking(Stage::Ready, move |runner| {
                runner
                    .run(
                        &Cmd::new("tar")
                            .arg("-C")
                            .arg(&from)
                            .args(["-c", "-f"])
                            .arg(&to)
                            .arg("."),
                    )
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await?;
        let copied = self
            .host
            .ssh_exec_with(
                &self.host.key_dir(name),
                name,
                ssh,
                "sudo chown dev:dev /workspace && tar -x -f - -C /workspace",
                Some(tar.clone()),
            )
            .await;
        let _ = std::fs::remove_file(&tar);
        copied.map(drop).map_err(|e| {
            failed(
                Stage::Ready,
                format!("cannot copy the source into its volume: {e}"),
            )
        })
    }

    /// Points stopped instance `name`'s `/workspace` (and its label) at
    /// `volume`: after its disk went back to a snapshot, whose config
    /// may name the volume as it was called then (before a rename).
    pub(super) async fn repoint_volume(
        &self,
        name: &str,
        volume: &str,
    ) -> Result<(), ProvisionError> {
        let device = spec::workspace_device(
            &self.set.placement,
            &spec::Workspace::Volume(volume.to_owned()),
        );
        let (key, v) = (format!("user.kennel.{VOLUME}"), volume.to_owned());
        self.client
            .update_instance(name, move |put| set_workspace(put, device, key, v))
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))
    }

    /// Deletes project `project`'s source volume (and its snapshots),
    /// wherever it is; nothing when there is none.
    pub(super) async fn delete_volume_of(&self, project: &str) -> Result<(), ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        let volume = volume_name(project);
        let Some(at) = self
            .client
            .volume_location(pool, &volume)
            .await
            .map_err(|e| incus_failed(Stage::Destroying, e))?
        else {
            return Ok(());
        };
        tracing::warn!(project, volume, "purging the project's source volume");
        let at = (!at.is_empty()).then_some(at.as_str());
        self.client
            .delete_volume(pool, &volume, at, LONG)
            .await
            .map_err(|e| incus_failed(Stage::Destroying, e))
    }

    /// Takes (or, `restore`, goes back to) snapshot `snap` of the source
    /// volume of instance `i`.
    pub(super) async fn volume_snapshot(
        &self,
        i: &Instance,
        volume: &str,
        snap: &str,
        restore: bool,
    ) -> Result<(), ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        let at = member_of(i);
        let r = self
            .client
            .volume_snapshot(pool, volume, snap, restore, at, LONG)
            .await;
        r.map_err(|e| incus_failed(Stage::Disk, e))
    }

    /// Deletes snapshot `snap` of instance `i`'s source volume (nothing
    /// when it is gone).
    pub(super) async fn delete_volume_snapshot(
        &self,
        i: &Instance,
        volume: &str,
        snap: &str,
    ) -> Result<(), ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        match self
            .client
            .delete_volume_snapshot(pool, volume, snap, member_of(i), LONG)
            .await
        {
            Ok(()) | Err(IncusError::NotFound { .. }) => Ok(()),
            Err(e) => Err(incus_failed(Stage::Disk, e)),
        }
    }

    /// A copy of instance `src`'s source volume (as at snapshot `snap`,
    /// or now) for project `to`, on `src`'s member; its name.
    pub(super) async fn copy_volume(
        &self,
        src: &Instance,
        volume: &str,
        snap: Option<&str>,
        to: &str,
    ) -> Result<String, ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        let new = volume_name(to);
        let from = match snap {
            Some(s) => format!("{volume}/{s}"),
            None => volume.to_owned(),
        };
        let at = member_of(src);
        self.client
            .create_volume(pool, &new, Some((&from, at.unwrap_or(""))), at, LONG)
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))?;
        Ok(new)
    }

    /// Gives the source volume of stopped instance `i` (now named `to`)
    /// the new name: a copy under it (snapshots too) replaces the old
    /// one in the instance, which is then deleted. (Incus's own rename
    /// of a volume forwarded to another member took 30 s on Incus 6.0.)
    pub(super) async fn rename_volume(
        &self,
        i: &Instance,
        volume: &str,
        to: &str,
    ) -> Result<(), ProvisionError> {
        let pool = self.set.placement.storage_pool.clone();
        let new = self.copy_volume(i, volume, None, to).await?;
        let device =
            spec::workspace_device(&self.set.placement, &spec::Workspace::Volume(new.clone()));
        let key = format!("user.kennel.{VOLUME}");
        let switched = self
            .client
            .update_instance(&i.name, move |put| set_workspace(put, device, key, new))
            .await;
        let stale = if switched.is_ok() {
            volume.to_owned()
        } else {
            volume_name(to)
        };
        if let Err(e) = self
            .client
            .delete_volume(&pool, &stale, member_of(i), LONG)
            .await
        {
            tracing::warn!(instance = i.name, volume = stale, error = %e, "could not delete a source volume no instance uses");
        }
        switched.map_err(|e| incus_failed(Stage::Disk, e))
    }

    /// Before stopped instance `i` moves to member `to`: a copy of its
    /// source volume there (with its snapshots), under the same name, so
    /// the instance finds it when it lands. [`Self::volume_moved`] then
    /// deletes the one left behind.
    pub(super) async fn volume_to(
        &self,
        i: &Instance,
        volume: &str,
        to: &str,
    ) -> Result<(), ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        let from = member_of(i).unwrap_or("");
        self.client
            .create_volume(pool, volume, Some((volume, from)), Some(to), LONG)
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))
    }

    /// After a move of an instance with source volume `volume` from
    /// member `from` (`moved`: whether the instance went): the copy on
    /// the side it is not on is deleted.
    pub(super) async fn volume_moved(
        &self,
        volume: &str,
        from: &str,
        to: &str,
        moved: bool,
    ) -> Result<(), ProvisionError> {
        let pool = &self.set.placement.storage_pool;
        let stale = if moved { from } else { to };
        self.client
            .delete_volume(pool, volume, Some(stale), LONG)
            .await
            .map_err(|e| incus_failed(Stage::Disk, e))
    }
}
