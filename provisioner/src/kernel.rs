//! The guest kernel: Debian's cloud kernel, fetched with `apt-get
//! download` (no other network access), and a small initramfs that loads
//! its virtio modules and switches to the root disk.
//!
//! The cloud kernel builds virtio, virtio-blk, virtio-net, virtio-fs and
//! vsock as modules, so the initramfs carries them (in dependency order,
//! resolved from each module's `.modinfo`) plus a static busybox. Artefacts
//! are immutable: `images/kernel-<release>-<version>/` with `vmlinuz`,
//! `initramfs.cpio` and `manifest.json` (versions and SHA-256 of each).
//!
//! Cloud Hypervisor and QEMU both boot the bzImage (`vmlinuz`); measured on
//! CH v54, the Debian cloud kernel (CONFIG_PVH=y) also boots as an ELF
//! `vmlinux`, which `docs/guest.md` explains how to extract.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::process::{Cmd, RunError, Runner};

/// The metapackage that names the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// The package whose `/bin/busybox` runs the initramfs.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules the guest needs before its root disk is mounted.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "virtiofs",
    "vmw_vsock_virtio_transport",
];

/// What went wrong building the kernel artefacts.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot find the package behind {0}; run 'apt-get update' and check that the cloud kernel is in the archive")]
    Resolve(String),
    #[error("{step} failed")]
    Run {
        step: &'static str,
        #[source]
        source: RunError,
    },
    #[error("the kernel package has no {0}")]
    Missing(String),
    #[error("module {module} needs {dependency}, which the kernel package does not have")]
    ModuleDependency { module: String, dependency: String },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the kernel artefacts are and what they hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelManifest {
    pub package: String,
    pub package_version: String,
    pub kernel_release: String,
    pub busybox_version: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// The whole module tree is kept beside the kernel (`modules/`) and
    /// copied into every image, so the guest loads what it needs (Docker's
    /// overlay, bridge, veth, netfilter) with modprobe.
    #[serde(default)]
    pub module_tree: bool,
    /// File name → SHA-256 (hex).
    pub sha256: BTreeMap<String, String>,
}

impl KernelManifest {
    /// A hash of the whole manifest: part of every image's content hash.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// Kernel artefacts on disk.
#[derive(Debug, Clone)]
pub struct KernelSet {
    pub dir: PathBuf,
    pub manifest: KernelManifest,
}

impl KernelSet {
    /// The bzImage (boots on QEMU and Cloud Hypervisor).
    pub fn bzimage(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The initramfs (newc cpio, uncompressed).
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }

    /// The kernel's module tree: a folder holding `lib/modules/<release>`,
    /// if this set keeps one.
    pub fn module_tree(&self) -> Option<PathBuf> {
        let p = self.dir.join("modules");
        (self.manifest.module_tree && p.is_dir()).then_some(p)
    }

    /// Reads artefacts from a directory with a manifest.
    pub fn open(dir: &Path) -> Option<Self> {
        let m = std::fs::read(dir.join("manifest.json")).ok()?;
        let manifest = serde_json::from_slice(&m).ok()?;
        Some(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// The newest kernel set under `images_dir` that keeps its module
    /// tree, if any was built (older sets, without one, make images in
    /// which Docker cannot load its modules).
    pub fn latest(images_dir: &Path) -> Option<Self> {
        let mut sets: Vec<Self> = std::fs::read_dir(images_dir)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("kernel-"))
            .filter_map(|e| Self::open(&e.path()))
            .filter(|k| k.manifest.module_tree)
            .collect();
        sets.sort_by(|a, b| a.dir.cmp(&b.dir));
        sets.pop()
    }
}

/// Finds the concrete package and version behind the metapackage.
fn resolve(runner: &dyn Runner) -> Result<(String, String), KernelError> {
    let deps = runner
        .run(&Cmd::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))
        .map_err(|source| KernelError::Run {
            step: "apt-cache depends",
            source,
        })?;
    let package = deps
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| KernelError::Resolve(KERNEL_METAPACKAGE.into()))?;
    let version = package_version(runner, &package)?;
    Ok((package, version))
}

