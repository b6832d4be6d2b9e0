//! What a restarted Kennel finds: running VMs adopted, dead ones cleaned
//! up, half-created ones removed; and tearing a VM down.

use super::*;

impl LocalProvisioner {
    /// Adopts VMs that outlived a previous Kennel and cleans up after the
    /// dead: returns each known VM and whether it runs.
    pub async fn reconcile(&self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let vms = self.s.data_dir.join("vms");
        self.finish_renames().await;
        self.remove_cut_off_sources();
        let entries: Vec<PathBuf> = std::fs::read_dir(&vms)
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        for dir in entries {
            let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let Some(r) = self.record(&name) else {
                // Half-created: no record was ever written.
                tracing::warn!(vm = %name, "removing a half-created VM directory");
                self.teardown(&name, None).await;
                continue;
            };
            let state = self.vmm.state(&r.machine).await;
            // A VMM that is alive but does not answer (busy, on a loaded
            // host) is adopted as running, not torn down as dead: a stop
            // ends it properly later.
            let running = match &state {
                Ok(s) => matches!(s, VmmState::Running | VmmState::Paused),
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "the VMM of this VM is alive but does not answer; adopted as running");
                    true
                }
            };
            if matches!(state, Ok(VmmState::Paused)) {
                // Kennel pauses a VM only for a moment (a checkpoint): one
                // paused now was left so by a restart, and goes on.
                match self.vmm.resume(&r.machine).await {
                    Ok(()) => {
                        tracing::warn!(vm = %name, "resumed a VM that a restart left paused (mid-checkpoint)")
                    }
                    Err(e) => {
                        tracing::error!(vm = %name, error = %e, "could not resume a VM a restart left paused")
                    }
                }
            }
            if running {
                tracing::info!(vm = %name, "adopted a running VM");
            } else {
                // Dead VMM: stop its virtiofsd, drop its TAP, clear stale files.
                let _ = self.vmm.force_stop(&r.machine).await;
                Virtiofsd::stop(&dir.join("virtiofsd.pid"), &r.machine.virtiofs_socket).await;
                if let NetAttach::Tap { tap, .. } = &r.machine.net {
                    net::delete_tap(self.runner.as_ref(), tap);
                }
                let _ = std::fs::remove_file(&r.machine.pid_file);
                let _ = std::fs::remove_file(&r.machine.control_socket);
            }
            out.push((name, running));
        }
        // TAPs on our bridge whose VM is gone (a crash between TAP and record).
        if let NetworkMode::Bridge(b) = &self.s.network {
            let ours: Vec<String> = out
                .iter()
                .filter_map(|(n, _)| self.record(n))
                .filter_map(|r| match r.machine.net {
                    NetAttach::Tap { tap, .. } => Some(tap),
                    NetAttach::User { .. } => None,
                })
                .collect();
            let brif = Path::new("/sys/class/net").join(&b.name).join("brif");
            if let Ok(rd) = std::fs::read_dir(brif) {
                for e in rd.filter_map(Result::ok) {
                    let tap = e.file_name().to_string_lossy().into_owned();
                    if tap.starts_with("kt") && !ours.contains(&tap) {
                        tracing::warn!(%tap, "removing an orphaned TAP");
                        net::delete_tap(self.runner.as_ref(), &tap);
                    }
                }
            }
        }
        // Slots whose VM directory is gone.
        if let Ok(slots) = self.store.call(|c| repo::all_slots(c)).await {
            for (project, _) in slots {
                if !vms.join(&project).exists() {
                    let p = project.clone();
                    let _ = self.store.call(move |c| repo::release_slot(c, &p)).await;
                }
            }
        }
        // Image builds interrupted mid-way (work directories and the mounts
        // mmdebstrap made in them), unless a build is running now.
        Images::new(&self.s.data_dir.join("images")).clean_interrupted();
        out
    }

    /// Finishes the renames a restart cut off. The store renames a project
    /// and moves its slot to the new name in one transaction, so the slot
    /// table says which name owns a VM: a directory `OLD` whose slot now
    /// belongs to a `NEW` without a directory was cut off before it moved;
    /// a directory `NEW` whose record still says `OLD`, while it moved.
    async fn finish_renames(&self) {
        let Ok(slots) = self.store.call(|c| repo::all_slots(c)).await else {
            return;
        };
        let vms = self.s.data_dir.join("vms");
        let names: Vec<String> = std::fs::read_dir(&vms)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            let Some(r) = self.record(&name) else {
                continue;
            };
            let to = if r.project != name {
                Some(name.clone())
            } else if slots.iter().any(|(p, _)| *p == name) {
                None
            } else {
                slots
                    .iter()
                    .find(|(p, slot)| *slot == r.slot && !vms.join(p).exists())
                    .map(|(p, _)| p.clone())
            };
            let Some(to) = to else {
                continue;
            };
            let from = r.project.clone();
            match self.move_vm(&from, &to, r) {
                Ok(_) => {
                    tracing::warn!(from = %from, to = %to, "finished a rename that a restart cut off")
                }
                Err(e) => {
                    tracing::warn!(from = %from, to = %to, error = %e, "cannot finish a rename that a restart cut off")
                }
            }
        }
    }

    /// Removes the sources whose making a restart cut off (a clone, a new
    /// repository, a copy): only what that attempt made, and only beneath
    /// a projects root, reached without links.
    fn remove_cut_off_sources(&self) {
        let dir = self.s.data_dir.join("pending-sources");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.filter_map(Result::ok) {
            let marker = e.path();
            match crate::source::remove_pending(&marker, &self.s.project_roots) {
                Ok(path) => {
                    tracing::warn!(project = %e.file_name().to_string_lossy(), path = %path.display(),
                    "removed a half-made source that a restart cut off")
                }
                Err(why) => tracing::warn!(marker = %marker.display(), error = %why,
                    "cannot remove a half-made source; left as it is"),
            }
        }
    }

    /// Removes everything of a VM but the source. Best effort: used by
    /// destroy and by rollback.
    pub(super) async fn teardown(&self, name: &str, record: Option<&VmRecord>) {
        let dir = self.vm_dir(name);
        if let Some(r) = record {
            let _ = self.vmm.force_stop(&r.machine).await;
            Virtiofsd::stop(&dir.join("virtiofsd.pid"), &r.machine.virtiofs_socket).await;
            if let NetAttach::Tap { tap, .. } = &r.machine.net {
                net::delete_tap(self.runner.as_ref(), tap);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.key_dir(name));
        crate::cgroup::remove(name);
        let n = name.to_owned();
        if let Err(e) = self.store.call(move |c| repo::release_slot(c, &n)).await {
            tracing::warn!(vm = name, error = %e, "could not release the VM's slot");
        }
    }
}
