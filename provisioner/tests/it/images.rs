//! Builds the real kernel artefacts and the base, rust and node images,
//! then inspects them with debugfs. Needs root, mmdebstrap, debugfs and
//! the Debian archive; enabled by the `image-tests` feature (the README's
//! test command turns it on). Images are cached by content hash under
//! `$KENNEL_TEST_CACHE` (default `~/.cache/kennel/test-data`), so repeated
//! runs only check.
#![cfg(feature = "image-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kennel_provisioner::image::{BuildEnv, ImageInfo, Images, Recipe};
use kennel_provisioner::kernel::{self, KernelSet};
use kennel_provisioner::process::SystemRunner;
use kennel_provisioner::stacks::Stacks;
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is missing: apt-get install {package} (scripts/install-deps.sh test does)"
    );
}

fn cache() -> PathBuf {
    std::env::var_os("KENNEL_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/kennel/test-data")
        })
}

/// Builds (or finds) the kernel and the images of `stacks`.
fn build(stacks: &[&str]) -> (KernelSet, Vec<ImageInfo>) {
    assert!(
        rustix::process::geteuid().is_root(),
        "image tests need root (mmdebstrap --mode=root); run scripts/test.sh as root"
    );
    require("mmdebstrap", "mmdebstrap");
    require("mkfs.ext4", "e2fsprogs");
    require("debugfs", "e2fsprogs");
    require("dpkg-deb", "dpkg");
    let images = Images::new(&cache().join("images"));
    let runner = SystemRunner;
    let k = kernel::ensure(images.dir(), &runner, &mut |s| eprintln!("kernel: {s}")).unwrap();
    let all = Stacks::load(&repo().join("stacks"));
    let recipe = Recipe::load(&repo().join("images/base")).unwrap();
    // The recipe's own archive (Debian 13), as `kennel` uses by default.
    let sources = repo().join("images/base/debian.sources");
    let apt_cache = cache().join("apt");
    let modules = k
        .module_tree()
        .expect("the kernel set keeps its module tree");
    let env = BuildEnv {
        recipe: &recipe,
        kernel: &k.manifest,
        apt_sources: &sources,
        apt_cache: Some(&apt_cache),
        modules: Some(&modules),
    };
    let base = all.get("base").unwrap();
    let infos = stacks
        .iter()
        .map(|name| {
            let (info, built) = images
                .ensure(&env, base, all.get(name).unwrap(), &runner, &mut |s| {
                    eprintln!("{name}: {s}")
                })
                .unwrap();
            eprintln!(
                "{name}: {} {} MiB built={built} in {:.1}s",
                info.id,
                info.size_bytes >> 20,
                info.build_seconds
            );
            info
        })
        .collect();
    (k, infos)
}

/// `debugfs -R <request> <image>` output.
fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exists(image: &Path, path: &str) -> bool {
    debugfs(image, &format!("stat {path}")).contains("Inode:")
}

fn file(image: &Path, path: &str) -> String {
    debugfs(image, &format!("cat {path}"))
}

#[test]
fn kernel_base_rust_and_node_images() {
    let (k, infos) = build(&["base", "rust", "node"]);

    // Kernel artefacts match their manifest.
    for (name, sum) in &k.manifest.sha256 {
        let bytes = std::fs::read(k.dir.join(name)).unwrap();
        assert_eq!(&hex::encode(Sha256::digest(&bytes)), sum, "{name}");
    }
    for m in ["virtio_pci", "virtio_blk", "virtio_net", "virtiofs", "fuse"] {
        assert!(
            k.manifest.modules.iter().any(|x| x == m),
            "{m} not in {:?}",
            k.manifest.modules
        );
    }
    let pos = |m: &str| k.manifest.modules.iter().position(|x| x == m).unwrap();
    assert!(pos("virtio_ring") < pos("virtio_pci"), "dependency order");

    let base = infos[0].rootfs();
    for p in [
        "/usr/sbin/sshd",
        "/usr/bin/tini",
        "/usr/bin/git",
        "/usr/bin/sudo",
        "/usr/bin/curl",
        "/bin/mount",
    ] {
        assert!(exists(&base, p), "base lacks {p}");
    }
    let init = debugfs(&base, "stat /usr/sbin/kennel-init");
    assert!(
        init.contains("Mode:  0755") && init.contains("User:     0"),
        "{init}"
    );
    let passwd = file(&base, "/etc/passwd");
    assert!(passwd.contains("dev:x:1000:1000:"), "{passwd}");
    assert!(file(&base, "/etc/sudoers.d/dev").contains("NOPASSWD"));
    let sshd = file(&base, "/etc/ssh/sshd_config.d/kennel.conf");
    assert!(
        sshd.contains("PasswordAuthentication no") && sshd.contains("UsePAM no"),
        "{sshd}"
    );
    assert!(
        !exists(&base, "/etc/ssh/ssh_host_ed25519_key"),
        "host keys are made per VM"
    );
    assert!(!exists(&base, "/usr/bin/cargo"));
    assert_eq!(file(&base, "/etc/kennel/stack").trim(), "base");

    let rust = infos[1].rootfs();
    assert!(exists(&rust, "/usr/bin/cargo"), "the rust image has cargo");
    assert!(exists(&rust, "/usr/bin/rustc"));
    assert!(file(&rust, "/etc/kennel/stack.env").contains("CARGO_TERM_COLOR='always'"));
    assert!(exists(&rust, "/etc/kennel/first-boot.sh"));

    let node = infos[2].rootfs();
    assert!(exists(&node, "/usr/bin/node"), "the node image has node");
    assert!(exists(&node, "/usr/bin/npm"));
    assert!(!exists(&node, "/usr/bin/cargo"));

    // A second ensure finds the same images without building.
    let (_, again) = build(&["base", "rust", "node"]);
    assert_eq!(
        again.iter().map(|i| &i.id).collect::<Vec<_>>(),
        infos.iter().map(|i| &i.id).collect::<Vec<_>>()
    );
}

/// The version of an installed package, from the image's dpkg status.
fn package_version(image: &Path, package: &str) -> Option<String> {
    let status = file(image, "/var/lib/dpkg/status");
    status
        .split("\n\n")
        .find(|p| p.lines().next() == Some(&format!("Package: {package}")))?
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_owned)
}

#[test]
fn the_php_image_has_php_and_composer_at_the_versions_its_stack_names() {
    let (_, infos) = build(&["php"]);
    let php = infos[0].rootfs();
    for p in [
        "/usr/bin/php",
        "/usr/bin/composer",
        "/usr/bin/unzip",
        "/usr/bin/git",
    ] {
        assert!(exists(&php, p), "the php image lacks {p}");
    }
    assert_eq!(file(&php, "/etc/kennel/stack").trim(), "php");
    assert!(!exists(&php, "/usr/bin/node"), "no node unless asked for");
    // The stack file's [versions] (what the reply compares pins with) are
    // what the image holds.
    let stack = Stacks::load(&repo().join("stacks"));
    let versions = &stack.get("php").unwrap().file.versions;
    let cli = package_version(&php, "php8.2-cli").expect("php8.2-cli installed");
    assert!(cli.starts_with(&versions["php"]), "{cli} vs {versions:?}");
    let composer = package_version(&php, "composer").expect("composer installed");
    assert!(
        composer.starts_with(&versions["composer"]),
        "{composer} vs {versions:?}"
    );
    for ext in [
        "php8.2-mbstring",
        "php8.2-xml",
        "php8.2-curl",
        "php8.2-sqlite3",
    ] {
        assert!(package_version(&php, ext).is_some(), "{ext}");
    }
}
