//! The lifecycle without root, QEMU or images: a fake VMM (a `sh` process
//! that stands for the VMM, and a banner-answering "sshd" on the VM's
//! address), a fake virtiofsd, fake images and a runner that only makes
//! key files. What is real: the data directory, the store's slots, the
//! source (git2), the readiness logic, rollback and reconcile.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

use kennel_core::model::Resources;

use super::*;
use crate::process::{Output, RunError};
use crate::virtiofs::VirtiofsError;
use crate::vmm::VmmError;

/// How the fake VMM's next boots go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boot {
    /// Console lines, a live process, an SSH banner: ready.
    Ready,
    /// The VMM refuses to start.
    Fails,
    /// The host address is taken.
    AddressInUse,
    /// The VMM starts but the guest never says anything; the VMM dies.
    Dies,
}

#[derive(Default)]
struct FakeVmm {
    boot: Mutex<Option<Boot>>,
    boots: Mutex<Vec<String>>,
    stops: Mutex<Vec<String>>,
    /// Name → whether its VM runs (as `state` reports it).
    running: Mutex<HashMap<String, bool>>,
    /// The "sshd" of each running VM.
    sshd: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Names whose VMM is alive but does not answer `state`.
    mute: Mutex<std::collections::HashSet<String>>,
}

impl FakeVmm {
    fn set(&self, b: Boot) {
        *self.boot.lock().unwrap() = Some(b);
    }
    fn boots(&self) -> Vec<String> {
        self.boots.lock().unwrap().clone()
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }
    fn describe(&self) -> String {
        "fake".into()
    }
    async fn boot(&self, m: &Machine) -> Result<u32, VmmError> {
        self.boots
            .lock()
            .unwrap()
            .push(format!("{} {}", m.name, m.net.ssh_addr()));
        let how = self.boot.lock().unwrap().unwrap_or(Boot::Ready);
        let program = "fake-vmm".to_owned();
        match how {
            Boot::Fails => {
                return Err(VmmError::Exited {
                    program,
                    log: "no".into(),
                })
            }
            Boot::AddressInUse => {
                return Err(VmmError::AddressInUse {
                    program,
                    log: "Could not set up host forwarding rule".into(),
                })
            }
            Boot::Dies => return Ok(0),
            Boot::Ready => {}
        }
        let Ok(listener) = tokio::net::TcpListener::bind(m.net.ssh_addr()).await else {
            return Err(VmmError::AddressInUse {
                program,
                log: "Address already in use".into(),
            });
        };
        let sshd = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"SSH-2.0-fake\r\n").await;
            }
        });
        // A process whose command line names the VM, as QEMU's does, and
        // that is not this process's child (QEMU daemonizes).
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sh -c 'sleep 120; :' kennel-{} >/dev/null 2>&1 & echo $!",
                m.name
            ))
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::fs::write(&m.pid_file, pid.to_string()).unwrap();
        let mut console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.console_log)
            .unwrap();
        writeln!(console, "kennel-init: workspace mounted").unwrap();
        writeln!(console, "Server listening on 0.0.0.0 port 22.").unwrap();
        self.running.lock().unwrap().insert(m.name.clone(), true);
        self.sshd.lock().unwrap().insert(m.name.clone(), sshd);
        Ok(pid)
    }
    async fn state(&self, m: &Machine) -> Result<VmmState, VmmError> {
        if self.mute.lock().unwrap().contains(&m.name) {
            return Err(VmmError::Api {
                endpoint: "query-status".into(),
                message: "QMP did not answer in 5 s".into(),
            });
        }
        Ok(match self.running.lock().unwrap().get(&m.name) {
            Some(true) => VmmState::Running,
            Some(false) => VmmState::Stopped,
            None => VmmState::Gone,
        })
    }
    async fn force_stop(&self, m: &Machine) -> Result<(), VmmError> {
        self.stops.lock().unwrap().push(m.name.clone());
        if let Some(pid) = read_pid(&m.pid_file) {
            crate::vmm::signal(pid, rustix::process::Signal::KILL);
            crate::vmm::wait_exit(pid, &format!("kennel-{}", m.name), Duration::from_secs(5)).await;
        }
        self.running.lock().unwrap().insert(m.name.clone(), false);
        let sshd = self.sshd.lock().unwrap().remove(&m.name);
        if let Some(sshd) = sshd {
            // Gone (and its address free) before the VM counts as stopped.
            sshd.abort();
            let _ = sshd.await;
        }
        Ok(())
    }
}

