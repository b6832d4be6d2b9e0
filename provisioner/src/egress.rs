//! Enforces a closed project's egress policy (see `kennel_core::egress`)
//! for QEMU's user-mode networking.
//!
//! What a guest connects to, QEMU connects to from the host, so the rules
//! sit on QEMU's own sockets: each VM's QEMU runs in a group of its own
//! ([`crate::hostguard::vm_gid`]), and a closed VM gets an nftables table
//! `inet kennel_egress_<gid>` that
//!
//! - sends every DNS query of that group, to whatever server and over UDP
//!   or TCP, to Kennel's resolver for the VM (a NAT rule to the VM's own
//!   loopback address, `127.77.x.y:53`), and refuses DNS over IPv6;
//! - lets through established traffic, the host's own addresses (the host
//!   guard decides there: Kennel's gateways only), the blocks the list
//!   allows, and the addresses the resolver handed out for allowed names,
//!   for their TTL (sets with timeouts), on the allowed ports;
//! - refuses the rest at once (a reset, or ICMP admin-prohibited), counting
//!   it; private ranges and link-local stay closed unless the owner is an
//!   admin.
//!
//! The resolver answers an allowed name with what the host's resolver
//! says (private addresses dropped for members), a denied name with
//! NXDOMAIN, and a name nobody decided on with REFUSED, asking the owner
//! once ([`EgressAsked`]). A guest with root cannot get around it: raw
//! sockets and ICMP leave through QEMU's sockets too, another resolver is
//! the same NAT rule, IPv6 meets the same sets.
//!
//! Open projects have no table: their traffic is as before.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use hickory_resolver::Resolver;
use kennel_core::egress::{
    public, DestHost, EgressAsked, EgressMode, EgressPolicy, NameJudgement, Verdict,
};
use kennel_core::names::ProjectName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::process::{Cmd, Runner};

/// Addresses stay allowed this long past their TTL (a connection opened
/// just before it ran out).
const GRACE_SECS: u64 = 30;
/// Shortest and longest time an address stays allowed.
const MIN_SECS: u64 = 30;
const MAX_SECS: u64 = 86_400;
/// Records one answer carries at most.
const MAX_RECORDS: usize = 32;
/// Names one VM may be asked about per boot (a guest asking for random
/// names grows nothing past it).
const MAX_ASKED: usize = 256;
/// Queries one VM's resolver works on at once; more are dropped (the
/// guest asks again).
const MAX_IN_FLIGHT: usize = 64;

/// Whose packets a closed VM's rules match, and where its resolver
/// listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// QEMU's user-mode networking: the sockets of the VM's QEMU (its own
    /// group); the resolver on the VM's loopback address, port 53.
    Group { gid: u32, dns: Ipv4Addr },
    /// A TAP on Kennel's bridge: packets from the guest's address (which
    /// a bridge-family rule keeps honest); the resolver on the bridge's
    /// address, a port of the VM's own.
    Tap {
        slot: u32,
        tap: [u8; 15],
        guest: Ipv4Addr,
        gateway: Ipv4Addr,
    },
}

/// The resolvers of bridged VMs listen on the bridge's address at this
/// port plus the VM's slot.
pub const TAP_DNS_BASE: u16 = 40_000;

impl Carrier {
    /// The bridged VM in `slot` on TAP `tap`, `None` for a slot or name
    /// that does not fit.
    pub fn tap(slot: u32, tap: &str, guest: Ipv4Addr, gateway: Ipv4Addr) -> Option<Self> {
        let bytes = tap.as_bytes();
        if bytes.is_empty() || bytes.len() > 15 || !bytes.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        u16::try_from(slot).ok()?.checked_add(TAP_DNS_BASE)?;
        let mut name = [0u8; 15];
        name.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(Self::Tap {
            slot,
            tap: name,
            guest,
            gateway,
        })
    }

    /// The nftables table(s) of the VM.
    pub fn table(&self) -> String {
        match self {
            Self::Group { gid, .. } => format!("kennel_egress_{gid:x}"),
            Self::Tap { slot, .. } => format!("kennel_egress_b{slot}"),
        }
    }