fn package_version(runner: &dyn Runner, package: &str) -> Result<String, KernelError> {
    let show = runner
        .run(&Cmd::new("apt-cache").args(["show", "--no-all-versions", package]))
        .map_err(|source| KernelError::Run {
            step: "apt-cache show",
            source,
        })?;
    show.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| KernelError::Resolve(package.into()))
}

/// Returns the kernel artefacts, building them if this version is not
/// built yet. `step` is told what is happening.
pub fn ensure(
    images_dir: &Path,
    runner: &dyn Runner,
    step: &mut dyn FnMut(&str),
) -> Result<KernelSet, KernelError> {
    step("resolving the cloud kernel package");
    let (package, version) = resolve(runner)?;
    // "-mods": sets that keep the module tree (older ones did not).
    let name = format!(
        "kernel-{}-{}-mods",
        package.trim_start_matches("linux-image-"),
        version.replace(['/', ':'], "_")
    );
    let dir = images_dir.join(&name);
    if let Some(set) = KernelSet::open(&dir) {
        step("kernel artefacts already built");
        return Ok(set);
    }
    std::fs::create_dir_all(images_dir).map_err(io(images_dir))?;
    // One kernel build at a time; a waiter finds the other's result.
    let _lock =
        crate::image::lock_file(&images_dir.join(".kernel.lock")).map_err(io(images_dir))?;
    if let Some(set) = KernelSet::open(&dir) {
        return Ok(set);
    }
    let work = images_dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = build(&work, &dir, &package, &version, runner, step);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn build(
    work: &Path,
    dest: &Path,
    package: &str,
    version: &str,
    runner: &dyn Runner,
    step: &mut dyn FnMut(&str),
) -> Result<KernelSet, KernelError> {
    let run = |step: &'static str, cmd: Cmd| {
        runner
            .run(&cmd)
            .map_err(|source| KernelError::Run { step, source })
    };
    step(&format!(
        "downloading {package} {version} and {BUSYBOX_PACKAGE}"
    ));
    let busybox_version = package_version(runner, BUSYBOX_PACKAGE)?;
    // apt's download sandbox user cannot write into a root-owned 0700 dir.
    let mut apt = Cmd::new("apt-get").cwd(work).arg("download");
    if rustix::process::geteuid().is_root() {
        apt = apt.args(["-o", "APT::Sandbox::User=root"]);
    }
    run("apt-get download", apt.args([package, BUSYBOX_PACKAGE]))?;
    let debs: Vec<PathBuf> = std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    step("unpacking");
    let root = work.join("root");
    for deb in &debs {
        run(
            "dpkg-deb -x",
            Cmd::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
        )?;
    }
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io(&boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| KernelError::Missing("/boot/vmlinuz-*".into()))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let busybox = root.join("bin/busybox");
    if !busybox.is_file() {
        return Err(KernelError::Missing(
            "busybox (bin/busybox from busybox-static)".into(),
        ));
    }
    step("resolving module dependencies");
    let mod_root = root.join("lib/modules").join(&release);
    let index = module_index(&mod_root)?;
    let order = load_order(&index, MODULES)?;
    step(&format!("writing the initramfs ({} modules)", order.len()));
    // Inside the per-process work dir, so concurrent builds never share it.
    let staging = work.join("out");
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let initramfs = staging.join("initramfs.cpio");
    write_initramfs(&initramfs, &busybox, &index, &order)?;
    std::fs::copy(&vmlinuz, staging.join("vmlinuz")).map_err(io(&vmlinuz))?;
    let tree = staging.join("modules/lib/modules");
    std::fs::create_dir_all(&tree).map_err(io(&tree))?;
    std::fs::rename(&mod_root, tree.join(&release)).map_err(io(&mod_root))?;
    let mut sha256 = BTreeMap::new();
    for f in ["vmlinuz", "initramfs.cpio"] {
        let p = staging.join(f);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        sha256.insert(f.to_owned(), hex::encode(Sha256::digest(&bytes)));
    }
    let manifest = KernelManifest {
        package: package.to_owned(),
        package_version: version.to_owned(),
        kernel_release: release,
        busybox_version,
        modules: order,
        module_tree: true,
        sha256,
    };
    let mpath = staging.join("manifest.json");
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    std::fs::write(&mpath, json).map_err(io(&mpath))?;
    // Publish atomically: a failed build leaves no half set behind. If
    // another process published the same version meanwhile, use that.
    if let Err(e) = std::fs::rename(&staging, dest) {
        let _ = std::fs::remove_dir_all(&staging);
        return KernelSet::open(dest).ok_or_else(|| io(dest)(e));
    }
    Ok(KernelSet {
        dir: dest.to_owned(),
        manifest,
    })
}

