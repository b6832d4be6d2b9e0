//! Stack images: the base recipe (`images/base/`) plus a stack's packages,
//! built with mmdebstrap into an ext4 file, cached by a content hash of
//! every input (recipe files, stack file, kernel manifest).
//!
//! Images are immutable: an image whose inputs did not change is never
//! rebuilt; a build happens in a temporary directory and is published by
//! one rename, so a failure leaves no half image. Project disks are
//! copy-on-write children of an image, so an image stays while any VM
//! references it (a `vms/<name>/image` file naming its id); `remove` and
//! `prune` only delete unreferenced ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kernel::KernelManifest;
use crate::process::{Cmd, RunError, Runner};
use crate::stacks::Stack;

/// The recipe's data file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    pub suite: String,
    pub variant: String,
    pub packages: Vec<String>,
    #[serde(default)]
    pub dpkg_exclude: Vec<String>,
    #[serde(default)]
    pub dpkg_include: Vec<String>,
}

/// What went wrong with images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read the image recipe in {path}")]
    Recipe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    RecipeInvalid { path: PathBuf, message: String },
    #[error("image builds need root (mmdebstrap --mode=root, mkfs.ext4 -d keeps file owners); run `kennel image build` as root")]
    NotRoot,
    #[error("path {0} contains characters that cannot be passed to mmdebstrap hooks; move it")]
    UnsafePath(PathBuf),
    #[error("{step} failed")]
    Run {
        step: &'static str,
        #[source]
        source: RunError,
    },
    #[error("no image {0}; see `kennel image ls`")]
    NotFound(String),
    #[error("image {id} is in use by {users}; remove those projects first")]
    InUse { id: String, users: String },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The base recipe, loaded and hashed.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub dir: PathBuf,
    pub file: RecipeFile,
    /// SHA-256 over recipe.toml, customize.sh and every overlay file
    /// (path, mode and bytes).
    pub digest: String,
}

impl Recipe {
    /// Loads `dir/recipe.toml` and hashes the whole recipe folder.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("recipe.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Recipe {
            path: path.clone(),
            source,
        })?;
        let file: RecipeFile = toml::from_str(&text).map_err(|e| ImageError::RecipeInvalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut h = Sha256::new();
        let mut entries: Vec<PathBuf> = walkdir::WalkDir::new(dir)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().to_owned())
            .collect();
        entries.sort();
        for p in entries {
            use std::os::unix::fs::PermissionsExt;
            let rel = p.strip_prefix(dir).unwrap_or(&p);
            let meta = std::fs::metadata(&p).map_err(io(&p))?;
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            h.update(rel.to_string_lossy().as_bytes());
            h.update(meta.permissions().mode().to_le_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        Ok(Self {
            dir: dir.to_owned(),
            file,
            digest: hex::encode(h.finalize()),
        })
    }
}

/// What `image ls` shows about an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// `<stack>-<hash>`.
    pub id: String,
    pub stack: String,
    pub hash: String,
    pub kernel_release: String,
    pub packages: Vec<String>,
    /// Apparent size of the root filesystem file.
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub built_at: i64,
    /// Seconds the build took.
    pub build_seconds: f64,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl ImageInfo {
    /// The ext4 root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
}

/// The version of this builder's behaviour. Bump it whenever a change to
/// the code below changes what an image contains, so cached images built
/// the old way are not taken for new ones.
const BUILDER_VERSION: &[u8] = b"kennel-image-v3";

/// The content hash of an image: builder version, recipe, stack file, kernel.
pub fn content_hash(recipe: &Recipe, stack: &Stack, kernel: &KernelManifest) -> String {
    let mut h = Sha256::new();
    h.update(BUILDER_VERSION);
    h.update(b"\0");
    h.update(recipe.digest.as_bytes());
    h.update(b"\0");
    h.update(stack.source.as_bytes());
    h.update(b"\0");
    h.update(kernel.digest().as_bytes());
    let full = hex::encode(h.finalize());
    full.get(..16).unwrap_or(&full).to_owned()
}