#[derive(Default)]
struct FakeFs {
    fail: Mutex<bool>,
    starts: AtomicU32,
}

#[async_trait]
impl FsDaemon for FakeFs {
    async fn start(
        &self,
        socket: &Path,
        _: &Path,
        _: &Path,
        _: &Path,
    ) -> Result<u32, VirtiofsError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        if *self.fail.lock().unwrap() {
            return Err(VirtiofsError::Exited {
                log: "fake virtiofsd refused".into(),
            });
        }
        std::fs::write(socket, b"").unwrap();
        Ok(0)
    }
}

struct FakeImages {
    dir: PathBuf,
    fail: Mutex<bool>,
}

impl GuestImages for FakeImages {
    fn ensure(
        &self,
        stack: &str,
        _: &dyn Runner,
        say: &mut dyn FnMut(&str, &str),
    ) -> Result<(kernel::KernelSet, crate::image::ImageInfo), String> {
        if *self.fail.lock().unwrap() {
            return Err("mmdebstrap failed (fake)".into());
        }
        say("building", "installing essential packages");
        std::fs::create_dir_all(&self.dir).unwrap();
        let kernel = kernel::KernelSet {
            dir: self.dir.clone(),
            manifest: kernel::KernelManifest {
                package: "linux-image-cloud-amd64".into(),
                package_version: "1".into(),
                kernel_release: "6.1.0-fake".into(),
                busybox_version: "1".into(),
                modules: vec![],
                module_tree: false,
                sha256: Default::default(),
            },
        };
        let image = crate::image::ImageInfo {
            id: format!("{stack}-fake"),
            stack: stack.to_owned(),
            hash: "fake".into(),
            kernel_release: "6.1.0-fake".into(),
            packages: vec![],
            size_bytes: 0,
            built_at: 0,
            build_seconds: 0.0,
            dir: self.dir.clone(),
        };
        Ok((kernel, image))
    }
}

/// Records commands; makes key files for `ssh-keygen`; fails commands
/// containing `fail`.
#[derive(Default)]
struct KeyRunner {
    calls: Mutex<Vec<String>>,
    fail: Mutex<Option<&'static str>>,
    /// Runs `qemu-img` and `cp` for real (checkpoint tests on real layers).
    real_disks: std::sync::atomic::AtomicBool,
}

impl Runner for KeyRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let line = cmd.display();
        self.calls.lock().unwrap().push(line.clone());
        if let Some(f) = *self.fail.lock().unwrap() {
            if line.contains(f) {
                return Err(RunError::Failed {
                    command: line,
                    status: "exit status: 1".into(),
                    stderr: "failed (fake)".into(),
                });
            }
        }
        if self.real_disks.load(Ordering::SeqCst) && ["qemu-img", "cp"].contains(&&*cmd.program) {
            return crate::process::SystemRunner.run(cmd);
        }
        if cmd.program == "ssh-keygen" {
            let path = PathBuf::from(cmd.args.last().unwrap());
            std::fs::write(&path, "PRIVATE\n").unwrap();
            std::fs::write(path.with_extension("pub"), "ssh-ed25519 AAAAfake kennel\n").unwrap();
        }
        Ok(Output::default())
    }
}

