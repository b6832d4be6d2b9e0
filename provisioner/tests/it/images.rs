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
pub(crate) fn build(stacks: &[&str]) -> (KernelSet, Vec<ImageInfo>) {
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
    // Two builds side by side: mmdebstrap is mostly one process waiting on
    // dpkg or the disk, and the test command builds every stack here.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<ImageInfo>>> =
        stacks.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(name) = stacks.get(i) else { break };
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
                *slots[i].lock().unwrap() = Some(info);
            });
        }
    });
    let infos = slots
        .into_iter()
        .map(|s| s.into_inner().unwrap().expect("every stack was built"))
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
        "/usr/lib/systemd/systemd",
        "/usr/bin/docker",
        "/usr/libexec/docker/cli-plugins/docker-compose",
        "/usr/bin/git",
        "/usr/bin/sudo",
        "/usr/bin/curl",
        "/bin/mount",
        "/etc/systemd/system/kennel-init.service",
        // systemd's own units for Kennel's steps, enabled at build.
        "/etc/systemd/system/sysinit.target.wants/kennel-init.service",
        "/etc/systemd/system/multi-user.target.wants/kennel-ready.service",
        "/etc/systemd/system/sockets.target.wants/docker.socket",
    ] {
        assert!(exists(&base, p), "base lacks {p}");
    }
    // Docker starts on its socket, not at boot; apt's timers are off.
    assert!(!exists(
        &base,
        "/etc/systemd/system/multi-user.target.wants/docker.service"
    ));
    assert!(debugfs(&base, "stat /etc/systemd/system/apt-daily.timer").contains("Type: symlink"));
    // The kernel's whole module tree, indexed: Docker's modules load.
    let release = &k.manifest.kernel_release;
    let dep = file(&base, &format!("/usr/lib/modules/{release}/modules.dep"));
    for m in ["overlay.ko", "veth.ko", "br_netfilter.ko", "nf_tables.ko"] {
        assert!(dep.contains(m), "modules.dep lacks {m}");
    }
    assert!(
        file(&base, "/etc/group").contains("docker:x:"),
        "dev may use docker"
    );
    let docker_group = file(&base, "/etc/group");
    assert!(
        docker_group
            .lines()
            .any(|l| l.starts_with("docker:") && l.ends_with(":dev")),
        "{docker_group}"
    );
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

/// Runs `command` as dev with a login shell in a throwaway copy of the
/// image (its ext4 read-only, a tmpfs over it), in a mount and PID
/// namespace of its own so nothing stays mounted. Returns (ok, output).
fn run_in(image: &Path, command: &str) -> (bool, String) {
    let work = tempfile::tempdir().unwrap();
    let script = r#"set -e
img=$1 t=$2
mkdir -p "$t/lower" "$t/rw" "$t/root"
mount -o loop,ro,noload "$img" "$t/lower"
mount -t tmpfs tmpfs "$t/rw"
mkdir -p "$t/rw/u" "$t/rw/w"
mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/rw/u,workdir=$t/rw/w" "$t/root"
mount -t proc proc "$t/root/proc"
mount --rbind /dev "$t/root/dev"
mount -t sysfs sysfs "$t/root/sys"
cp /etc/resolv.conf "$t/root/etc/resolv.conf" 2>/dev/null || true
exec chroot "$t/root" /bin/su - dev -c "$3"
"#;
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--propagation", "private"])
        .args(["sh", "-c", script, "sh"])
        .arg(image)
        .arg(work.path())
        .arg(command)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every stack's image holds the toolchain and language server versions
/// its stack file names: each `[versions]` entry has a command, which
/// answers in the image with that version.
#[test]
fn every_stack_image_holds_the_versions_its_stack_file_names() {
    require("unshare", "util-linux");
    let all = Stacks::load(&repo().join("stacks"));
    let names: Vec<&str> = all.stacks.iter().map(|s| s.name()).collect();
    assert!(names.len() >= 9, "{names:?}");
    let (_, infos) = build(&names);
    let mut failures = Vec::new();
    for (name, info) in names.iter().zip(&infos) {
        let stack = all.get(name).unwrap();
        let versions = &stack.file.versions;
        assert!(
            name == &"base" || !versions.is_empty(),
            "{name} names no versions"
        );
        for (tool, want) in versions {
            let Some(cmd) = stack.file.version_commands.get(tool) else {
                failures.push(format!("{name}: no version_commands entry for {tool}"));
                continue;
            };
            let (ok, out) = run_in(&info.rootfs(), cmd);
            eprintln!("{name}: {cmd} -> {}", out.trim());
            if !ok || !out.contains(want.as_str()) {
                failures.push(format!(
                    "{name}: `{cmd}` should name {tool} {want}: {}",
                    out.trim()
                ));
            }
        }
        for tool in stack.file.version_commands.keys() {
            if !versions.contains_key(tool) {
                failures.push(format!(
                    "{name}: version_commands.{tool} has no [versions] entry"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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
    let cli = package_version(&php, "php8.4-cli").expect("php8.4-cli installed");
    assert!(cli.starts_with(&versions["php"]), "{cli} vs {versions:?}");
    let composer = package_version(&php, "composer").expect("composer installed");
    assert!(
        composer.starts_with(&versions["composer"]),
        "{composer} vs {versions:?}"
    );
    for ext in [
        "php8.4-mbstring",
        "php8.4-xml",
        "php8.4-curl",
        "php8.4-sqlite3",
    ] {
        assert!(package_version(&php, ext).is_some(), "{ext}");
    }
}