    /// Where its resolver listens.
    pub fn resolver(&self) -> (Ipv4Addr, u16) {
        match *self {
            Self::Group { dns, .. } => (dns, 53),
            Self::Tap { slot, gateway, .. } => (
                gateway,
                u16::try_from(slot)
                    .ok()
                    .and_then(|s| s.checked_add(TAP_DNS_BASE))
                    .unwrap_or(TAP_DNS_BASE),
            ),
        }
    }

    fn tap_name(&self) -> String {
        match self {
            Self::Tap { tap, .. } => String::from_utf8_lossy(tap)
                .trim_end_matches('\0')
                .to_owned(),
            Self::Group { .. } => String::new(),
        }
    }

    /// The match for the VM's packets.
    fn matches(&self) -> String {
        match self {
            Self::Group { gid, .. } => format!("meta skgid {gid}"),
            Self::Tap { guest, .. } => format!("ip saddr {guest}"),
        }
    }

    /// The hooks its DNS redirect and its filter sit on.
    fn hooks(&self) -> (&'static str, &'static str) {
        match self {
            Self::Group { .. } => ("output", "output"),
            Self::Tap { .. } => ("prerouting", "forward"),
        }
    }
}

/// An address allowed until some time, on one port or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handed {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

/// The rules of chain `vm`: what a closed VM may reach.
pub fn vm_rules(policy: &EgressPolicy, (dns, port): (Ipv4Addr, u16)) -> String {
    let mut r = String::new();
    let mut line = |s: &str| {
        r.push_str("    ");
        r.push_str(s);
        r.push('\n');
    };
    line("ct state established,related accept");
    line(&format!(
        "meta nfproto ipv4 ip daddr {dns} meta l4proto {{ tcp, udp }} th dport {port} accept"
    ));
    // Any other DNS (IPv6, a server the NAT rule missed) is refused.
    line("meta l4proto { tcp, udp } th dport 53 jump deny");
    // The host's own addresses: the host guard decides (gateways only).
    line("fib daddr type local return");
    if !policy.private_ok {
        line("ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } jump deny");
        line("ip6 daddr { ::/127, ::ffff:0:0/96, fc00::/7, fe80::/10, ff00::/8 } jump deny");
    }
    let block = |v: Verdict| {
        policy
            .rules
            .iter()
            .filter(move |rule| rule.verdict == v)
            .filter_map(|rule| match rule.dest.host {
                DestHost::Net { addr, prefix } => Some((addr, prefix, rule.dest.port)),
                DestHost::Name(_) => None,
            })
    };
    let net_rule = |addr: IpAddr, prefix: u8, port: Option<u16>, then: &str| {
        let fam = if addr.is_ipv4() { "ip" } else { "ip6" };
        let port = port
            .map(|p| format!(" meta l4proto {{ tcp, udp }} th dport {p}"))
            .unwrap_or_default();
        format!("{fam} daddr {addr}/{prefix}{port} {then}")
    };
    for (addr, prefix, port) in block(Verdict::Deny) {
        line(&net_rule(addr, prefix, port, "jump deny"));
    }
    for (addr, prefix, port) in block(Verdict::Allow) {
        line(&net_rule(addr, prefix, port, "accept"));
    }
    line("ip daddr @a4 accept");
    line("meta l4proto { tcp, udp } ip daddr . th dport @p4 accept");
    line("ip6 daddr @a6 accept");
    line("meta l4proto { tcp, udp } ip6 daddr . th dport @p6 accept");
    line("jump deny");
    r
}

/// `add element` lines for `handed`, each for its seconds left.
pub fn elements(t: &str, handed: &[(Handed, u64)]) -> String {
    let mut s = String::new();
    for (h, secs) in handed {
        let (set, key) = match (h.ip, h.port) {
            (IpAddr::V4(ip), None) => ("a4", ip.to_string()),
            (IpAddr::V6(ip), None) => ("a6", ip.to_string()),
            (IpAddr::V4(ip), Some(p)) => ("p4", format!("{ip} . {p}")),
            (IpAddr::V6(ip), Some(p)) => ("p6", format!("{ip} . {p}")),
        };
        s.push_str(&format!(
            "add element inet {t} {set} {{ {key} timeout {secs}s }}\n"
        ));
    }
    s
}

