//! `new project` end to end on real guests: a git clone (file://, with a
//! submodule) detected as rust, cargo in the VM, edits on the host seen in
//! /workspace, `rm` keeping the source and `rm --purge` deleting it only
//! after two confirmations; a template with its post-create command; and
//! failures that roll back everything but the source.
//!
//! Needs what `tests/e2e/vm.rs` needs, plus git. `vm-tests` feature.
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;

use crate::support::{git, vm_running, Kennel, Steps};
use kennel_testkit::require;

/// A small Rust repository with a submodule, committed with the real git.
fn rust_fixture(root: &Path) -> String {
    require("git", "git");
    let lib = root.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    git(&lib, &["init", "-q"]);
    std::fs::write(lib.join("README"), "a submodule\n").unwrap();
    git(&lib, &["add", "."]);
    git(&lib, &["commit", "-q", "-m", "lib"]);
    let app = root.join("app");
    std::fs::create_dir_all(app.join("src")).unwrap();
    git(&app, &["init", "-q"]);
    std::fs::write(
        app.join("Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(app.join("src/main.rs"), "fn main() { println!(\"hi\"); }\n").unwrap();
    git(
        &app,
        &[
            "submodule",
            "add",
            "-q",
            &format!("file://{}", lib.display()),
            "vendor/lib",
        ],
    );
    git(&app, &["add", "."]);
    git(&app, &["commit", "-q", "-m", "app"]);
    format!("file://{}", app.display())
}

/// A crate on edition 2024 (Rust 1.85 or later) whose one dependency is
/// vendored (`.cargo/config.toml` replaces crates.io with `vendor/`), so
/// it builds with `--offline` and no registry.
fn edition_2024_crate(dir: &Path) {
    let sum = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b";
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join(".cargo")).unwrap();
    std::fs::create_dir_all(dir.join("vendor/answer/src")).unwrap();
    let files = [
        (
            "Cargo.toml",
            "[package]\nname = \"e2024\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dependencies]\nanswer = \"1\"\n".to_owned(),
        ),
        (
            "Cargo.lock",
            format!("version = 4\n\n[[package]]\nname = \"answer\"\nversion = \"1.0.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"{sum}\"\n\n[[package]]\nname = \"e2024\"\nversion = \"0.1.0\"\ndependencies = [\n \"answer\",\n]\n"),
        ),
        (
            ".cargo/config.toml",
            "[source.crates-io]\nreplace-with = \"vendored\"\n\n[source.vendored]\ndirectory = \"vendor\"\n".to_owned(),
        ),
        (
            // `gen` is a keyword from edition 2024 on: r#gen proves the edition.
            "src/main.rs",
            "fn main() {\n    let r#gen = answer::answer();\n    println!(\"2024 says {gen}\", gen = r#gen);\n}\n".to_owned(),
        ),
        (
            "vendor/answer/Cargo.toml",
            "[package]\nname = \"answer\"\nversion = \"1.0.0\"\nedition = \"2021\"\n".to_owned(),
        ),
        (
            "vendor/answer/src/lib.rs",
            "pub fn answer() -> u32 {\n    42\n}\n".to_owned(),
        ),
        (
            "vendor/answer/.cargo-checksum.json",
            format!("{{\"files\":{{}},\"package\":\"{sum}\"}}"),
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    // Owned like the rest of the source (dev in the VM), not by this test's
    // root: cargo writes target/ and may rewrite Cargo.lock.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir.parent().unwrap()).unwrap();
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", owner.uid(), owner.gid()))
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_cloned_rust_project_builds_in_its_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    let url = rust_fixture(&tmp.path().join("fixtures"));

    let out = k.exec_ok(&format!(
        "new project demo --git {url} --cpus 1 --memory 768M --disk 4G"
    ));
    assert!(out.contains("ready (rust stack)"), "{out}");
    assert!(
        out.contains("stack rust (Cargo.toml"),
        "the reply names the evidence: {out}"
    );
    assert!(out.contains("ssh demo@127.0.0.1 -p 2222"), "{out}");
    let src = tmp.path().join("kennel-data/projects/demo");
    assert!(
        src.join("vendor/lib/README").exists(),
        "submodules are cloned"
    );

    let v = k.ssh_ok("demo", "cargo --version; cat /workspace/vendor/lib/README; git -C /workspace log --oneline | wc -l");
    assert!(v.starts_with("cargo "), "{v}");
    assert!(v.contains("a submodule"), "{v}");

    // Today's Rust: an edition-2024 crate with a vendored dependency
    // builds offline in the VM, and the language server answers.
    edition_2024_crate(&src.join("e2024"));
    let out = k.ssh_ok(
        "demo",
        "cd /workspace/e2024 && cargo build --offline --quiet 2>&1 && ./target/debug/e2024 && rust-analyzer --version",
    );
    assert!(out.contains("2024 says 42"), "{out}");
    assert!(out.contains("rust-analyzer 1."), "{out}");
    std::fs::write(
        src.join("src/main.rs"),
        "fn main() { println!(\"edited on the host\"); }\n",
    )
    .unwrap();
    assert!(k
        .ssh_ok("demo", "cat /workspace/src/main.rs")
        .contains("edited on the host"));

    // rm keeps the source; rm --purge deletes it only after two yeses.
    k.exec_ok("rm demo --yes");
    assert!(!vm_running(&k, "demo"));
    assert!(src.join("Cargo.toml").exists(), "rm keeps the source");
    k.exec_ok("new project demo --adopt --stack rust --cpus 1 --memory 512M --disk 4G");
    let first = k.exec_ok("rm demo --purge");
    assert!(
        first.contains("DELETES") && first.contains(&src.display().to_string()),
        "{first}"
    );
    let second = k.exec_ok("yes");
    assert!(second.contains("Last check"), "{second}");
    assert!(src.exists(), "nothing deleted before the second yes");
    k.exec_ok("yes");
    assert!(!src.exists(), "purged after confirmation");
    assert!(!vm_running(&k, "demo"));
}

#[test]
fn a_template_project_boots_and_runs_its_post_create_command() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    let out = k.exec_ok("new project tpl --template rust-cli --cpus 1 --memory 768M --disk 4G");
    assert!(out.contains("post-create ran"), "{out}");
    let src = tmp.path().join("kennel-data/projects/tpl");
    let log = std::fs::read_to_string(src.join(".kennel-post-create.log")).unwrap();
    assert_eq!(log, "Hello from your Kennel VM!\n");
    let head = Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(&src)
        .args(["log", "--format=%an <%ae> %s"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&head.stdout).starts_with("admin <admin@localhost> Initial commit"),
        "{head:?}"
    );
    k.exec_ok("rm tpl --yes");
}

fn assert_nothing_left(k: &Kennel, project: &str) {
    assert!(!vm_running(k, project));
    let vms = k.dir.join("kennel-data/vms");
    assert!(
        std::fs::read_dir(&vms)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true),
        "no VM directory left"
    );
    assert!(!k
        .dir
        .join(format!("kennel-data/keys/projects/{project}"))
        .exists());
    let projects = k.exec_ok("--json projects");
    assert!(projects.contains("\"projects\":[]"), "{projects}");
}

#[test]
fn failed_creates_roll_back_and_say_what_happened() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());

    let mut steps = Steps::new("failed_creates_roll_back_and_say_what_happened");

    // A git URL that does not exist.
    steps.run("A git URL that does not exist", || {
        let out = k.exec(&format!(
            "new project nogit --git file://{}/nope.git",
            tmp.path().display()
        ));
        let text = String::from_utf8_lossy(&out.stdout);
        // The user's to fix, not the host's: `invalid` (exit 6).
        assert_eq!(out.status.code(), Some(6), "{text}");
        assert!(
            text.contains("cloning file://") && text.contains("failed"),
            "{text}"
        );
        assert!(
            !tmp.path().join("kennel-data/projects/nogit").exists(),
            "a failed clone leaves no directory"
        );
        assert_nothing_left(&k, "nogit");
    });

    // A clone cut off midway: the pack ends half way through.
    steps.run("A clone cut off midway", || {
        let url = rust_fixture(&tmp.path().join("fixtures"));
        let repo = tmp.path().join("fixtures/app");
        git(&repo, &["repack", "-a", "-d", "-q"]);
        let packs = repo.join(".git/objects/pack");
        for e in std::fs::read_dir(&packs).unwrap().filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "pack") {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(e.path())
                    .unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len / 2).unwrap();
            }
        }
        let out = k.exec(&format!("new project cut --git {url}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("cloning"), "{text}");
        assert_nothing_left(&k, "cut");
    });

    // A full disk in the data dir: a small tmpfs, filled.
    steps.run("A full disk in the data dir", || {
        let small = tmp.path().join("small");
        std::fs::create_dir_all(&small).unwrap();
        assert!(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&small)
            .status()
            .unwrap()
            .success());
        let full = Kennel::new(&small);
        // A first write makes the data dir and its store (a read would not).
        full.exec_ok("secret set warmup 1");
        // Fill it, then leave a sliver: enough for the store, not for a VM.
        let filler = small.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=64"])
            .arg(format!("of={}", filler.display()))
            .output();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        f.set_len(f.metadata().unwrap().len().saturating_sub(768 * 1024))
            .unwrap();
        drop(f);
        let out = full.exec("new project fulldisk --stack base --memory 512M --disk 2G");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let lower = text.to_lowercase();
        assert!(
            lower.contains("no space left") || lower.contains("disk is full"),
            "{text}"
        );
        assert!(!vm_running(&full, "fulldisk"));
        let _ = std::fs::remove_file(&filler);
        assert_nothing_left(&full, "fulldisk");
        drop(full);
        let _ = Command::new("umount").arg(&small).status();
    });
    steps.finish();
}