/// Module name (with `_`) → (path, dependencies), for every `.ko` under `dir`.
pub fn module_index(dir: &Path) -> Result<BTreeMap<String, (PathBuf, Vec<String>)>, KernelError> {
    let mut index = BTreeMap::new();
    for entry in walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
    {
        let p = entry.path();
        let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        else {
            continue;
        };
        let bytes = std::fs::read(p).map_err(io(p))?;
        index.insert(
            name.replace('-', "_"),
            (p.to_owned(), modinfo_depends(&bytes)),
        );
    }
    Ok(index)
}

/// The `depends=` field of a module's `.modinfo` section.
///
/// `.modinfo` is a run of NUL-terminated `key=value` strings; scanning the
/// file for `\0depends=` finds it without an ELF parser.
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = ko.get(start + KEY.len()..).unwrap_or_default();
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(rest.get(..end).unwrap_or_default())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// Orders `wanted` and their dependencies so each comes after what it needs.
pub fn load_order(
    index: &BTreeMap<String, (PathBuf, Vec<String>)>,
    wanted: &[&str],
) -> Result<Vec<String>, KernelError> {
    fn visit(
        m: &str,
        from: &str,
        index: &BTreeMap<String, (PathBuf, Vec<String>)>,
        out: &mut Vec<String>,
        seen: &mut std::collections::BTreeSet<String>,
    ) -> Result<(), KernelError> {
        if !seen.insert(m.to_owned()) {
            return Ok(());
        }
        let (_, deps) = index.get(m).ok_or_else(|| KernelError::ModuleDependency {
            module: from.to_owned(),
            dependency: m.to_owned(),
        })?;
        for d in deps {
            visit(d, m, index, out, seen)?;
        }
        out.push(m.to_owned());
        Ok(())
    }
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for m in wanted {
        visit(m, "initramfs", index, &mut out, &mut seen)?;
    }
    Ok(out)
}

/// The initramfs's `/init`: load modules, mount the root disk, switch to it.
///
/// Kernel command line: `root=` (default `/dev/vda`), `kennel.init=` (what
/// to run on the root, default `/sbin/init`, or `/usr/bin/tini --
/// /sbin/kennel-init` on a root without one).
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# Kennel initramfs: load virtio modules, mount the root disk, switch_root
# to its init: systemd (/sbin/init), or tini and kennel-init on images
# made before systemd was their PID 1.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /lib/modules/load-order); do
  $B insmod /lib/modules/$m.ko 2>/dev/null || echo "kennel-initramfs: cannot load $m"
done
root=/dev/vda
init=
for arg in $($B cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
    kennel.init=*) init="${arg#kennel.init=}" ;;
  esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do $B sleep 0.05; i=$((i+1)); done
if ! $B mount -t ext4 -o rw,noatime "$root" /newroot; then
  echo "kennel-initramfs: cannot mount $root; dropping to a shell"
  exec $B sh
fi
$B mount --move /dev /newroot/dev
$B umount /proc /sys
if [ -n "$init" ]; then
  exec $B switch_root /newroot "$init"
fi
if [ -x /newroot/sbin/init ] || [ -L /newroot/sbin/init ]; then
  exec $B switch_root /newroot /sbin/init