/// The whole script for a VM: its table made anew (`fresh`), or its
/// rules and sets replaced, then `handed` put back.
pub fn script(c: &Carrier, policy: &EgressPolicy, fresh: bool, handed: &[(Handed, u64)]) -> String {
    let t = c.table();
    let m = c.matches();
    let (nat_hook, filter_hook) = c.hooks();
    let (dns, port) = c.resolver();
    let mut s = String::new();
    if fresh {
        s.push_str(&format!(
            "table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  set a4 {{ type ipv4_addr; flags timeout; }}\n  set a6 {{ type ipv6_addr; flags timeout; }}\n  set p4 {{ type ipv4_addr . inet_service; flags timeout; }}\n  set p6 {{ type ipv6_addr . inet_service; flags timeout; }}\n  counter denied {{ }}\n  chain dns {{\n    type nat hook {nat_hook} priority -100; policy accept;\n    {m} meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {dns}:{port}\n  }}\n  chain deny {{\n    counter name denied\n    meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited\n  }}\n  chain vm {{\n  }}\n  chain out {{\n    type filter hook {filter_hook} priority filter; policy accept;\n    {m} jump vm\n  }}\n}}\n"
        ));
        if let Carrier::Tap { guest, .. } = c {
            // The guest's address is who it is: a guest that sends as
            // another (or over IPv6) is dropped at its TAP.
            let tap = c.tap_name();
            s.push_str(&format!(
                "table bridge {t}\ndelete table bridge {t}\ntable bridge {t} {{\n  chain pre {{\n    type filter hook prerouting priority -200; policy accept;\n    iifname \"{tap}\" ether type ip ip saddr != {guest} drop\n    iifname \"{tap}\" ether type arp arp saddr ip != {guest} drop\n    iifname \"{tap}\" ether type ip6 drop\n  }}\n}}\n"
            ));
        }
    } else {
        s.push_str(&format!("flush chain inet {t} vm\n"));
        for set in ["a4", "a6", "p4", "p6"] {
            s.push_str(&format!("flush set inet {t} {set}\n"));
        }
    }
    s.push_str(&format!(
        "table inet {t} {{\n  chain vm {{\n{}  }}\n}}\n",
        vm_rules(policy, (dns, port))
    ));
    s.push_str(&elements(&t, handed));
    s
}

/// What a closed VM has: its table, resolver and what it handed out.
struct Vm {
    project: ProjectName,
    carrier: Carrier,
    state: Mutex<VmState>,
}

struct VmState {
    policy: EgressPolicy,
    /// Names answered, with the addresses each gave.
    names: HashMap<String, Vec<IpAddr>>,
    /// What is in the sets now, until when.
    handed: HashMap<Handed, Instant>,
    /// Names asked about since the VM booted.
    asked: HashSet<String>,
    tasks: Vec<JoinHandle<()>>,
    expiry: Option<JoinHandle<()>>,
}

impl Drop for VmState {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(t) = self.expiry.take() {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The egress service of one Kennel (QEMU user-mode networking).
pub struct Egress {
    runner: Arc<dyn Runner>,
    dir: PathBuf,
    /// The host guard's group range (`None`: no root, nothing enforced).
    base_gid: Option<u32>,
    policies: Mutex<HashMap<String, EgressPolicy>>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    asks: mpsc::UnboundedSender<EgressAsked>,
    asks_rx: Mutex<Option<mpsc::UnboundedReceiver<EgressAsked>>>,
    upstream: tokio::sync::OnceCell<Result<Arc<Resolver<TokioRuntimeProvider>>, String>>,
    counters: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("base_gid", &self.base_gid)
            .finish_non_exhaustive()
    }
}

impl Egress {
    pub fn new(runner: Arc<dyn Runner>, data_dir: PathBuf, base_gid: Option<u32>) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            runner,
            dir: data_dir.join("egress"),
            base_gid,
            policies: Mutex::default(),
            vms: Mutex::default(),
            asks: tx,
            asks_rx: Mutex::new(Some(rx)),
            upstream: tokio::sync::OnceCell::new(),
            counters: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether `policy` can be enforced here.
    pub fn supported(&self, policy: &EgressPolicy) -> Result<(), String> {
        if policy.mode == EgressMode::Open {
            return Ok(());
        }
        if self.base_gid.is_none() {
            return Err("closed egress needs Kennel to run as root (it loads nftables rules and starts QEMU in a group of its own); run 'kennel serve' as root".into());
        }
        Ok(())
    }

