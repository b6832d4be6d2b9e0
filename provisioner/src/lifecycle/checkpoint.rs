//! Checkpoints of a VM: its root disk, copy-on-write, and a copy of its
//! source, kept in `vms/<name>/checkpoints/`:
//!
//! ```text
//! checkpoints/<label>.qcow2     the disk as it was: a read-only qcow2 layer
//! checkpoints/<label>/source/   the source as it was (links kept as links)
//! ```
//!
//! **Taking one** freezes the disk's current top layer and puts a new,
//! empty child on it: `disk.next.qcow2` (a child of `<label>.qcow2`, not
//! yet existing) is made, `disk.qcow2` is hard-linked as `<label>.qcow2`,
//! and `disk.next.qcow2` renamed over `disk.qcow2`. A running QEMU VM is
//! switched to the child live (QMP `blockdev-snapshot-sync`, mode
//! `existing`) between the link and the rename, while paused, so the disk
//! part takes the same few milliseconds whatever the disk holds. The
//! source is copied while the VM is paused too, so both are of one
//! moment (reflinks where the filesystem has them). The `<label>/`
//! directory is renamed into place last: it is what makes a checkpoint
//! complete.
//!
//! **A layer without its `<label>/` directory** (removed, or half-made
//! when Kennel died) is garbage: while the VM is stopped it is merged into
//! the one layer that reads through it (`qemu-img rebase`) and deleted.
//!
//! **Rolling back** (VM stopped) copies the checkpoint's source beside
//! the project's (`<source>.kennel-rollback`), writes a journal
//! (`rollback.json`: the point of no return), then puts a new empty child
//! of `<label>.qcow2` in place as the disk and swaps the source
//! directories. A restart that finds the journal finishes the job, so a
//! crash leaves the project as before or as after, never a mix.

use std::time::Instant;

use kennel_core::provision::CheckpointTaken;

use super::*;

/// Written when a rollback passes its point of no return.
#[derive(Debug, Serialize, Deserialize)]
struct RollbackJournal {
    label: String,
    source: PathBuf,
}

const JOURNAL: &str = "rollback.json";

/// A stopped VM's next top layer, before it is renamed to `disk.qcow2`.
const NEXT: &str = "disk.next.qcow2";

/// A running VM's next top layer (`disk.live-<ns>.qcow2`), before it is
/// renamed to `disk.qcow2`: see [`LocalProvisioner::freeze_disk`].
const LIVE_PREFIX: &str = "disk.live-";

/// How long the guest's `sync` before a live checkpoint may take (an SSH
/// login and the flush; under emulation on a loaded host, measured past
/// 10 s). The VM is not paused meanwhile; past it, the checkpoint is
/// crash-consistent only, and says so in the log.
const SYNC_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

impl LocalProvisioner {
    fn checkpoints_dir(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("checkpoints")
    }

    fn layer(&self, name: &str, label: &str) -> PathBuf {
        self.checkpoints_dir(name).join(format!("{label}.qcow2"))
    }

    fn kept(&self, name: &str, label: &str) -> PathBuf {
        self.checkpoints_dir(name).join(label)
    }