/// What every image build shares: the recipe, the kernel, apt.
#[derive(Debug, Clone)]
pub struct BuildEnv<'a> {
    pub recipe: &'a Recipe,
    pub kernel: &'a KernelManifest,
    /// apt sources for the image (a sources.list or deb822 file).
    pub apt_sources: &'a Path,
    /// Where downloaded .debs are kept between builds, if anywhere (one
    /// folder per suite inside it).
    pub apt_cache: Option<&'a Path>,
    /// The guest kernel's module tree ([`crate::kernel::KernelSet::module_tree`]),
    /// copied into the image.
    pub modules: Option<&'a Path>,
}

/// The image store: `<data_dir>/images`.
#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
}

/// What one of mmdebstrap's "I: ..." lines says, short enough for a chat
/// progress line: hooks by their kind (not their long command lines), the
/// rest as it is, and nothing for lines that say nothing to a person.
fn mmdebstrap_step(m: &str) -> Option<String> {
    if let Some(rest) = m.strip_prefix("running --") {
        let hook = rest.split(['-', ' ']).next().unwrap_or("a");
        return Some(format!("running the {hook} hook"));
    }
    if m.starts_with("running special hook") {
        return Some("saving downloaded packages for the next build".into());
    }
    if m.starts_with("chroot architecture") || m.starts_with("finding correct signed-by") {
        return None;
    }
    Some(m.chars().take(100).collect())
}

/// Characters that would change the meaning of a mmdebstrap hook string.
fn safe_for_hooks(p: &Path) -> bool {
    p.to_str().is_some_and(|s| {
        !s.chars()
            .any(|c| c.is_whitespace() || "'\"`$\\;&|<>(){}*?[]!#~".contains(c))
    })
}

impl Images {
    /// The store at `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every built image, newest first.
    pub fn list(&self) -> Vec<ImageInfo> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<ImageInfo> = rd
            .filter_map(Result::ok)
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.starts_with('.') && !n.starts_with("kernel-")
            })
            .filter_map(|e| {
                let p = e.path();
                let bytes = std::fs::read(p.join("image.json")).ok()?;
                let mut info: ImageInfo = serde_json::from_slice(&bytes).ok()?;
                info.dir = p;
                Some(info)
            })
            .collect();
        v.sort_by(|a, b| b.built_at.cmp(&a.built_at).then(a.id.cmp(&b.id)));
        v
    }

    /// An image by id, or the one of `stack` with `hash`.
    pub fn get(&self, id: &str) -> Option<ImageInfo> {
        self.list().into_iter().find(|i| i.id == id)
    }

    /// Returns the image for `stack`, building it if its inputs changed.
    /// The boolean says whether a build happened.
    pub fn ensure(
        &self,
        env: &BuildEnv<'_>,
        base: &Stack,
        stack: &Stack,
        runner: &dyn Runner,
        step: &mut dyn FnMut(&str),
    ) -> Result<(ImageInfo, bool), ImageError> {
        let (recipe, kernel) = (env.recipe, env.kernel);
        let hash = content_hash(recipe, stack, kernel);
        let id = format!("{}-{hash}", stack.name());
        if let Some(info) = self.get(&id) {
            return Ok((info, false));
        }
        if !rustix::process::geteuid().is_root() {
            return Err(ImageError::NotRoot);
        }
        for p in [recipe.dir.as_path(), self.dir.as_path(), env.apt_sources]
            .into_iter()
            .chain(env.apt_cache)
        {
            if !safe_for_hooks(p) {
                return Err(ImageError::UnsafePath(p.to_owned()));
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        // One build at a time per image: whoever waited finds the image the
        // other just built. Different images build side by side (they
        // share the package cache only through atomic renames).
        let lock_path = build_lock(&self.dir, &id);
        let _lock = match try_lock_file(&lock_path) {
            Some(l) => l,
            None => {
                step("waiting for another build of this image to finish");
                lock_file(&lock_path).map_err(io(&self.dir))?
            }
        };
        if let Some(info) = self.get(&id) {
            return Ok((info, false));
        }
        let work = self.dir.join(format!(".tmp-{id}-{}", std::process::id()));
        let _ = remove_work_dir(&work);
        std::fs::create_dir_all(&work).map_err(io(&work))?;
        let started = std::time::Instant::now();
        let result = build(env, base, stack, runner, step, &work, &id, &hash);
        let out = match result {
            Ok(mut info) => {
                info.build_seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
                let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
                let meta = work.join("image.json");
                std::fs::write(&meta, json).map_err(io(&meta))?;
                let _ = std::fs::remove_dir_all(work.join("root"));
                let dest = self.dir.join(&id);
                match std::fs::rename(&work, &dest) {
                    Ok(()) => {
                        info.dir = dest;
                        Ok((info, true))
                    }
                    // Another process built the same inputs meanwhile: same image.
                    Err(_) if self.get(&id).is_some() => {
                        let _ = std::fs::remove_dir_all(&work);
                        self.get(&id)
                            .map(|i| (i, false))
                            .ok_or(ImageError::NotFound(id.clone()))
                    }
                    Err(e) => Err(io(&dest)(e)),
                }
            }
            Err(e) => Err(e),
        };
        if work.exists() {
            let _ = remove_work_dir(&work);
        }
        out
    }

    /// Removes what interrupted builds left in the store (`.tmp-*` work
    /// directories and the mounts mmdebstrap made inside them), unless a
    /// build is running now: another process may share the store. Returns
    /// the directories removed.
    pub fn clean_interrupted(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            // `.tmp-<id>-<pid>` (or `.tmp-kernel-…-<pid>`): left alone
            // while a build of that image (or a kernel build) holds its lock.
            let Some(rest) = name.strip_prefix(".tmp-") else {
                continue;
            };
            let lock = if rest.starts_with("kernel-") {
                self.dir.join(".kernel.lock")
            } else {
                let id = rest.rsplit_once('-').map_or(rest, |(id, _)| id);
                build_lock(&self.dir, id)
            };
            let Some(_idle) = try_lock_file(&lock) else {
                continue;
            };
            let path = e.path();
            match remove_work_dir(&path) {
                Ok(unmounted) => {
                    tracing::warn!(dir = %path.display(), unmounted = unmounted.len(),
                        "removed what an interrupted image build left");
                    removed.push(path);
                }
                Err(err) => tracing::error!(dir = %path.display(), %err,
                    "cannot remove what an interrupted image build left; remove it by hand"),
            }
        }
        removed
    }
}