#[test]
fn keys_follow_access_and_copies_and_renames_work() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    k.exec_ok("new project orig --stack base --cpus 1 --memory 512M --disk 2G");
    std::fs::write(
        tmp.path().join("kennel-data/projects/orig/note.txt"),
        "original\n",
    )
    .unwrap();

    let mut steps = Steps::new("keys_follow_access_and_copies_and_renames_work");

    // A key added for the owner is let into the running VM at once;
    // revoked, it is refused at once.
    steps.run(
        "A key added for the owner is let in at once, refused once revoked",
        || {
            let key = tmp.path().join("mine");
            let kg = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f"])
                .arg(&key)
                .status()
                .unwrap();
            assert!(kg.success());
            let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
            let added = k.exec_ok(&format!("key add \"{}\"", public.trim()));
            let fingerprint = added
                .split_whitespace()
                .find(|w| w.starts_with("SHA256:"))
                .unwrap()
                .to_owned();
            let with_my_key = |k: &Kennel| k.ssh_as("orig", &key, "cat /workspace/note.txt");
            let out = with_my_key(&k);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            k.exec_ok(&format!("key rm {}", fingerprint.trim_end_matches('.')));
            assert!(
                !with_my_key(&k).status.success(),
                "a revoked key still gets in"
            );
        },
    );

    // cp: a second VM with a copy of the disk and of the source.
    steps.run("cp", || {
        k.ssh_ok("orig", "echo on-disk > /home/dev/marker");
        k.exec_ok("cp orig twin");
        assert_eq!(
            k.ssh_ok("twin", "cat /home/dev/marker /workspace/note.txt"),
            "on-disk\noriginal\n"
        );
        assert!(tmp
            .path()
            .join("kennel-data/projects/twin/note.txt")
            .exists());
        assert!(
            vm_running(&k, "orig"),
            "the original runs again after the copy"
        );
    });

    // rename: the VM follows the name.
    steps.run("rename", || {
        k.exec_ok("rename twin third");
        assert!(vm_running(&k, "third") && !vm_running(&k, "twin"));
        assert_eq!(k.ssh_ok("third", "cat /home/dev/marker"), "on-disk\n");
        k.exec_ok("rm third --yes");
        k.exec_ok("rm orig --yes");
    });
    steps.finish();
}