/// VMs that boot take addresses from slot 1 up in each test's store, so
/// the tests that boot them take turns.
static ADDRESSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Rig {
    dir: tempfile::TempDir,
    p: LocalProvisioner,
    vmm: Arc<FakeVmm>,
    fs: Arc<FakeFs>,
    images: Arc<FakeImages>,
    runner: Arc<KeyRunner>,
    store: Store,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for d in ["data", "projects", "stacks", "templates", "recipe"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let (uid, gid) = (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let settings = Settings {
        data_dir: root.join("data"),
        stacks_dir: root.join("stacks"),
        templates_dir: root.join("templates"),
        recipe_dir: root.join("recipe"),
        apt_sources: root.join("sources.list"),
        apt_cache: None,
        network: NetworkMode::User,
        boot_timeout: Duration::from_secs(5),
        stop_timeout: Duration::from_secs(1),
        project_roots: vec![root.join("projects")],
        default_owner: (uid, gid),
        online: false,
        git_allow_private_hosts: Vec::new(),
        host_guard: None,
    };
    let store = Store::open_in_memory().unwrap();
    let (vmm, fs, runner) = (
        Arc::new(FakeVmm::default()),
        Arc::new(FakeFs::default()),
        Arc::new(KeyRunner::default()),
    );
    let images = Arc::new(FakeImages {
        dir: root.join("images"),
        fail: Mutex::new(false),
    });
    let p = LocalProvisioner::new(
        settings,
        vmm.clone(),
        fs.clone(),
        store.clone(),
        runner.clone(),
    )
    .with_images(images.clone());
    Rig {
        dir,
        p,
        vmm,
        fs,
        images,
        runner,
        store,
    }
}

impl Rig {
    fn source(&self, name: &str) -> PathBuf {
        self.dir.path().join("projects").join(name)
    }

    fn request(&self, name: &str) -> CreateRequest {
        CreateRequest {
            project: ProjectName::new(name).unwrap(),
            owner: kennel_core::names::UserName::new("ann").unwrap(),
            stack: Some("rust".into()),
            git: None,
            path: Some(self.source(name).display().to_string()),
            template: None,
            resources: Resources {
                vcpus: 1,
                memory_mib: 512,
                disk_mib: 1024,
            },
            app_port: 8000,
            authorized_keys: vec!["ssh-ed25519 AAAAuser ann".into()],
            adopt: false,
            git_token: None,
            author_name: "ann".into(),
            author_email: "ann@example.org".into(),
            public_hosts_only: false,
            host: None,
        }
    }

    async fn create(&self, name: &str) -> Result<Created, ProvisionError> {
        self.p
            .create(&self.request(name), &kennel_core::provision::NoProgress)
            .await
    }

    async fn slots(&self) -> Vec<(String, u32)> {
        self.store.call(|c| repo::all_slots(c)).await.unwrap()
    }

    /// Nothing of `name`'s VM is left: no VM directory, no keys, no slot.
    async fn assert_rolled_back(&self, name: &str) {
        let data = self.dir.path().join("data");
        assert!(
            !data.join("vms").join(name).exists(),
            "the VM directory is left"
        );
        assert!(
            !data.join("keys/projects").join(name).exists(),
            "the project key is left"
        );
        assert!(
            !self.slots().await.iter().any(|(p, _)| p == name),
            "the slot is still taken"
        );
        assert!(self.p.record(name).is_none());
    }
}

#[tokio::test]
async fn a_create_that_cannot_clone_leaves_nothing() {
    let r = rig();
    let mut req = r.request("noclone");
    req.git = Some(format!(
        "file://{}/nothing-here.git",
        r.dir.path().display()
    ));
    let e =
        r.p.create(&req, &kennel_core::provision::NoProgress)
            .await
            .unwrap_err();
    assert!(
        matches!(
            e,
            ProvisionError::Invalid {
                stage: Stage::Cloning,
                ..
            }
        ),
        "{e}"
    );
    r.assert_rolled_back("noclone").await;
    assert!(r.vmm.boots().is_empty());
}

#[tokio::test]
async fn a_create_whose_image_fails_keeps_only_the_source() {
    let r = rig();
    *r.images.fail.lock().unwrap() = true;
    let e = r.create("noimage").await.unwrap_err();
    assert!(matches!(e, ProvisionError::Image(_)), "{e}");
    r.assert_rolled_back("noimage").await;
    assert!(
        r.source("noimage").join(".git").is_dir(),
        "the new source is kept"
    );
}

#[tokio::test]
async fn a_create_whose_disk_fails_is_rolled_back() {
    let r = rig();
    *r.runner.fail.lock().unwrap() = Some("qemu-img create");
    let e = r.create("nodisk").await.unwrap_err();
    assert!(matches!(e, ProvisionError::Disk(_)), "{e}");
    r.assert_rolled_back("nodisk").await;
    assert!(r.source("nodisk").is_dir());
}

#[tokio::test]
async fn a_create_whose_virtiofsd_fails_is_rolled_back() {
    let r = rig();
    *r.fs.fail.lock().unwrap() = true;
    let e = r.create("nofs").await.unwrap_err();
    assert!(e.to_string().contains("fake virtiofsd refused"), "{e}");
    r.assert_rolled_back("nofs").await;
    assert!(r.vmm.boots().is_empty(), "no VMM without its file system");
}

#[tokio::test]
async fn a_create_whose_vmm_fails_is_rolled_back() {
    let r = rig();
    r.vmm.set(Boot::Fails);
    let e = r.create("novmm").await.unwrap_err();
    assert!(matches!(e, ProvisionError::Boot(_)), "{e}");
    r.assert_rolled_back("novmm").await;
    assert_eq!(r.vmm.boots().len(), 1, "a plain failure is not retried");
}

#[tokio::test]
async fn a_guest_that_never_gets_ready_is_rolled_back_with_its_console() {
    let r = rig();
    r.vmm.set(Boot::Dies);
    let e = r.create("silent").await.unwrap_err();
    assert!(
        e.to_string().contains("the VMM exited while booting"),
        "{e}"
    );
    assert!(e.to_string().contains("Last console lines"), "{e}");
    r.assert_rolled_back("silent").await;
}

#[tokio::test]
async fn a_taken_address_moves_the_vm_to_other_slots_then_gives_up() {
    let r = rig();
    r.vmm.set(Boot::AddressInUse);
    let e = r.create("crowded").await.unwrap_err();
    assert!(e.to_string().contains("another process holds"), "{e}");
    let boots = r.vmm.boots();
    assert_eq!(boots.len(), 6, "the first slot and five others: {boots:?}");
    let mut addrs: Vec<&String> = boots.iter().collect();
    addrs.dedup();
    assert_eq!(addrs.len(), 6, "each try on another address: {boots:?}");
    r.assert_rolled_back("crowded").await;
}

/// While a VM is stopped (by `stop`, or by `cp` copying its disk), another
/// program may bind its host address: the next start moves it to a free
/// slot instead of failing.
#[tokio::test]
async fn a_stopped_vm_whose_address_was_taken_starts_in_another_slot() {
    let _turn = ADDRESSES.lock().await;
    let r = rig();
    r.create("moved").await.unwrap();
    let name = ProjectName::new("moved").unwrap();
    r.p.stop(&name).await.unwrap();
    let before = r.p.record("moved").unwrap();
    let squatter = std::net::TcpListener::bind(before.machine.net.ssh_addr()).unwrap();
    let status =
        r.p.start(
            &kennel_core::provision::VmSpec {
                project: name.clone(),
                stack: "rust".into(),
                source_path: r.source("moved").display().to_string(),
                resources: Resources {
                    vcpus: before.machine.vcpus,
                    memory_mib: before.machine.memory_mib,
                    disk_mib: 1024,
                },
                app_port: 8000,
                authorized_keys: vec![],
            },
            &kennel_core::provision::NoProgress,
        )
        .await
        .unwrap();
    assert!(status.ready, "{status:?}");
    let after = r.p.record("moved").unwrap();
    assert_ne!(after.slot, before.slot, "it moved");
    assert_eq!(
        status.ssh_addr.as_deref(),
        Some(after.machine.net.ssh_addr().as_str()),
        "the route names the new address"
    );
    drop(squatter);
    r.p.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn a_create_boots_stops_and_starts_again() {
    let _turn = ADDRESSES.lock().await;
    let r = rig();
    let created = r.create("fine").await.unwrap();
    assert!(created.status.ready, "{created:?}");
    let record = r.p.record("fine").unwrap();
    assert_eq!(record.stack, "rust");
    assert_eq!(r.fs.starts.load(Ordering::SeqCst), 1);
    let name = ProjectName::new("fine").unwrap();
    assert_eq!(r.p.vm_alive(&name).await, Some(true));
    let keys = r.p.vm_keys(&name).unwrap();
    assert!(keys.client_key.ends_with("keys/projects/fine/id_ed25519"));
    assert_eq!(
        keys.host_key.as_deref(),
        Some("ssh-ed25519 AAAAfake kennel")
    );
    r.p.stop(&name).await.unwrap();
    assert_eq!(r.p.vm_alive(&name).await, Some(false));
    let status =
        r.p.start(
            &kennel_core::provision::VmSpec {
                project: name.clone(),
                stack: "rust".into(),
                source_path: r.source("fine").display().to_string(),
                resources: Resources {
                    vcpus: record.machine.vcpus,
                    memory_mib: record.machine.memory_mib,
                    disk_mib: 1024,
                },
                app_port: 8000,
                authorized_keys: vec![],
            },
            &kennel_core::provision::NoProgress,
        )
        .await
        .unwrap();
    assert!(status.ready);
    r.p.destroy(&name).await.unwrap();
    r.assert_rolled_back("fine").await;
    assert!(r.source("fine").is_dir(), "destroy keeps the source");
}

#[tokio::test]
async fn reconcile_adopts_the_living_cleans_the_dead_and_removes_the_half_made() {
    let _turn = ADDRESSES.lock().await;
    let r = rig();
    r.create("alive").await.unwrap();
    r.create("dead").await.unwrap();
    // "dead"'s VMM is gone (killed), as a restarted Kennel finds it.
    let dead = r.p.record("dead").unwrap();
    r.vmm.force_stop(&dead.machine).await.unwrap();
    r.vmm.stops.lock().unwrap().clear();
    // A create cut off before its record was written.
    let half = r.dir.path().join("data/vms/half");
    std::fs::create_dir_all(&half).unwrap();
    let mut found = r.p.reconcile().await;
    found.sort();
    assert_eq!(
        found,
        vec![("alive".to_owned(), true), ("dead".to_owned(), false)]
    );
    assert!(!half.exists(), "the half-made VM directory is removed");
    assert!(
        !dead.machine.pid_file.exists(),
        "the dead VM's pid file is cleared"
    );
    assert_eq!(*r.vmm.stops.lock().unwrap(), vec!["dead".to_owned()]);
    assert!(
        r.p.record("dead").is_some(),
        "a dead VM keeps its disk, to start again"
    );
    // The living one was not touched.
    let alive = ProjectName::new("alive").unwrap();
    assert_eq!(r.p.vm_alive(&alive).await, Some(true));
    r.p.destroy(&alive).await.unwrap();
    r.p.destroy(&ProjectName::new("dead").unwrap())
        .await
        .unwrap();
}

/// A VMM that is alive but does not answer is never taken for a stopped
/// one: what would write under a running VM refuses and says why, and a
/// restarted Kennel adopts it instead of tearing it down.
#[tokio::test]
async fn a_vmm_that_does_not_answer_is_not_taken_for_stopped() {
    use kennel_core::provision::NoProgress;
    let _turn = ADDRESSES.lock().await;
    let r = rig();
    r.create("mute").await.unwrap();
    let name = ProjectName::new("mute").unwrap();
    r.vmm.mute.lock().unwrap().insert("mute".into());
    let e = r.p.checkpoint(&name, "c1", &NoProgress).await.unwrap_err();
    let said = e.to_string();
    assert!(said.contains("does not answer"), "{said}");
    assert!(said.contains("stop mute"), "{said}");
    let cks = r.dir.path().join("data/vms/mute/checkpoints");
    assert!(
        std::fs::read_dir(&cks).map_or(true, |mut d| d.next().is_none()),
        "nothing of the checkpoint is left"
    );
    let e =
        r.p.restore_checkpoint(&name, "c1", &NoProgress)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("does not answer"), "{e}");
    let spec = kennel_core::provision::VmSpec {
        project: name.clone(),
        stack: "rust".into(),
        source_path: r.source("mute").display().to_string(),
        resources: Resources {
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
        },
        app_port: 8000,
        authorized_keys: vec![],
    };
    let e = r.p.start(&spec, &NoProgress).await.unwrap_err();
    assert!(e.to_string().contains("does not answer"), "{e}");
    assert_eq!(r.vmm.boots().len(), 1, "no second VMM was booted");
    let e = r.p.resize(&name, &spec.resources).await.unwrap_err();
    assert!(e.to_string().contains("does not answer"), "{e}");
    // A restart adopts it: no stop, no cleanup under it.
    r.vmm.stops.lock().unwrap().clear();
    let found = r.p.reconcile().await;
    assert_eq!(found, vec![("mute".to_owned(), true)]);
    assert!(r.vmm.stops.lock().unwrap().is_empty());
    // It answers again: all is as before.
    r.vmm.mute.lock().unwrap().clear();
    assert_eq!(r.p.vm_alive(&name).await, Some(true));
    r.p.destroy(&name).await.unwrap();
}

/// Writes `pattern` at the start of a qcow2 disk, or checks it is there.
fn qemu_io(disk: &Path, op: &str, pattern: u8) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("{op} -P {pattern:#x} 0 64k"))
        .arg(disk)
        .output()
        .expect("qemu-io (Debian's qemu-utils) runs");
    let said = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !said.contains("verification failed") && !said.contains("error")
}