    pub(super) async fn checkpoint_inner(
        &self,
        project: &ProjectName,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<CheckpointTaken, ProvisionError> {
        let name = project.as_str();
        check_label(label)?;
        let _g = self.lock(name).await;
        let r = self
            .record(name)
            .ok_or_else(|| ProvisionError::NoVm(name.to_owned()))?;
        self.check_source(&r.source, Stage::Disk)?;
        let dir = self.checkpoints_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        let (layer, kept) = (self.layer(name, label), self.kept(name, label));
        if kept.exists() {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!("{name} has a checkpoint '{label}' already"),
            });
        }
        if layer.exists() {
            // Half-made or removed, and still read through by the disk:
            // merged at the next stop. Its name is not free until then.
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!(
                    "the label '{label}' of {name} is still in use by a removed checkpoint until the VM next stops; pick another"
                ),
            });
        }
        let running = self.runs(&r, Stage::Disk).await?;
        if running && !cut_off_layers(&r.machine.disk).is_empty() {
            // Which file the VM writes to is settled while it is stopped.
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!(
                    "a checkpoint of {name} was cut off by a restart while it ran; stop and start {name} (which finishes it), then take the checkpoint"
                ),
            });
        }
        if running && !self.vmm.live_checkpoints() {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!(
                    "{} cannot switch a running VM's disk to a new layer; stop {name} first, then take the checkpoint",
                    self.vmm.describe()
                ),
            });
        }
        if !running {
            self.settle_cut_off(&r).await?;
        }
        let partial = dir.join(format!(".partial-{label}"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        if running {
            // What the guest has written but holds in its page cache goes
            // to the disk first; what it writes after is as after a power
            // cut (the journal's business), like any crash-consistent
            // snapshot.
            match tokio::time::timeout(SYNC_LIMIT, self.ssh_exec(&r, "sync")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(vm = name, error = %e, "sync in the guest before a checkpoint failed")
                }
                Err(_) => tracing::warn!(
                    vm = name,
                    "sync in the guest before a checkpoint took too long"
                ),
            }
        }
        let paused_at = Instant::now();
        if running {
            self.vmm
                .pause(&r.machine)
                .await
                .map_err(|e| failed(Stage::Disk, format!("cannot pause the VM: {e}")))?;
        }
        let mut cost = CheckpointTaken::default();
        let made = async {
            step(
                progress,
                Stage::Disk,
                Some(format!("checkpoint {label}: copying the source")),
            );
            let t = Instant::now();
            let (from, to) = (r.source.clone(), partial.join("source"));
            cost.reflinked = self
                .blocking(Stage::Disk, move |runner| copy_tree(runner, &from, &to))
                .await?;
            cost.source_ms = ms(t);
            step(
                progress,
                Stage::Disk,
                Some(format!("checkpoint {label}: the disk")),
            );
            let t = Instant::now();
            self.freeze_disk(&r, &layer, running).await?;
            cost.disk_ms = ms(t);
            kennel_core::fault::point("checkpoint-files");
            std::fs::rename(&partial, &kept).map_err(|e| failed(Stage::Disk, e.to_string()))
        }
        .await;
        if running {
            if let Err(e) = self.vmm.resume(&r.machine).await {
                tracing::error!(vm = name, error = %e, "could not resume the VM after a checkpoint");
            }
            cost.paused_ms = ms(paused_at);
        }
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        cost.disk_bytes = disk::allocated_bytes(&layer);
        let (l, d) = (layer.clone(), dir.clone());
        cost.disk_shared_bytes = self
            .blocking(Stage::Disk, move |runner| Ok(shared_below(runner, &l, &d)))
            .await
            .unwrap_or(0);
        let (bytes, files) = tree_size(&kept.join("source"));
        cost.source_bytes = bytes;
        cost.source_files = files;
        cost.git_head = git_head(&kept.join("source"));
        Ok(cost)
    }

    /// Freezes the disk's top layer as `layer` and gives the VM a new,
    /// empty one on it.
    ///
    /// A running VM's new layer is made under a name used once
    /// (`disk.live-<ns>.qcow2`), then renamed to `disk.qcow2`. QEMU knows
    /// each layer by the name it opened it under, and at the next switch
    /// reopens the layer it freezes, read-only, *by that name*: had the
    /// name been reused for the next new layer (as `disk.next.qcow2` once
    /// was), the frozen layer would be read from the new, empty file,
    /// and the guest would see the writes of the layer between two live
    /// checkpoints of one boot vanish. A name that no longer exists makes
    /// that reopen fail, and QEMU keeps the file it has open.
    async fn freeze_disk(
        &self,
        r: &VmRecord,
        layer: &Path,
        running: bool,
    ) -> Result<(), ProvisionError> {
        let disk = r.machine.disk.clone();
        let next = if running {
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            disk.with_file_name(format!("{LIVE_PREFIX}{ns}.qcow2"))
        } else {
            disk.with_file_name(NEXT)
        };
        let (d, n, l) = (disk.clone(), next.clone(), layer.to_path_buf());
        self.blocking(Stage::Disk, move |runner| {
            let size = disk::info(runner, &d)?.virtual_size;
            let _ = std::fs::remove_file(&n);
            disk::create_child(runner, &l, &n, size)?;
            std::fs::hard_link(&d, &l).map_err(|e| format!("cannot link the disk: {e}"))
        })
        .await?;
        if running {
            if let Err(e) = self.vmm.switch_disk(&r.machine, &next).await {
                // The VM still writes to the old file: undo the link.
                let _ = std::fs::remove_file(layer);
                let _ = std::fs::remove_file(&next);
                return Err(failed(Stage::Disk, format!("cannot switch the disk: {e}")));
            }
        }
        kennel_core::fault::point("checkpoint-switched");
        std::fs::rename(&next, &disk).map_err(|e| failed(Stage::Disk, e.to_string()))
    }

    pub(super) async fn restore_inner(
        &self,
        project: &ProjectName,
        label: &str,
        progress: &dyn ProgressSink,
    ) -> Result<(), ProvisionError> {
        let name = project.as_str();
        check_label(label)?;
        let _g = self.lock(name).await;
        let r = self
            .record(name)
            .ok_or_else(|| ProvisionError::NoVm(name.to_owned()))?;
        if self.runs(&r, Stage::Disk).await? {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!("{name} runs; stop it before rolling back"),
            });
        }
        let (layer, kept) = (self.layer(name, label), self.kept(name, label));
        if !layer.exists() || !kept.join("source").is_dir() {
            return Err(ProvisionError::Invalid {
                stage: Stage::Disk,
                message: format!("the files of checkpoint '{label}' of {name} are missing"),
            });
        }
        self.check_source(&r.source, Stage::Disk)?;
        step(
            progress,
            Stage::Disk,
            Some(format!("rollback to {label}: copying the source back")),
        );
        let staging = sibling(&r.source, "kennel-rollback")?;
        let (from, to) = (kept.join("source"), staging.clone());
        self.blocking(Stage::Disk, move |runner| {
            let _ = std::fs::remove_dir_all(&to);
            copy_tree(runner, &from, &to).map(|_| ())
        })
        .await?;
        let journal = RollbackJournal {
            label: label.to_owned(),
            source: r.source.clone(),
        };
        let json = serde_json::to_vec(&journal).map_err(|e| failed(Stage::Disk, e.to_string()))?;
        write_synced(&self.vm_dir(name).join(JOURNAL), &json).map_err(|e| {
            failed(
                Stage::Disk,
                format!("cannot write the rollback journal: {e}"),
            )
        })?;
        kennel_core::fault::point("rollback-journal");
        step(
            progress,
            Stage::Disk,
            Some(format!("rollback to {label}: the disk")),
        );
        self.finish_rollback(&r).await?;
        self.compact(&r).await;
        Ok(())
    }

    /// Completes a rollback whose journal is written (again, after a
    /// crash): the disk becomes a new child of the layer, the staged
    /// source replaces the project's. Each step can be done twice.
    async fn finish_rollback(&self, r: &VmRecord) -> Result<(), ProvisionError> {
        let path = self.vm_dir(&r.project).join(JOURNAL);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(());
        };
        let j: RollbackJournal = serde_json::from_slice(&bytes)
            .map_err(|e| failed(Stage::Disk, format!("{}: {e}", path.display())))?;
        check_label(&j.label)?;
        let layer = self.layer(&r.project, &j.label);
        let disk = r.machine.disk.clone();
        let staging = sibling(&j.source, "kennel-rollback")?;
        let replaced = sibling(&j.source, "kennel-replaced")?;
        self.blocking(Stage::Disk, move |runner| {
            let size = disk::info(runner, &layer)?.virtual_size;
            let next = disk.with_file_name(NEXT);
            let _ = std::fs::remove_file(&next);
            disk::create_child(runner, &layer, &next, size)?;
            std::fs::rename(&next, &disk).map_err(|e| e.to_string())?;
            kennel_core::fault::point("rollback-disk");
            if staging.is_dir() {
                if j.source.exists() {
                    if replaced.exists() {
                        return Err(format!(
                            "{} and {} both exist; move one away and start the project again",
                            j.source.display(),
                            replaced.display()
                        ));
                    }
                    std::fs::rename(&j.source, &replaced).map_err(|e| e.to_string())?;
                }
                kennel_core::fault::point("rollback-source");
                std::fs::rename(&staging, &j.source).map_err(|e| e.to_string())?;
            }
            // What was replaced is kept in the checkpoint taken before.
            if replaced.exists() {
                std::fs::remove_dir_all(&replaced).map_err(|e| e.to_string())?;
            }
            std::fs::remove_file(&path).map_err(|e| e.to_string())
        })
        .await
    }

    pub(super) async fn remove_checkpoint_inner(
        &self,
        project: &ProjectName,
        label: &str,
    ) -> Result<(), ProvisionError> {
        let name = project.as_str();
        check_label(label)?;
        let _g = self.lock(name).await;
        let Some(r) = self.record(name) else {
            return Ok(()); // no VM, no files
        };
        let kept = self.kept(name, label);
        if kept.exists() {
            std::fs::remove_dir_all(&kept)
                .map_err(|e| failed(Stage::Destroying, format!("{}: {e}", kept.display())))?;
        }
        // Its layer is garbage now: merged at once if the VM is stopped,
        // else when it next is.
        if !self.may_run(&r).await {
            self.compact(&r).await;
        }
        Ok(())
    }

    /// Settles the new top layers a checkpoint or rollback cut off by a
    /// crash left beside the disk ([`cut_off_layers`]): one whose backing
    /// file is the disk becomes the disk; any other is removed. Only while
    /// the VM is stopped.
    pub(super) async fn settle_cut_off(&self, r: &VmRecord) -> Result<(), ProvisionError> {
        let disk = r.machine.disk.clone();
        for next in cut_off_layers(&disk) {
            // Cut off while taking a checkpoint: if the disk was linked as
            // the new layer already, the child is the disk from now on.
            let (n, d) = (next.clone(), disk.clone());
            let linked = self
                .blocking(Stage::Disk, move |runner| {
                    Ok(disk::info(runner, &n)
                        .ok()
                        .and_then(|i| i.backing)
                        .map(PathBuf::from)
                        .is_some_and(|b| same_file(&b, &d)))
                })
                .await?;
            if linked {
                std::fs::rename(&next, &disk).map_err(|e| failed(Stage::Disk, e.to_string()))?;
            } else {
                let _ = std::fs::remove_file(&next);
            }
        }
        Ok(())
    }

    /// Before a stopped VM boots: finishes a rollback cut off by a crash,
    /// removes half-made checkpoint copies, and merges garbage layers.
    pub(super) async fn tidy_checkpoints(&self, r: &VmRecord) -> Result<(), ProvisionError> {
        let dir = self.checkpoints_dir(&r.project);
        self.settle_cut_off(r).await?;
        self.finish_rollback(r).await?;
        // A rollback cut off before its journal never began: its staged
        // copy of the source goes.
        if let Ok(staging) = sibling(&r.source, "kennel-rollback") {
            if std::fs::symlink_metadata(&staging).is_ok() {
                tracing::info!(vm = %r.project, "removing the staged source of a rollback that never began");
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        // Complete files the store has no row for were cut off between the
        // two: the checkpoint was never taken.
        let known: Vec<String> = match ProjectName::new(&r.project) {
            Ok(n) => self
                .store
                .call(move |c| repo::checkpoints_of(c, &n))
                .await
                .map(|cs| cs.into_iter().map(|c| c.label).collect())
                .map_err(|e| failed(Stage::Disk, e.to_string()))?,
            Err(_) => Vec::new(),
        };
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let unknown = e.path().is_dir() && !known.contains(&file);
                if file.starts_with(".partial-") || unknown {
                    tracing::info!(vm = %r.project, checkpoint = %file, "removing a checkpoint that was never completed");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        self.compact(r).await;
        Ok(())
    }

    /// Merges and deletes garbage layers (no `<label>/` beside them)
    /// while the VM is stopped. A layer two others read through stays
    /// until one of them goes. Failures are logged: the disk still works.
    async fn compact(&self, r: &VmRecord) {
        let dir = self.checkpoints_dir(&r.project);
        let disk = r.machine.disk.clone();
        let out = self
            .blocking(Stage::Disk, move |runner| {
                // Each pass merges one layer; a chain of them takes several.
                for _ in 0..64 {
                    let layers: Vec<PathBuf> = match std::fs::read_dir(&dir) {
                        Ok(rd) => rd
                            .flatten()
                            .map(|e| e.path())
                            .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
                            .collect(),
                        Err(_) => return Ok(()),
                    };
                    let garbage: Vec<&PathBuf> = layers
                        .iter()
                        .filter(|l| !l.with_extension("").is_dir())
                        .collect();
                    if garbage.is_empty() {
                        return Ok(());
                    }
                    let mut infos = Vec::new();
                    for f in layers.iter().chain(std::iter::once(&disk)) {
                        infos.push((f.clone(), disk::info(runner, f)?));
                    }
                    let mut merged = false;
                    for g in garbage {
                        let children: Vec<&PathBuf> = infos
                            .iter()
                            .filter(|(_, i)| i.backing.as_deref() == Some(&*g.to_string_lossy()))
                            .map(|(f, _)| f)
                            .collect();
                        let Some((_, gi)) = infos.iter().find(|(f, _)| f == g) else {
                            continue;
                        };
                        match children.as_slice() {
                            [] => {}
                            [child] => {
                                let Some(parent) = gi.backing.as_deref() else {
                                    continue;
                                };
                                let format = gi.backing_format.as_deref().unwrap_or("qcow2");
                                disk::rebase(runner, child, parent, format)?;
                            }
                            _ => continue,
                        }
                        std::fs::remove_file(g).map_err(|e| e.to_string())?;
                        merged = true;
                        break;
                    }
                    if !merged {
                        return Ok(());
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = out {
            tracing::warn!(vm = %r.project, error = %e, "could not merge removed checkpoints' disk layers; they stay until the next try");
        }
    }

    /// Where a copy of checkpoint `label` reads its disk and source from.
    pub(super) fn checkpoint_files(
        &self,
        name: &str,
        label: &str,
    ) -> Result<(PathBuf, PathBuf), ProvisionError> {
        check_label(label)?;
        let (layer, source) = (
            self.layer(name, label),
            self.kept(name, label).join("source"),
        );
        if !layer.exists() || !source.is_dir() {
            return Err(ProvisionError::Invalid {
                stage: Stage::Validated,
                message: format!("the files of checkpoint '{label}' of {name} are missing"),
            });
        }
        Ok((layer, source))
    }

    /// After a VM directory moved: points every layer's backing file name
    /// into the new directory.
    pub(super) fn repoint_layers(
        &self,
        runner: &dyn Runner,
        old_dir: &Path,
        new_dir: &Path,
    ) -> Result<(), String> {
        let mut files = vec![new_dir.join("disk.qcow2")];
        if let Ok(rd) = std::fs::read_dir(new_dir.join("checkpoints")) {
            files.extend(
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "qcow2")),
            );
        }
        for f in files.iter().filter(|f| f.exists()) {
            let info = disk::info(runner, f)?;
            let Some(b) = info.backing else { continue };
            if let Ok(rest) = Path::new(&b).strip_prefix(old_dir) {
                let to = new_dir.join(rest);
                let format = info.backing_format.as_deref().unwrap_or("qcow2");
                disk::rename_backing(runner, f, &to.to_string_lossy(), format)?;
            }
        }
        Ok(())
    }
}

/// A label as the command language allows it (and never a path).
pub(super) fn check_label(label: &str) -> Result<(), ProvisionError> {
    let ok = !label.is_empty()
        && label.len() <= 32
        && label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !label.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ProvisionError::Invalid {
            stage: Stage::Validated,
            message: format!("{label:?} is not a checkpoint label"),
        })
    }
}

/// `<path>.<suffix>` beside `path` (a project name has no dot, so this
/// never names another project's source).
pub(super) fn sibling(path: &Path, suffix: &str) -> Result<PathBuf, ProvisionError> {
    let file = path
        .file_name()
        .ok_or_else(|| failed(Stage::Disk, format!("{} has no name", path.display())))?;
    let mut name = file.to_os_string();
    name.push(".");
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// Copies the tree `from` to the new path `to`, links as links, owners
/// and modes kept: by reflink if the filesystem can (true), else byte by
/// byte.
pub(super) fn copy_tree(runner: &dyn Runner, from: &Path, to: &Path) -> Result<bool, String> {
    let cp = |how: &str| {
        runner.run(
            &Cmd::new("cp")
                .args(["-a", "--no-target-directory", how])
                .arg(from)
                .arg(to),
        )
    };
    if cp("--reflink=always").is_ok() {
        return Ok(true);
    }
    let _ = std::fs::remove_dir_all(to);
    cp("--reflink=auto").map_err(|e| e.to_string())?;
    Ok(false)
}

/// Bytes (allocated) and files in a tree, links not followed.
pub(super) fn tree_size(root: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            bytes = bytes.saturating_add(disk::allocated_bytes(&e.path()));
            if t.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
            }
        }
    }
    (bytes, files)
}