fi
exec $B switch_root /newroot /usr/bin/tini -- /sbin/kennel-init
"#;

/// Writes the initramfs as an uncompressed newc cpio archive.
fn write_initramfs(
    path: &Path,
    busybox: &Path,
    index: &BTreeMap<String, (PathBuf, Vec<String>)>,
    order: &[String],
) -> Result<(), KernelError> {
    let file = std::fs::File::create(path).map_err(io(path))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    let wr = |r: std::io::Result<()>| r.map_err(io(path));
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        wr(w.dir(d))?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    wr(w.char_dev("dev/console", 5, 1))?;
    let bb = std::fs::read(busybox).map_err(io(busybox))?;
    wr(w.file("bin/busybox", 0o755, &bb))?;
    wr(w.file("init", 0o755, INIT_SCRIPT.as_bytes()))?;
    for m in order {
        if let Some((p, _)) = index.get(m) {
            let bytes = std::fs::read(p).map_err(io(p))?;
            wr(w.file(&format!("lib/modules/{m}.ko"), 0o644, &bytes))?;
        }
    }
    let mut list = order.join("\n");
    list.push('\n');
    wr(w.file("lib/modules/load-order", 0o644, list.as_bytes()))?;
    wr(w.finish())
}

/// A minimal writer of the newc cpio format the kernel unpacks.
struct CpioWriter<W: Write> {
    w: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    fn new(w: W) -> Self {
        Self {
            w,
            ino: 1,
            written: 0,
        }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        let namesize = name.len() + 1;
        let filesize = u32::try_from(data.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "file too large for cpio")
        })?;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.w.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - (self.written % 4)) % 4;
        let zeros = [0u8; 3];
        #[allow(clippy::cast_possible_truncation)] // n < 4
        self.put(zeros.get(..n as usize).unwrap_or_default())
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040_755, &[], (0, 0))
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, 0o100_000 | perm, data, (0, 0))
    }
    fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry(name, 0o020_600, &[], (major, minor))
    }
    fn finish(mut self) -> std::io::Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko =
            b"\x7fELF....\0license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0name=virtio_pci\0";
        assert_eq!(modinfo_depends(ko), ["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(modinfo_depends(b"nothing here").is_empty());
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let mut idx = BTreeMap::new();
        let e = |d: &[&str]| {
            (
                PathBuf::new(),
                d.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            )
        };
        idx.insert("virtio".into(), e(&[]));
        idx.insert("virtio_ring".into(), e(&[]));
        idx.insert("virtio_pci".into(), e(&["virtio_ring", "virtio"]));
        idx.insert("virtio_blk".into(), e(&["virtio", "virtio_ring"]));
        let order = load_order(&idx, &["virtio_pci", "virtio_blk"]).unwrap();
        assert_eq!(order, ["virtio_ring", "virtio", "virtio_pci", "virtio_blk"]);
        idx.insert("virtiofs".into(), e(&["fuse"]));
        assert!(matches!(
            load_order(&idx, &["virtiofs"]),
            Err(KernelError::ModuleDependency { ref dependency, .. }) if dependency == "fuse"
        ));
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut buf = Vec::new();
        let mut w = CpioWriter::new(&mut buf);
        w.dir("bin").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.finish().unwrap();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        let s = String::from_utf8_lossy(&buf);
        assert!(s.contains("TRAILER!!!"));
        assert!(s.contains("#!/bin/sh"));
    }

    #[test]
    fn a_missing_package_is_a_clear_error() {
        let runner = crate::process::FakeRunner {
            script: vec![(
                "apt-cache depends".into(),
                Ok("linux-image-cloud-amd64\n".into()),
            )],
            ..Default::default()
        };
        let d = tempfile::tempdir().unwrap();
        let e = ensure(d.path(), &runner, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("apt-get update"), "{e}");
        assert!(
            std::fs::read_dir(d.path()).unwrap().next().is_none(),
            "nothing left behind"
        );
    }
}