    /// The asks, for the daemon (once).
    pub fn take_asks(&self) -> Option<mpsc::UnboundedReceiver<EgressAsked>> {
        lock(&self.asks_rx).take()
    }

    /// Whether `project`'s VM has its table and resolver.
    pub fn armed(&self, project: &ProjectName) -> bool {
        lock(&self.vms).contains_key(project.as_str())
    }

    /// The policy Kennel was last given for `project` (open if none).
    pub fn policy_of(&self, project: &str) -> EgressPolicy {
        lock(&self.policies)
            .get(project)
            .cloned()
            .unwrap_or_default()
    }

    /// Sets `project`'s policy: applied at once where its VM runs closed
    /// (or taken away when it turns open); a VM that runs open and turns
    /// closed is armed by the caller ([`Egress::arm`]), which knows its
    /// group and address.
    pub async fn set(
        self: &Arc<Self>,
        project: &ProjectName,
        policy: &EgressPolicy,
    ) -> Result<(), String> {
        self.supported(policy)?;
        lock(&self.policies).insert(project.to_string(), policy.clone());
        let vm = lock(&self.vms).get(project.as_str()).cloned();
        match vm {
            Some(vm) if policy.mode == EgressMode::Closed => {
                self.apply(&vm, policy.clone(), false).await
            }
            Some(vm) => {
                self.disarm(&vm.project).await;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Before `project`'s VM starts, with `carrier` its packets' mark: a
    /// closed policy gets its table and resolver; an open one none. `Err`
    /// fails the boot (nothing runs unguarded).
    pub async fn arm(
        self: &Arc<Self>,
        project: &ProjectName,
        carrier: Carrier,
    ) -> Result<(), String> {
        self.disarm(project).await;
        // Another project's VM held this slot before (its VM gone).
        let stale: Vec<ProjectName> = lock(&self.vms)
            .values()
            .filter(|v| v.carrier.table() == carrier.table())
            .map(|v| v.project.clone())
            .collect();
        for p in stale {
            self.disarm(&p).await;
        }
        let policy = self.policy_of(project.as_str());
        if policy.mode == EgressMode::Open {
            return Ok(());
        }
        self.supported(&policy)?;
        let (dns, port) = carrier.resolver();
        let udp = tokio::net::UdpSocket::bind((dns, port))
            .await
            .map_err(|e| format!("cannot start the VM's resolver on {dns}:{port}: {e}"))?;
        let tcp = tokio::net::TcpListener::bind((dns, port))
            .await
            .map_err(|e| format!("cannot start the VM's resolver on {dns}:{port}/tcp: {e}"))?;
        let vm = Arc::new(Vm {
            project: project.clone(),
            carrier,
            state: Mutex::new(VmState {
                policy: policy.clone(),
                names: HashMap::new(),
                handed: HashMap::new(),
                asked: HashSet::new(),
                tasks: Vec::new(),
                expiry: None,
            }),
        });
        self.apply(&vm, policy, true).await?;
        let udp = Arc::new(udp);
        let tasks = vec![
            tokio::spawn(serve_udp(self.clone(), vm.clone(), udp)),
            tokio::spawn(serve_tcp(self.clone(), vm.clone(), tcp)),
        ];
        lock(&vm.state).tasks = tasks;
        lock(&self.vms).insert(project.to_string(), vm);
        self.watch_counters().await;
        tracing::info!(project = %project, table = %carrier.table(), "egress closed: table and resolver in place");
        Ok(())
    }

    /// Takes `project`'s table and resolver away (its VM stopped).
    pub async fn disarm(&self, project: &ProjectName) {
        let vm = lock(&self.vms).remove(project.as_str());
        if let Some(vm) = vm {
            {
                let mut st = lock(&vm.state);
                for t in st.tasks.drain(..) {
                    t.abort();
                }
                if let Some(t) = st.expiry.take() {
                    t.abort();
                }
            }
            let t = vm.carrier.table();
            let _ = self.nft_line(format!("delete table inet {t}")).await;
            if matches!(vm.carrier, Carrier::Tap { .. }) {
                let _ = self.nft_line(format!("delete table bridge {t}")).await;
            }
        }
    }

    /// Loads `policy` for `vm`: anew (`fresh`), or in place, keeping what
    /// the resolver handed out that the policy still allows.
    async fn apply(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        policy: EgressPolicy,
        fresh: bool,
    ) -> Result<(), String> {
        let next = policy.next_expiry(kennel_core::model::now());
        self.load(vm, policy, fresh).await?;
        self.expire_later(vm, next);
        Ok(())
    }

    /// [`Egress::apply`] in place, without scheduling expiry.
    async fn reload(&self, vm: &Vm, policy: EgressPolicy) -> Result<(), String> {
        self.load(vm, policy, false).await
    }

    async fn load(&self, vm: &Vm, policy: EgressPolicy, fresh: bool) -> Result<(), String> {
        let now = Instant::now();
        let unix = kennel_core::model::now();
        let keep: Vec<(Handed, u64)> = {
            let mut st = lock(&vm.state);
            st.policy = policy.clone();
            let mut keep = Vec::new();
            let names: Vec<(String, Vec<IpAddr>)> = st
                .names
                .iter()
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect();
            let mut handed = HashMap::new();
            for (name, addrs) in names {
                let NameJudgement::Allowed { ports, until } = policy.judge_name(&name, unix) else {
                    continue;
                };
                for ip in addrs {
                    for port in ports_of(ports.as_deref()) {
                        let h = Handed { ip, port };
                        let Some(at) = st.handed.get(&h).copied().or_else(|| {
                            // Same address, the other port shape: keep its time.
                            st.handed.iter().find(|(k, _)| k.ip == ip).map(|(_, t)| *t)
                        }) else {
                            continue;
                        };
                        let mut left = at.saturating_duration_since(now).as_secs();
                        if let Some(u) = until {
                            left = left.min(u64::try_from(u - unix).unwrap_or(0));
                        }
                        if left > 0 {
                            handed.insert(h, now + Duration::from_secs(left));
                            keep.push((h, left));
                        }
                    }
                }
            }
            st.handed = handed;
            keep
        };
        let text = script(&vm.carrier, &policy, fresh, &keep);
        self.nft_file(&vm.project, text).await
    }

    /// Takes rules that expire (allow-once) off when they do.
    fn expire_later(self: &Arc<Self>, vm: &Arc<Vm>, next: Option<i64>) {
        let me = Arc::downgrade(self);
        let v = vm.clone();
        let task = next.map(|first| {
            tokio::spawn(async move {
                let mut next = Some(first);
                while let Some(t) = next {
                    let unix = kennel_core::model::now();
                    let wait = u64::try_from(t - unix).unwrap_or(0) + 1;
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                    let Some(me) = me.upgrade() else { return };
                    let unix = kennel_core::model::now();
                    let p = me.policy_of(v.project.as_str()).live(unix);
                    next = p.next_expiry(unix);
                    if let Err(e) = me.reload(&v, p).await {
                        tracing::warn!(project = %v.project, error = %e, "could not take expired egress rules off");
                    }
                }
            })
        });
        let mut st = lock(&vm.state);
        if let Some(old) = std::mem::replace(&mut st.expiry, task) {
            old.abort();
        }
    }

    async fn nft_file(&self, project: &ProjectName, text: String) -> Result<(), String> {
        let file = self.dir.join(format!("{project}.nft"));
        let runner = self.runner.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
            std::fs::write(&file, text)
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            runner
                .run(&Cmd::new("nft").arg("-f").arg(&file))
                .map(|_| ())
                .map_err(|e| format!("nft could not load {}: {e}", file.display()))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn nft_line(&self, line: String) -> Result<(), String> {
        let runner = self.runner.clone();
        tokio::task::spawn_blocking(move || {
            runner
                .run(&Cmd::new("nft").arg(&line))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn upstream(&self) -> Result<Arc<Resolver<TokioRuntimeProvider>>, String> {
        self.upstream
            .get_or_init(|| async {
                Resolver::builder_tokio()
                    .and_then(|b| b.build())
                    .map(Arc::new)
                    .map_err(|e| format!("no resolver for guests: {e}"))
            })
            .await
            .clone()
    }

    /// Reads the VMs' denied counters into the metrics every 15 s.
    async fn watch_counters(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.counters
            .get_or_init(|| async move {
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(15)).await;
                        let Some(me) = me.upgrade() else { return };
                        let vms: Vec<Arc<Vm>> = lock(&me.vms).values().cloned().collect();
                        for vm in vms {
                            if let Some(n) = me.denied(&vm.carrier.table()).await {
                                metrics::counter!("kennel_egress_denied_total", "project" => vm.project.to_string())
                                    .absolute(n);
                            }
                        }
                    }
                });
            })
            .await;
    }

    /// Connections refused so far by table `t`.
    pub async fn denied(&self, t: &str) -> Option<u64> {
        let runner = self.runner.clone();
        let t = t.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            runner.run(&Cmd::new("nft").args(["-j", "list", "counter", "inet", &t, "denied"]))
        })
        .await
        .ok()?
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        v.get("nftables")?
            .as_array()?
            .iter()
            .find_map(|o| o.get("counter")?.get("packets")?.as_u64())
    }

    /// Answers one query of `vm`'s guest.
    async fn answer(&self, vm: &Vm, query: &[u8]) -> Option<Vec<u8>> {
        let req = Message::from_vec(query).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        let Some(q) = req.queries.first().cloned() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp.to_vec().ok();
        };
        resp.add_query(q.clone());
        if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
            resp.metadata.response_code = ResponseCode::NotImp;
            return resp.to_vec().ok();
        }
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let unix = kennel_core::model::now();
        let (judged, private_ok) = {
            let st = lock(&vm.state);
            (st.policy.judge_name(&name, unix), st.policy.private_ok)
        };
        match judged {
            NameJudgement::Denied => resp.metadata.response_code = ResponseCode::NXDomain,
            NameJudgement::Unknown => {
                resp.metadata.response_code = ResponseCode::Refused;
                let new = {
                    let mut st = lock(&vm.state);
                    st.asked.len() < MAX_ASKED && st.asked.insert(name.clone())
                };
                if new && kennel_core::egress::name(&name).is_ok() {
                    let _ = self.asks.send(EgressAsked {
                        project: vm.project.clone(),
                        dest: name,
                    });
                }
            }
            NameJudgement::Allowed { ports, until } => {
                let qt = q.query_type();
                if matches!(qt, RecordType::A | RecordType::AAAA) {
                    match self.resolve(&name, qt).await {
                        Ok(records) => {
                            let records: Vec<Record> = records
                                .into_iter()
                                .filter(|r| match ip_of(r) {
                                    Some(ip) => private_ok || public(ip),
                                    None => matches!(r.data, RData::CNAME(_)),
                                })
                                .take(MAX_RECORDS)
                                .collect();
                            self.hand_out(vm, &name, &records, ports.as_deref(), until, unix)
                                .await;
                            resp.add_answers(records);
                        }
                        Err(code) => resp.metadata.response_code = code,
                    }
                }
            }
        }
        resp.to_vec().ok()
    }