/// Bytes of the checkpoint layers (in `dir`) that `layer` reads through.
fn shared_below(runner: &dyn Runner, layer: &Path, dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut at = layer.to_path_buf();
    for _ in 0..256 {
        let Some(b) = disk::info(runner, &at).ok().and_then(|i| i.backing) else {
            break;
        };
        let b = PathBuf::from(b);
        if b.parent() != Some(dir) {
            break; // the stack image: not a checkpoint's
        }
        total = total.saturating_add(disk::allocated_bytes(&b));
        at = b;
    }
    total
}

/// The commit a source's `.git/HEAD` names, if it is a repository (read
/// from the copy, validated as a hex object id: nothing else is shown).
pub(super) fn git_head(source: &Path) -> Option<String> {
    let git = source.join(".git");
    if !std::fs::symlink_metadata(&git).ok()?.is_dir() {
        return None;
    }
    let read = |p: &Path| -> Option<String> {
        if std::fs::symlink_metadata(p).ok()?.file_type().is_symlink() {
            return None;
        }
        let s = std::fs::read_to_string(p).ok()?;
        Some(s.lines().next()?.trim().to_owned())
    };
    let head = read(&git.join("HEAD"))?;
    let id = match head.strip_prefix("ref: ") {
        None => head,
        Some(r) if r.starts_with("refs/") && !r.contains("..") => {
            read(&git.join(r)).or_else(|| {
                let packed = std::fs::read_to_string(git.join("packed-refs")).ok()?;
                packed.lines().find_map(|l| {
                    let (id, name) = l.split_once(' ')?;
                    (name == r).then(|| id.to_owned())
                })
            })?
        }
        Some(_) => return None,
    };
    let hex = (id.len() == 40 || id.len() == 64) && id.chars().all(|c| c.is_ascii_hexdigit());
    hex.then_some(id)
}