#[tokio::test]
async fn checkpoints_freeze_restore_and_merge_real_qcow2_layers() {
    use kennel_core::provision::NoProgress;
    let _a = ADDRESSES.lock().await;
    let r = rig();
    r.runner.real_disks.store(true, Ordering::SeqCst);
    std::fs::create_dir_all(&r.images.dir).unwrap();
    std::fs::File::create(r.images.dir.join("rootfs.ext4"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    r.create("ck").await.unwrap();
    let name = ProjectName::new("ck").unwrap();
    let (vm, src) = (r.dir.path().join("data/vms/ck"), r.source("ck"));
    let disk = vm.join("disk.qcow2");
    // This backend cannot switch a running disk: it says what to do.
    let e = r.p.checkpoint(&name, "c0", &NoProgress).await.unwrap_err();
    assert!(e.to_string().contains("stop ck first"), "{e}");
    r.p.stop(&name).await.unwrap();

    assert!(qemu_io(&disk, "write", 0x11));
    std::fs::write(src.join("a.txt"), "one").unwrap();
    std::os::unix::fs::symlink("/etc", src.join("out")).unwrap();
    let cost = r.p.checkpoint(&name, "c1", &NoProgress).await.unwrap();
    assert!(cost.disk_bytes > 0, "{cost:?}");
    assert_eq!(cost.paused_ms, 0);
    assert_eq!(
        std::fs::read_link(vm.join("checkpoints/c1/source/out")).unwrap(),
        PathBuf::from("/etc"),
        "links are copied as links"
    );
    // The disk goes on in a new layer: the checkpoint's does not change.
    assert!(qemu_io(&disk, "write", 0x22));
    assert!(qemu_io(&vm.join("checkpoints/c1.qcow2"), "read", 0x11));
    std::fs::write(src.join("a.txt"), "two").unwrap();
    std::fs::write(src.join("b.txt"), "new").unwrap();
    let cost2 = r.p.checkpoint(&name, "c2", &NoProgress).await.unwrap();
    assert_eq!(
        cost2.disk_shared_bytes,
        disk::allocated_bytes(&vm.join("checkpoints/c1.qcow2")),
        "c2 reads through c1"
    );

    r.p.restore_checkpoint(&name, "c1", &NoProgress)
        .await
        .unwrap();
    assert!(qemu_io(&disk, "read", 0x11), "the disk is back");
    assert_eq!(std::fs::read_to_string(src.join("a.txt")).unwrap(), "one");
    assert!(!src.join("b.txt").exists());
    assert!(!vm.join("rollback.json").exists());
    assert!(!r.dir.path().join("projects/ck.kennel-replaced").exists());

    // c1 removed: two layers read through it (the disk and c2), so it
    // stays until one goes; c2 removed too, then both are merged away.
    r.p.remove_checkpoint(&name, "c1").await.unwrap();
    assert!(vm.join("checkpoints/c1.qcow2").exists());
    r.p.remove_checkpoint(&name, "c2").await.unwrap();
    assert!(!vm.join("checkpoints/c2.qcow2").exists());
    assert!(!vm.join("checkpoints/c1.qcow2").exists());
    assert!(qemu_io(&disk, "read", 0x11), "merged, the data stays");

    // Cut off mid-rollback after the journal: finished before the boot.
    // (This store has no rows: tidying also drops c3 as never recorded.)
    r.p.checkpoint(&name, "c3", &NoProgress).await.unwrap();
    std::fs::write(src.join("a.txt"), "three").unwrap();
    let staging = r.dir.path().join("projects/ck.kennel-rollback");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("a.txt"), "staged").unwrap();
    std::fs::write(
        vm.join("rollback.json"),
        format!(r#"{{"label":"c3","source":"{}"}}"#, src.display()),
    )
    .unwrap();
    let record = r.p.record("ck").unwrap();
    r.p.tidy_checkpoints(&record).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(src.join("a.txt")).unwrap(),
        "staged"
    );
    assert!(!staging.exists() && !vm.join("rollback.json").exists());
    assert!(!vm.join("checkpoints/c3").exists());
    assert!(!vm.join("checkpoints/c3.qcow2").exists());
    assert!(qemu_io(&disk, "read", 0x11));

    // Cut off while staging a rollback's source (no journal): it never began.
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("a.txt"), "half").unwrap();
    r.p.tidy_checkpoints(&record).await.unwrap();
    assert!(!staging.exists());
    assert_eq!(
        std::fs::read_to_string(src.join("a.txt")).unwrap(),
        "staged"
    );

    // Cut off mid-checkpoint after the link: the start finishes it.
    let next = vm.join("disk.next.qcow2");
    let layer = vm.join("checkpoints/c4.qcow2");
    disk::create_child(&crate::process::SystemRunner, &layer, &next, 4 << 30).unwrap();
    std::fs::hard_link(&disk, &layer).unwrap();
    r.p.tidy_checkpoints(&record).await.unwrap();
    assert!(!next.exists());
    assert!(!layer.exists(), "a layer never recorded is merged away");
    assert!(qemu_io(&disk, "read", 0x11));
    r.p.checkpoint(&name, "c5", &NoProgress).await.unwrap();

    // The same after a live switch (`disk.live-*`, which the VM wrote to),
    // settled by the stopped VM's next checkpoint before it freezes.
    let live = vm.join("disk.live-1.qcow2");
    let layer = vm.join("checkpoints/c6.qcow2");
    disk::create_child(&crate::process::SystemRunner, &layer, &live, 4 << 30).unwrap();
    std::fs::hard_link(&disk, &layer).unwrap();
    assert!(qemu_io(&live, "write", 0x33));
    r.p.checkpoint(&name, "c7", &NoProgress).await.unwrap();
    assert!(!live.exists());
    assert!(
        qemu_io(&vm.join("checkpoints/c7.qcow2"), "read", 0x33),
        "c7 holds what the VM wrote last"
    );

    // A rename keeps every layer's backing file reachable, once a new
    // layer a crash left beside the disk is the disk (as `rename` and
    // `cp` settle it first).
    let live = vm.join("disk.live-2.qcow2");
    let layer = vm.join("checkpoints/c8.qcow2");
    disk::create_child(&crate::process::SystemRunner, &layer, &live, 4 << 30).unwrap();
    std::fs::hard_link(&disk, &layer).unwrap();
    assert!(qemu_io(&live, "write", 0x44));
    r.p.settle_cut_off(&record).await.unwrap();
    assert!(!live.exists());
    let vm2 = r.dir.path().join("data/vms/ck2");
    std::fs::rename(&vm, &vm2).unwrap();
    r.p.repoint_layers(&crate::process::SystemRunner, &vm, &vm2)
        .unwrap();
    let disk2 = r.dir.path().join("data/vms/ck2/disk.qcow2");
    assert!(qemu_io(&disk2, "read", 0x44));
    let info = disk::info(&crate::process::SystemRunner, &disk2).unwrap();
    assert!(info.backing.unwrap().contains("/vms/ck2/"), "repointed");
}