    async fn resolve(&self, name: &str, qt: RecordType) -> Result<Vec<Record>, ResponseCode> {
        let upstream = self.upstream().await.map_err(|e| {
            tracing::warn!(error = %e, "no upstream resolver for guests");
            ResponseCode::ServFail
        })?;
        match upstream.lookup(format!("{name}."), qt).await {
            Ok(l) => Ok(l.answers().to_vec()),
            Err(e) if e.is_nx_domain() => Err(ResponseCode::NXDomain),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => {
                tracing::debug!(name, error = %e, "upstream lookup failed");
                Err(ResponseCode::ServFail)
            }
        }
    }

    /// Puts the addresses of `records` in `vm`'s sets before the guest
    /// sees them.
    async fn hand_out(
        &self,
        vm: &Vm,
        name: &str,
        records: &[Record],
        ports: Option<&[u16]>,
        until: Option<i64>,
        unix: i64,
    ) {
        let now = Instant::now();
        let mut add = Vec::new();
        let mut refresh = Vec::new();
        {
            let mut st = lock(&vm.state);
            let mut addrs = Vec::new();
            for r in records {
                let Some(ip) = ip_of(r) else { continue };
                addrs.push(ip);
                let mut secs = (u64::from(r.ttl).clamp(MIN_SECS, MAX_SECS)) + GRACE_SECS;
                if let Some(u) = until {
                    secs = secs.min(u64::try_from(u - unix).unwrap_or(0));
                }
                if secs == 0 {
                    continue;
                }
                let to = now + Duration::from_secs(secs);
                for port in ports_of(ports) {
                    let h = Handed { ip, port };
                    match st.handed.get(&h) {
                        // Still there well past this answer's end: nothing to do.
                        Some(t) if *t >= to => {}
                        Some(t) if *t > now => refresh.push((h, secs)),
                        _ => add.push((h, secs)),
                    }
                    st.handed.insert(h, to);
                }
            }
            let entry = st.names.entry(name.to_owned()).or_default();
            for ip in addrs {
                if !entry.contains(&ip) {
                    entry.push(ip);
                }
            }
        }
        if add.is_empty() && refresh.is_empty() {
            return;
        }
        let t = vm.carrier.table();
        let mut text = String::new();
        for (h, _) in &refresh {
            text.push_str(
                &elements(&t, &[(*h, 1)])
                    .replacen("add element", "delete element", 1)
                    .replace(" timeout 1s", ""),
            );
        }
        let mut all = refresh.clone();
        all.extend(add.iter().copied());
        text.push_str(&elements(&t, &all));
        if let Err(e) = self.nft_file(&vm.project, text).await {
            // An element that ran out meanwhile cannot be deleted: add only.
            tracing::debug!(error = %e, "egress set refresh failed; adding again");
            if let Err(e) = self.nft_file(&vm.project, elements(&t, &all)).await {
                tracing::warn!(project = %vm.project, error = %e, "could not let an allowed name's addresses through");
            }
        }
    }
}

