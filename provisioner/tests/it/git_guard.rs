//! Members' clones reach only public hosts: a real `git daemon` on
//! loopback serves a repository whose submodule names another loopback
//! host. Refused without an allowance, refused at the submodule when only
//! the main host is allowed, cloned whole when both are; admins' clones
//! (no guard) go anywhere. Needs git.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use kennel_provisioner::netguard::NetGuard;
use kennel_provisioner::source::{prepare, SourcePlan};

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "protocol.file.allow=always",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git is needed: apt-get install git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn members_clone_only_from_public_or_allowed_hosts_submodules_included() {
    let d = tempfile::tempdir().unwrap();
    let served = d.path().join("served");
    let port = free_port();
    // sub.git, then main.git whose submodule is git://localhost:PORT/sub.git.
    for name in ["sub", "main"] {
        let work = d.path().join(format!("work-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("README"), name).unwrap();
        git(&work, &["add", "README"]);
        if name == "main" {
            git(
                &work,
                &[
                    "submodule",
                    "add",
                    "-q",
                    &format!("file://{}/sub.git", served.display()),
                    "lib",
                ],
            );
            git(
                &work,
                &[
                    "config",
                    "-f",
                    ".gitmodules",
                    "submodule.lib.url",
                    &format!("git://localhost:{port}/sub.git"),
                ],
            );
            git(&work, &["add", ".gitmodules"]);
        }
        git(&work, &["commit", "-q", "-m", name]);
        std::fs::create_dir_all(&served).unwrap();
        git(
            d.path(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                served.join(format!("{name}.git")).to_str().unwrap(),
            ],
        );
    }
    let daemon = Daemon(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", served.display()))
            .arg(&served)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed().as_secs() < 10, "git daemon did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = format!("git://127.0.0.1:{port}/main.git");
    let me = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    let clone = |dest: &str, guard: Option<&NetGuard>| {
        let path = d.path().join("projects").join(dest);
        let plan = SourcePlan {
            root: &d.path().join("projects"),
            path: &path,
            git: Some(&url),
            token: None,
            deploy_key: None,
            template_files: None,
            adopt: false,
            author_name: "ann",
            author_email: "ann@example.org",
            owner: me,
            guard,
            pending: None,
        };
        (
            prepare(&plan, &mut |_, _| {}).map_err(|e| e.to_string()),
            path,
        )
    };
    std::fs::create_dir_all(d.path().join("projects")).unwrap();

    let (r, path) = clone("a", Some(&NetGuard::default()));
    let e = r.unwrap_err();
    assert!(
        e.contains("127.0.0.1 is 127.0.0.1 (loopback); members may clone only from public hosts"),
        "{e}"
    );
    assert!(!path.exists(), "nothing fetched, nothing left");

    let only_main = NetGuard {
        allowed: vec!["127.0.0.1".into()],
    };
    let (r, path) = clone("b", Some(&only_main));
    let e = r.unwrap_err();
    assert!(
        e.contains("submodules: lib (git://localhost:") && e.contains("(loopback)"),
        "{e}"
    );
    assert!(!path.exists(), "a refused submodule rolls the clone back");

    let both = NetGuard {
        allowed: vec!["127.0.0.1".into(), "localhost".into()],
    };
    let (r, path) = clone("c", Some(&both));
    r.unwrap();
    assert_eq!(
        std::fs::read_to_string(path.join("lib/README")).unwrap(),
        "sub"
    );

    let (r, path) = clone("admin", None);
    r.unwrap();
    assert!(path.join("lib/README").exists());
    drop(daemon);
}