/// New top layers a checkpoint or rollback cut off by a crash left beside
/// `disk` (not yet renamed to it): `disk.next.qcow2` and the running VM's
/// `disk.live-*.qcow2`, oldest first.
fn cut_off_layers(disk: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = disk
        .parent()
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == NEXT || (n.starts_with(LIVE_PREFIX) && n.ends_with(".qcow2")))
        })
        .collect();
    found.sort_by_key(|p| std::fs::symlink_metadata(p).and_then(|m| m.modified()).ok());
    found
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_never_paths() {
        for bad in ["", "../x", "a/b", "-x", "A", "a.b", &"x".repeat(33)] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
        for good in ["c1", "auto-3", "before-upgrade"] {
            assert!(check_label(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn siblings_stay_beside_the_source() {
        assert_eq!(
            sibling(Path::new("/srv/projects/app"), "kennel-rollback").unwrap(),
            PathBuf::from("/srv/projects/app.kennel-rollback")
        );
    }

    #[test]
    fn git_head_is_read_from_refs_and_packed_refs() {
        let d = tempfile::tempdir().unwrap();
        let git = d.path().join(".git");
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        assert_eq!(git_head(d.path()), None);
        let id = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(
            git.join("packed-refs"),
            format!("# pack\n{id} refs/heads/main\n"),
        )
        .unwrap();
        assert_eq!(git_head(d.path()).as_deref(), Some(id));
        std::fs::write(git.join("refs/heads/main"), "not an id\n").unwrap();
        assert_eq!(git_head(d.path()), None);
        std::fs::write(git.join("HEAD"), "ref: ../../etc/passwd\n").unwrap();
        assert_eq!(git_head(d.path()), None);
    }
}