fn ports_of(ports: Option<&[u16]>) -> Vec<Option<u16>> {
    match ports {
        None => vec![None],
        Some(ps) => ps.iter().map(|p| Some(*p)).collect(),
    }
}

fn ip_of(r: &Record) -> Option<IpAddr> {
    match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

async fn serve_udp(me: Arc<Egress>, vm: Arc<Vm>, sock: Arc<tokio::net::UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    let busy = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "guest resolver: receive failed");
                continue;
            }
        };
        let Ok(permit) = busy.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
        let (me, vm, sock) = (me.clone(), vm.clone(), sock.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(resp) = me.answer(&vm, &query).await {
                let _ = sock.send_to(&resp, peer).await;
            }
        });
    }
}

async fn serve_tcp(me: Arc<Egress>, vm: Arc<Vm>, listener: tokio::net::TcpListener) {
    let busy = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = busy.clone().try_acquire_owned() else {
            continue;
        };
        let (me, vm) = (me.clone(), vm.clone());
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let mut len = [0u8; 2];
                let read =
                    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut len)).await;
                if !matches!(read, Ok(Ok(_))) {
                    return;
                }
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if conn.read_exact(&mut q).await.is_err() {
                    return;
                }
                let Some(resp) = me.answer(&vm, &q).await else {
                    return;
                };
                let Ok(n) = u16::try_from(resp.len()) else {
                    return;
                };
                let mut out = n.to_be_bytes().to_vec();
                out.extend_from_slice(&resp);
                if conn.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kennel_core::egress::{Destination, EgressRule};

    fn policy() -> EgressPolicy {
        let rule = |s: &str, v| EgressRule {
            dest: Destination::parse(s).unwrap(),
            verdict: v,
            expires_at: None,
        };
        EgressPolicy {
            mode: EgressMode::Closed,
            rules: vec![
                rule("203.0.113.0/24:443", Verdict::Allow),
                rule("198.51.100.7", Verdict::Deny),
                rule("api.example.com", Verdict::Allow),
            ],
            private_ok: false,
        }
    }

    #[test]
    fn a_closed_vm_gets_its_dns_redirected_and_its_list_as_rules() {
        let c = Carrier::Group {
            gid: 0x4b12_0002,
            dns: "127.77.0.2".parse().unwrap(),
        };
        let s = script(&c, &policy(), true, &[]);
        assert!(
            s.starts_with(
                "table inet kennel_egress_4b120002\ndelete table inet kennel_egress_4b120002\n"
            ),
            "{s}"
        );
        assert!(s.contains("meta skgid 1259470850 meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 dnat ip to 127.77.0.2:53"), "{s}");
        assert!(s.contains("ip daddr 198.51.100.7/32 jump deny"), "{s}");
        assert!(
            s.contains("ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 accept"),
            "{s}"
        );
        assert!(
            s.contains("10.0.0.0/8"),
            "members' VMs keep private ranges closed: {s}"
        );
        // Deny rules come before allows, the sets after both.
        let deny = s.find("198.51.100.7/32").unwrap();
        let allow = s.find("203.0.113.0/24").unwrap();
        let sets = s.find("@a4").unwrap();
        assert!(deny < allow && allow < sets, "{s}");
        let mut admin = policy();
        admin.private_ok = true;
        assert!(!script(&c, &admin, false, &[]).contains("10.0.0.0/8"));
        // A bridged VM: by its address, on the forward path, its resolver
        // on the bridge's address, its TAP kept to that address.
        let b = Carrier::tap(
            7,
            "kt7",
            "10.90.0.7".parse().unwrap(),
            "10.90.0.1".parse().unwrap(),
        )
        .unwrap();
        let s = script(&b, &policy(), true, &[]);
        assert!(s.contains("type nat hook prerouting priority -100"), "{s}");
        assert!(s.contains("ip saddr 10.90.0.7 meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.90.0.1:40007"), "{s}");
        assert!(
            s.contains("type filter hook forward priority filter"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"kt7\" ether type ip ip saddr != 10.90.0.7 drop"),
            "{s}"
        );
        assert!(Carrier::tap(
            7,
            "kt7; drop",
            "10.90.0.7".parse().unwrap(),
            "10.90.0.1".parse().unwrap()
        )
        .is_none());
    }

    #[test]
    fn handed_addresses_go_in_the_set_of_their_shape() {
        let h = |ip: &str, port| Handed {
            ip: ip.parse().unwrap(),
            port,
        };
        let s = elements(
            "t",
            &[
                (h("198.18.0.2", None), 60),
                (h("198.18.0.2", Some(443)), 60),
                (h("2001:2::2", None), 90),
                (h("2001:2::2", Some(80)), 90),
            ],
        );
        assert_eq!(
            s,
            "add element inet t a4 { 198.18.0.2 timeout 60s }\nadd element inet t p4 { 198.18.0.2 . 443 timeout 60s }\nadd element inet t a6 { 2001:2::2 timeout 90s }\nadd element inet t p6 { 2001:2::2 . 80 timeout 90s }\n"
        );
        let c = Carrier::Group {
            gid: 2,
            dns: "127.77.0.2".parse().unwrap(),
        };
        let again = script(&c, &policy(), false, &[(h("198.18.0.2", None), 5)]);
        assert!(
            again.starts_with(
                "flush chain inet kennel_egress_2 vm\nflush set inet kennel_egress_2 a4\n"
            ),
            "{again}"
        );
        assert!(
            again.ends_with("add element inet kennel_egress_2 a4 { 198.18.0.2 timeout 5s }\n"),
            "{again}"
        );
    }
}