/// A repository's devcontainer.json on a real guest: the create steps run
/// once, in order, as dev in /workspace, with its remoteEnv; the reply
/// says how they went and what did not apply; every session (`ssh p@HOST
/// cmd` and login shells) has the environment; postStartCommand runs at
/// every boot, and the create steps not again; forwardPorts gives the app
/// port.
#[test]
fn a_devcontainer_json_runs_in_the_guest_and_sets_its_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Kennel::new(tmp.path());
    let src = tmp.path().join("kennel-data/projects/dc");
    std::fs::create_dir_all(src.join(".devcontainer")).unwrap();
    std::fs::write(
        src.join(".devcontainer/devcontainer.json"),
        r#"{
  // JSON with comments, as VS Code writes it.
  "name": "dc test",
  "image": "mcr.microsoft.com/devcontainers/base:bookworm",
  "onCreateCommand": "echo on-create as $(id -un) >> .created",
  "postCreateCommand": ["sh", "-c", "echo \"$GREETING\" > post-create.txt; pwd >> post-create.txt"],
  "postStartCommand": "date +%s%N >> .started",
  "forwardPorts": [8123, 9229],
  "remoteEnv": {
    "GREETING": "hello from remoteEnv",
    "PATH": "${containerEnv:PATH}:${containerWorkspaceFolder}/bin",
  },
}
"#,
    )
    .unwrap();
    // A person's directory, not root's: dev in the VM takes its owner.
    for p in [
        &src,
        &src.join(".devcontainer"),
        &src.join(".devcontainer/devcontainer.json"),
    ] {
        std::os::unix::fs::chown(p, Some(1000), Some(1000)).unwrap();
    }
    let out = k.exec_ok("new project dc --adopt --stack base --cpus 1 --memory 512M --disk 2G");
    assert!(
        out.contains("devcontainer postCreateCommand finished in"),
        "{out}"
    );
    assert!(out.contains(".devcontainer/devcontainer.json (dc test): onCreateCommand, postCreateCommand once on the first boot; postStartCommand at every boot; GREETING, PATH in every session; app port 8123 (forwardPorts); Kennel uses its own base stack image"), "{out}");
    assert!(out.contains("image does not apply"), "{out}");
    assert!(out.contains("other forwardPorts: 9229"), "{out}");
    assert_eq!(
        std::fs::read_to_string(src.join("post-create.txt")).unwrap(),
        "hello from remoteEnv\n/workspace\n"
    );
    assert_eq!(
        std::fs::read_to_string(src.join(".created")).unwrap(),
        "on-create as dev\n"
    );
    assert!(
        k.exec_ok("status dc").contains("8123"),
        "the app port comes from forwardPorts"
    );
    let env = k.ssh_ok("dc", "echo \"$GREETING\"; echo \"$PATH\"");
    assert!(env.starts_with("hello from remoteEnv\n"), "{env}");
    assert!(
        env.contains("/usr/bin:/bin:/usr/games:/workspace/bin"),
        "{env}"
    );
    let login = k.ssh_ok("dc", "bash -lc 'echo \"$GREETING $PATH\"'");
    assert!(
        login.contains("hello from remoteEnv") && login.contains("/workspace/bin"),
        "a login shell keeps it: {login}"
    );
    let started = |n: usize| {
        let t = std::time::Instant::now();
        while std::fs::read_to_string(src.join(".started"))
            .unwrap_or_default()
            .lines()
            .count()
            < n
        {
            assert!(
                t.elapsed().as_secs() < 60,
                "postStartCommand did not run {n} times"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    started(1);
    k.exec_ok("stop dc");
    k.exec_ok("start dc");
    started(2);
    assert_eq!(
        std::fs::read_to_string(src.join(".created")).unwrap(),
        "on-create as dev\n",
        "the create steps ran once"
    );
    k.exec_ok("rm dc --yes");
}