/// Mount points at or below `dir`, deepest first (from
/// /proc/self/mountinfo, whose fifth field is the mount point with
/// space, tab, newline and backslash written as octal escapes).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(rest.get(..i).unwrap_or_default());
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = rest.get(i + 4..).unwrap_or_default();
            }
            None => {
                out.push('\\');
                rest = rest.get(i + 1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes a build's work directory. Mounts inside it (an interrupted
/// mmdebstrap leaves `root/proc`, `root/sys`, `root/dev/pts`, ...) are
/// detached first: `remove_dir_all` would otherwise walk into them. If a
/// mount cannot be detached, nothing is removed. Returns the mounts
/// detached.
pub fn remove_work_dir(work: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mounts = mounts_under(work);
    for m in &mounts {
        rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH)
            .map_err(std::io::Error::from)?;
    }
    if let Some(m) = mounts_under(work).first() {
        return Err(std::io::Error::other(format!(
            "{} is still mounted",
            m.display()
        )));
    }
    match std::fs::remove_dir_all(work) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(mounts),
    }
}

#[allow(clippy::too_many_arguments)]
fn build(
    env: &BuildEnv<'_>,
    base: &Stack,
    stack: &Stack,
    runner: &dyn Runner,
    step: &mut dyn FnMut(&str),
    work: &Path,
    id: &str,
    hash: &str,
) -> Result<ImageInfo, ImageError> {
    let (recipe, kernel) = (env.recipe, env.kernel);
    let mut packages: Vec<String> = recipe.file.packages.clone();
    for p in base.file.packages.iter().chain(&stack.file.packages) {
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    // The stack's environment and first-boot step, as files for the hook.
    let stack_env = work.join("stack.env");
    let env_text: String = base
        .file
        .env
        .iter()
        .chain(&stack.file.env)
        .map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', "'\\''")))
        .collect();
    std::fs::write(&stack_env, env_text).map_err(io(&stack_env))?;
    let first_boot = work.join("first-boot.sh");
    let fb = stack
        .file
        .first_boot
        .as_ref()
        .map(|f| format!("#!/bin/sh\nset -e\n{}\n", f.script))
        .unwrap_or_default();
    std::fs::write(&first_boot, fb).map_err(io(&first_boot))?;
    let image_steps = work.join("image-steps.sh");
    let steps: String = [&base.file.image_steps, &stack.file.image_steps]
        .into_iter()
        .flatten()
        .map(|s| format!("{s}\n"))
        .collect();
    std::fs::write(&image_steps, steps).map_err(io(&image_steps))?;

    let root = work.join("root");
    let mut cmd = Cmd::new("mmdebstrap")
        .args(["--mode=root", "--format=directory"])
        .arg(format!("--variant={}", recipe.file.variant))
        .arg(format!("--include={}", packages.join(",")));
    // Packages such as openjdk register man-page alternatives in their
    // postinst; with man pages excluded, the directory must still exist.
    cmd = cmd.arg("--essential-hook=mkdir -p \"$1\"/usr/share/man/man1");
    // No fsync per unpacked file while building (the image is written
    // out by mkfs afterwards); customize.sh drops the option again, so
    // apt in the VM syncs as usual.
    cmd = cmd.arg("--dpkgopt=force-unsafe-io");
    for x in &recipe.file.dpkg_exclude {
        cmd = cmd.arg(format!("--dpkgopt=path-exclude={x}"));
    }
    for x in &recipe.file.dpkg_include {
        cmd = cmd.arg(format!("--dpkgopt=path-include={x}"));
    }
    let cache = env.apt_cache.map(|c| c.join(&recipe.file.suite));
    if let Some(cache) = &cache {
        if !safe_for_hooks(cache) {
            return Err(ImageError::UnsafePath(cache.clone()));
        }
        std::fs::create_dir_all(cache).map_err(io(cache))?;
        // Reuse downloaded packages between builds (mmdebstrap's own recipe).
        // What this build downloaded goes to its own folder first and into
        // the cache afterwards, file by file with a rename, so builds side
        // by side never see a half-written package.
        let debs = work.join("debs");
        std::fs::create_dir_all(&debs).map_err(io(&debs))?;
        cmd = cmd
                .arg("--skip=download/empty")
                .arg("--essential-hook=mkdir -p \"$1\"/var/cache/apt/archives")
                .arg(format!("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives && cp -a {}/. \"$1\"/var/cache/apt/archives/", cache.display()))
                .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", debs.display()));
    }
    let hook = recipe.dir.join("customize.sh");
    cmd = cmd
        .arg(format!("--customize-hook={}", hook.display()))
        .arg("--customize-hook=rm -rf \"$1\"/var/cache/apt/archives/*.deb")
        .arg(&recipe.file.suite)
        .arg(&root)
        .arg(env.apt_sources)
        .env("KENNEL_RECIPE", &recipe.dir.to_string_lossy())
        .env("KENNEL_STACK", stack.name())
        .env("KENNEL_STACK_ENV", &stack_env.to_string_lossy())
        .env("KENNEL_FIRST_BOOT", &first_boot.to_string_lossy())
        .env("KENNEL_IMAGE_STEPS", &image_steps.to_string_lossy());
    if let Some(m) = env.modules {
        cmd = cmd.env("KENNEL_MODULES", &m.to_string_lossy());
    }
    step(&format!(
        "mmdebstrap {} with {} packages",
        recipe.file.suite,
        packages.len()
    ));
    // mmdebstrap's "I: ..." lines say what it is doing (downloading,
    // extracting, installing, hooks): passed on as they come.
    runner
        .run_lines(&cmd, &mut |line| {
            if let Some(m) = line.strip_prefix("I: ").and_then(mmdebstrap_step) {
                step(&m);
            }
        })
        .map_err(|source| ImageError::Run {
            step: "mmdebstrap",
            source,
        })?;
    if let Some(cache) = &cache {
        merge_debs(&work.join("debs"), cache);
    }

    // Size: what the tree holds, plus a quarter and 256 MiB of room,
    // rounded up to 64 MiB. VM disks are larger; the guest grows it.
    let used: u64 = walkdir::WalkDir::new(&root)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .sum();
    let mib = (used / (1 << 20)) * 5 / 4 + 256;
    let mib = mib.div_ceil(64) * 64;
    let rootfs = work.join("rootfs.ext4");
    step(&format!(
        "writing the {mib} MiB root filesystem (mkfs.ext4)"
    ));
    crate::disk::mkfs_from_dir(runner, &root, &rootfs, "kennelroot", &format!("{mib}M")).map_err(
        |source| ImageError::Run {
            step: "mkfs.ext4",
            source,
        },
    )?;
    let size_bytes = std::fs::metadata(&rootfs).map_err(io(&rootfs))?.len();
    Ok(ImageInfo {
        id: id.to_owned(),
        stack: stack.name().to_owned(),
        hash: hash.to_owned(),
        kernel_release: kernel.kernel_release.clone(),
        packages,
        size_bytes,
        built_at: time_now(),
        build_seconds: 0.0,
        dir: PathBuf::new(),
    })
}

impl Images {
    /// Which VMs reference which image: `vms/<name>/image` holds an id.
    pub fn references(vms_dir: &Path) -> BTreeMap<String, Vec<String>> {
        let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(vms_dir) {
            for e in rd.filter_map(Result::ok) {
                if let Ok(id) = std::fs::read_to_string(e.path().join("image")) {
                    refs.entry(id.trim().to_owned())
                        .or_default()
                        .push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        refs
    }

    /// Removes an image unless a VM references it.
    pub fn remove(&self, id: &str, vms_dir: &Path) -> Result<ImageInfo, ImageError> {
        let info = self
            .get(id)
            .ok_or_else(|| ImageError::NotFound(id.to_owned()))?;
        if let Some(users) = Self::references(vms_dir).get(id) {
            return Err(ImageError::InUse {
                id: id.to_owned(),
                users: users.join(", "),
            });
        }
        std::fs::remove_dir_all(&info.dir).map_err(io(&info.dir))?;
        Ok(info)
    }

    /// Removes every image no VM references and that is not the newest of
    /// its stack. Returns what was removed.
    pub fn prune(&self, vms_dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
        let refs = Self::references(vms_dir);
        let mut newest: BTreeSet<String> = BTreeSet::new();
        let mut removed = Vec::new();
        for info in self.list() {
            // list() is newest first: the first of each stack is kept.
            if newest.insert(info.stack.clone()) || refs.contains_key(&info.id) {
                continue;
            }
            std::fs::remove_dir_all(&info.dir).map_err(io(&info.dir))?;
            removed.push(info);
        }
        Ok(removed)
    }
}

/// Takes an exclusive lock on `path` (made if missing), waiting for it;
/// released when the returned file is dropped.
/// The lock a build of image `id` holds in the store `dir`.
fn build_lock(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!(".build-{id}.lock"))
}

/// Moves the packages a build downloaded into the shared cache: each new
/// one is copied under a temporary name, then renamed (a package's file
/// name is its name, version and architecture: the same name is the same
/// file). Best effort: a package not cached is downloaded again next time.
fn merge_debs(from: &Path, cache: &Path) {
    let Ok(rd) = std::fs::read_dir(from) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let dest = cache.join(&name);
        if !name.to_string_lossy().ends_with(".deb") || dest.exists() {
            continue;
        }
        let part = cache.join(format!(
            "{}.part-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if std::fs::copy(e.path(), &part).is_ok() && std::fs::rename(&part, &dest).is_ok() {
            continue;
        }
        let _ = std::fs::remove_file(&part);
    }
}

pub fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.lock()?;
    Ok(f)
}

/// Like [`lock_file`], but gives up at once if someone holds it.
pub fn try_lock_file(path: &Path) -> Option<std::fs::File> {
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    f.try_lock().ok()?;
    Some(f)
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::FakeRunner;
    use crate::stacks::parse_stack;

    fn stack(name: &str, extra: &str) -> Stack {
        let text = format!("name = \"{name}\"\nsummary = \"x\"\n{extra}");
        parse_stack(Path::new("s.toml"), name, &text).unwrap()
    }

    fn recipe() -> Recipe {
        Recipe::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/base")).unwrap()
    }

    fn manifest() -> KernelManifest {
        KernelManifest {
            package: "linux-image-x".into(),
            package_version: "1".into(),
            kernel_release: "6.1.0-x".into(),
            busybox_version: "1".into(),
            modules: vec![],
            module_tree: false,
            sha256: BTreeMap::new(),
        }
    }

    #[test]
    fn mmdebstrap_lines_become_short_steps() {
        assert_eq!(
            mmdebstrap_step(
                "running --customize-hook in shell: sh -c 'rm -rf \"$1\"/x' exec /long/path"
            )
            .as_deref(),
            Some("running the customize hook")
        );
        assert_eq!(
            mmdebstrap_step("chroot architecture amd64 is equal to the host's architecture"),
            None
        );
        assert_eq!(
            mmdebstrap_step("installing essential packages...").as_deref(),
            Some("installing essential packages...")
        );
        assert!(mmdebstrap_step(&"x".repeat(500)).unwrap().len() <= 100);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/odd\\x"), "/odd\\x");
    }

    #[test]
    fn hashes_change_with_every_input() {
        let r = recipe();
        let a = content_hash(&r, &stack("rust", ""), &manifest());
        assert_eq!(a, content_hash(&r, &stack("rust", ""), &manifest()));
        assert_ne!(
            a,
            content_hash(&r, &stack("rust", "app_port = 9\n"), &manifest())
        );
        let mut m = manifest();
        m.package_version = "2".into();
        assert_ne!(a, content_hash(&r, &stack("rust", ""), &m));
        let mut r2 = r.clone();
        r2.digest = "other".into();
        assert_ne!(a, content_hash(&r2, &stack("rust", ""), &manifest()));
    }

    #[test]
    fn a_failed_build_leaves_nothing_behind() {
        if !rustix::process::geteuid().is_root() {
            return; // NotRoot is checked before anything is written; see below.
        }
        let d = tempfile::tempdir().unwrap();
        let images = Images::new(&d.path().join("images"));
        let runner = FakeRunner {
            script: vec![("mmdebstrap".into(), Err("E: cannot download".into()))],
            ..Default::default()
        };
        let sources = d.path().join("sources");
        std::fs::write(&sources, "").unwrap();
        let (r, m) = (recipe(), manifest());
        let env = BuildEnv {
            recipe: &r,
            kernel: &m,
            apt_sources: &sources,
            apt_cache: None,
            modules: None,
        };
        let e = images
            .ensure(
                &env,
                &stack("base", ""),
                &stack("rust", ""),
                &runner,
                &mut |_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("mmdebstrap failed"), "{e}");
        assert!(images.list().is_empty());
        let left: Vec<String> = std::fs::read_dir(images.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(left.is_empty(), "no temp dir left: {left:?}");
    }

    #[test]
    fn images_in_use_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let images = Images::new(&d.path().join("images"));
        for (id, at) in [("rust-aaaa", 1), ("rust-bbbb", 2), ("node-cccc", 1)] {
            let dir = images.dir().join(id);
            std::fs::create_dir_all(&dir).unwrap();
            let (stack, hash) = id.split_once('-').unwrap();
            let info = ImageInfo {
                id: id.into(),
                stack: stack.into(),
                hash: hash.into(),
                kernel_release: "k".into(),
                packages: vec![],
                size_bytes: 1,
                built_at: at,
                build_seconds: 1.0,
                dir: PathBuf::new(),
            };
            std::fs::write(dir.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        }
        let vms = d.path().join("vms");
        std::fs::create_dir_all(vms.join("demo")).unwrap();
        std::fs::write(vms.join("demo/image"), "rust-aaaa\n").unwrap();
        let e = images.remove("rust-aaaa", &vms).unwrap_err();
        assert!(e.to_string().contains("in use by demo"), "{e}");
        assert!(
            images.prune(&vms).unwrap().is_empty(),
            "old but referenced, or newest"
        );
        std::fs::remove_file(vms.join("demo/image")).unwrap();
        let pruned = images.prune(&vms).unwrap();
        assert_eq!(
            pruned.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["rust-aaaa"]
        );
        assert!(matches!(
            images.remove("nope", &vms),
            Err(ImageError::NotFound(_))
        ));
    }
}
