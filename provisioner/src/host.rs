//! What this host can do for VMs: KVM and whether ordinary guest kernels
//! run under it, the VMM and image tool binaries, permission to create TAP
//! devices. `kennel doctor` reports it; backend selection will use it.
//!
//! Every probe reads files below a root directory (normally `/`) and a
//! list of `PATH` directories, so tests run against a fake tree.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The KVM situation of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kvm", rename_all = "snake_case")]
pub enum Kvm {
    /// No /dev/kvm.
    Absent,
    /// /dev/kvm exists but this user cannot open it.
    NoPermission,
    /// /dev/kvm is provided by the `kvm_pvm` module (nested PVM): ordinary
    /// guest kernels do not boot under it.
    Pvm,
    /// Hardware KVM (kvm_intel or kvm_amd): guests run accelerated.
    Usable { module: String },
}

impl Kvm {
    /// Whether ordinary Linux guests can run accelerated.
    pub fn runs_guests(&self) -> bool {
        matches!(self, Kvm::Usable { .. })
    }
}

/// How to probe a host.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
    path: Vec<PathBuf>,
}

impl Host {
    /// The real host: `/` and the process's `PATH` (plus sbin dirs).
    pub fn real() -> Self {
        let mut path: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
            let p = PathBuf::from(extra);
            if !path.contains(&p) {
                path.push(p);
            }
        }
        Self {
            root: PathBuf::from("/"),
            path,
        }
    }

    /// A host rooted at `root` with binaries searched in `path` (tests).
    pub fn at(root: &Path, path: Vec<PathBuf>) -> Self {
        Self {
            root: root.to_owned(),
            path,
        }
    }

    fn file(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Probes KVM.
    pub fn kvm(&self) -> Kvm {
        let dev = self.file("/dev/kvm");
        if !dev.exists() {
            return Kvm::Absent;
        }
        if self.file("/sys/module/kvm_pvm").exists() {
            return Kvm::Pvm;
        }
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .is_err()
        {
            return Kvm::NoPermission;
        }
        let module = ["kvm_intel", "kvm_amd"]
            .into_iter()
            .find(|m| self.file(&format!("/sys/module/{m}")).exists())
            .unwrap_or("kvm");
        Kvm::Usable {
            module: module.to_owned(),
        }
    }

    /// Finds a program on the search path, or at one of `fallbacks`
    /// (absolute paths, e.g. `/usr/lib/qemu/virtiofsd`).
    pub fn which(&self, name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
        self.path
            .iter()
            .map(|d| d.join(name))
            .chain(fallbacks.iter().map(|f| self.file(f)))
            .find(|p| is_executable(p))
    }

    /// Whether this process may create TAP devices and bridges
    /// (CAP_NET_ADMIN in its effective set, and /dev/net/tun present).
    pub fn can_create_taps(&self) -> bool {
        let tun = self.file("/dev/net/tun").exists();
        let status = std::fs::read_to_string(self.file("/proc/self/status")).unwrap_or_default();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        const CAP_NET_ADMIN: u64 = 12;
        tun && cap_eff & (1 << CAP_NET_ADMIN) != 0
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn touch(root: &Path, rel: &str, exec: bool) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "").unwrap();
        if exec {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn kvm_kinds() {
        let d = tempfile::tempdir().unwrap();
        let h = Host::at(d.path(), vec![]);
        assert_eq!(h.kvm(), Kvm::Absent);
        touch(d.path(), "dev/kvm", false);
        std::fs::create_dir_all(d.path().join("sys/module/kvm_intel")).unwrap();
        assert_eq!(
            h.kvm(),
            Kvm::Usable {
                module: "kvm_intel".into()
            }
        );
        std::fs::create_dir_all(d.path().join("sys/module/kvm_pvm")).unwrap();
        assert_eq!(h.kvm(), Kvm::Pvm);
        assert!(!h.kvm().runs_guests());
    }

    #[test]
    fn which_finds_executables_and_fallbacks() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), "bin/qemu-img", true);
        touch(d.path(), "bin/notexec", false);
        touch(d.path(), "usr/lib/qemu/virtiofsd", true);
        let h = Host::at(d.path(), vec![d.path().join("bin")]);
        assert!(h.which("qemu-img", &[]).is_some());
        assert!(h.which("notexec", &[]).is_none());
        assert!(h.which("virtiofsd", &["/usr/lib/qemu/virtiofsd"]).is_some());
        assert!(h.which("cloud-hypervisor", &[]).is_none());
    }

    #[test]
    fn taps_need_cap_net_admin() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), "dev/net/tun", false);
        std::fs::create_dir_all(d.path().join("proc/self")).unwrap();
        std::fs::write(
            d.path().join("proc/self/status"),
            "CapEff:\t0000000000001000\n",
        )
        .unwrap();
        assert!(Host::at(d.path(), vec![]).can_create_taps());
        std::fs::write(
            d.path().join("proc/self/status"),
            "CapEff:\t0000000000000000\n",
        )
        .unwrap();
        assert!(!Host::at(d.path(), vec![]).can_create_taps());
    }
}
