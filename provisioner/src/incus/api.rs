//! The parts of the Incus REST API (`/1.0`) that Kennel reads and sends,
//! as typed serde structures.
//!
//! Shapes measured against a real Incus 6.0 daemon (the answers the
//! client's tests replay were recorded from it): every answer is an
//! envelope whose `type` is `sync` (the result in `metadata`), `async`
//! (an operation to wait for) or `error` (`error_code`, `error`). Unknown
//! fields are ignored: newer servers add many.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A field Incus sends as `null` as often as it leaves it out (an
/// instance on an offline member comes with `"config": null`): the
/// type's default either way.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Every answer's outer shape.
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub error_code: u16,
    #[serde(default, deserialize_with = "nullable")]
    pub error: String,
    /// For `async`: the operation's URL (`/1.0/operations/UUID`).
    #[serde(default, deserialize_with = "nullable")]
    pub operation: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// A background operation (`/1.0/operations/UUID`).
#[derive(Debug, Clone, Deserialize)]
pub struct Operation {
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub description: String,
    /// `Running`, `Success`, `Failure`, `Cancelled`.
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// Why it failed, when it did.
    #[serde(default, deserialize_with = "nullable")]
    pub err: String,
    /// The cluster member it runs on (`none` outside a cluster).
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
}

/// `GET /1.0`: the server and what it can do.
#[derive(Debug, Clone, Deserialize)]
pub struct Server {
    #[serde(default, deserialize_with = "nullable")]
    pub api_extensions: Vec<String>,
    /// `trusted` when Kennel's certificate (or the Unix socket) is.
    #[serde(default, deserialize_with = "nullable")]
    pub auth: String,
    /// Empty for an untrusted client.
    #[serde(default)]
    pub environment: Environment,
}

/// The `environment` part of [`Server`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Environment {
    #[serde(default, deserialize_with = "nullable")]
    pub server_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub server_version: String,
    #[serde(default)]
    pub server_clustered: bool,
    /// The instance drivers, `lxc | qemu` when both work.
    #[serde(default, deserialize_with = "nullable")]
    pub driver: String,
    /// The server's certificate (PEM), which a remote client pins.
    #[serde(default, deserialize_with = "nullable")]
    pub certificate: String,
}

/// A cluster member (`GET /1.0/cluster/members?recursion=1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub server_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub url: String,
    #[serde(default, deserialize_with = "nullable")]
    pub roles: Vec<String>,
    /// `Online`, `Offline`, `Evacuated`, `Blocked`.
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub message: String,
}

impl Member {
    /// Whether the member takes instances.
    pub fn online(&self) -> bool {
        self.status.eq_ignore_ascii_case("online")
    }
}

impl Member {
    /// The address the member answers the cluster on (its `url`'s host),
    /// where the proxies of Kennel's instances on it listen when
    /// `incus.listen_address = "member"`.
    pub fn address(&self) -> Option<std::net::IpAddr> {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let host = rest.split('/').next().unwrap_or_default();
        // `[v6]:port` or `v4:port`.
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        host.parse().ok()
    }
}

/// `GET /1.0/cluster/members/NAME/state`: what the member's host has.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MemberState {
    #[serde(default)]
    pub sysinfo: SysInfo,
}

/// A member's load and memory.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SysInfo {
    #[serde(default, deserialize_with = "nullable")]
    pub load_averages: Vec<f64>,
    /// Bytes.
    #[serde(default)]
    pub total_ram: u64,
    #[serde(default)]
    pub free_ram: u64,
}

pub use crate::choice::InstanceType;

/// A device: its type and options, all strings (`{"type": "disk", …}`).
pub type Device = BTreeMap<String, String>;

/// `POST /1.0/instances`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstancesPost {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: InstanceType,
    pub source: InstanceSource,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, Device>,
    /// Profiles applied in order (Incus's `default` unless empty is
    /// wanted, which an explicit empty list says).
    pub profiles: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Start it once created.
    pub start: bool,
}

/// Where a new instance's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceSource {
    /// `image` (or `none`).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub alias: String,
    /// The instance (or `instance/snapshot`) a copy is made from.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// A copy without the source's snapshots.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub instance_only: bool,
}

impl InstanceSource {
    /// A local image by its fingerprint.
    pub fn image(fingerprint: &str) -> Self {
        Self {
            kind: "image".to_owned(),
            fingerprint: fingerprint.to_owned(),
            alias: String::new(),
            source: String::new(),
            instance_only: false,
        }
    }

    /// A copy of instance `of` (`NAME` or `NAME/SNAPSHOT`), without its
    /// snapshots.
    pub fn copy_of(of: &str) -> Self {
        Self {
            kind: "copy".to_owned(),
            fingerprint: String::new(),
            alias: String::new(),
            source: of.to_owned(),
            instance_only: true,
        }
    }
}

/// `GET /1.0/instances/NAME`.
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    pub name: String,
    /// `Running`, `Stopped`, `Frozen`, `Error`, …
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    /// The member it lives on (`none` outside a cluster).
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: BTreeMap<String, Device>,
}

impl Instance {
    /// Whether it runs, as listed.
    pub fn running(&self) -> bool {
        self.status.eq_ignore_ascii_case("running")
    }
}

/// One storage volume, as `GET /1.0/storage-pools/POOL/volumes/custom?recursion=1`
/// lists it (a snapshot's name is `VOLUME/SNAPSHOT`).
#[derive(Debug, Clone, Deserialize)]
pub struct StorageVolume {
    pub name: String,
    /// The member that holds it on a local pool (`none` otherwise).
    #[serde(default, deserialize_with = "nullable")]
    pub location: String,
    #[serde(default, deserialize_with = "nullable")]
    pub used_by: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
}

/// `GET /1.0/instances/NAME/state`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct InstanceState {
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub network: Option<BTreeMap<String, NetworkState>>,
    #[serde(default)]
    pub cpu: Option<CpuState>,
    #[serde(default)]
    pub memory: Option<MemoryState>,
    #[serde(default)]
    pub pid: i64,
}

impl InstanceState {
    /// Whether the instance runs.
    pub fn running(&self) -> bool {
        self.status.eq_ignore_ascii_case("running")
    }

    /// The first global IPv4 address of `iface`, if it has one yet.
    pub fn ipv4(&self, iface: &str) -> Option<std::net::Ipv4Addr> {
        self.network
            .as_ref()?
            .get(iface)?
            .addresses
            .iter()
            .filter(|a| a.family == "inet" && a.scope == "global")
            .find_map(|a| a.address.parse().ok())
    }
}

/// One interface in [`InstanceState::network`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetworkState {
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<Address>,
    #[serde(default, deserialize_with = "nullable")]
    pub host_name: String,
}

/// One address of an interface.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Address {
    #[serde(default, deserialize_with = "nullable")]
    pub family: String,
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub scope: String,
}

/// CPU use of an instance, nanoseconds (-1 when Incus cannot tell yet,
/// as right after a move).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct CpuState {
    #[serde(default)]
    pub usage: i64,
}

/// Memory use of an instance, bytes (-1 when unknown).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct MemoryState {
    #[serde(default)]
    pub usage: i64,
}

/// What `PUT /1.0/instances/NAME/state` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateAction {
    Start,
    Stop,
    Restart,
    Freeze,
    Unfreeze,
}

/// `PUT /1.0/instances/NAME/state`.
#[derive(Debug, Clone, Serialize)]
pub struct StatePut {
    pub action: StateAction,
    /// Seconds to wait for a clean stop before failing (-1: Incus's
    /// default).
    pub timeout: i64,
    pub force: bool,
}

/// `POST /1.0/cluster/members/NAME/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberAction {
    Evacuate,
    Restore,
}

/// An image (`GET /1.0/images/FINGERPRINT`).
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    pub fingerprint: String,
    #[serde(default)]
    pub size: u64,
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub properties: BTreeMap<String, String>,
}

/// An image alias (`GET /1.0/images/aliases/NAME`).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageAlias {
    pub name: String,
    /// The image's fingerprint.
    pub target: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_instance_post_is_what_the_api_takes() {
        let post = InstancesPost {
            name: "myapp".into(),
            kind: InstanceType::VirtualMachine,
            source: InstanceSource::image("abc"),
            config: BTreeMap::from([("limits.cpu".into(), "2".into())]),
            devices: BTreeMap::new(),
            profiles: vec!["default".into()],
            description: String::new(),
            start: true,
        };
        let v = serde_json::to_value(&post).unwrap();
        assert_eq!(v["type"], "virtual-machine");
        assert_eq!(
            v["source"],
            serde_json::json!({"type": "image", "fingerprint": "abc"})
        );
        assert!(v.get("devices").is_none() && v.get("description").is_none());
        assert_eq!(
            serde_json::to_value(StatePut {
                action: StateAction::Stop,
                timeout: 30,
                force: false
            })
            .unwrap(),
            serde_json::json!({"action": "stop", "timeout": 30, "force": false})
        );
    }

    #[test]
    fn an_address_is_the_first_global_ipv4() {
        let s: InstanceState = serde_json::from_value(serde_json::json!({
            "status": "Running",
            "network": {"eth0": {"addresses": [
                {"family": "inet6", "address": "fe80::1", "scope": "link"},
                {"family": "inet", "address": "10.1.2.3", "scope": "global"}
            ]}, "lo": {"addresses": [{"family": "inet", "address": "127.0.0.1", "scope": "local"}]}}
        }))
        .unwrap();
        assert!(s.running());
        assert_eq!(s.ipv4("eth0"), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(s.ipv4("lo"), None);
        // A stopped instance's state has `network: null`.
        let s: InstanceState =
            serde_json::from_value(serde_json::json!({"status": "Stopped", "network": null}))
                .unwrap();
        assert_eq!(s.ipv4("eth0"), None);
    }

    #[test]
    fn an_instance_on_an_offline_member_reads() {
        // As Incus 6.0 lists an instance whose member is offline.
        let i: Instance = serde_json::from_value(serde_json::json!({
            "architecture": "", "config": null, "devices": null, "profiles": null,
            "name": "x1", "status": "Error", "status_code": 112,
            "location": "m2", "type": "container", "project": "default"
        }))
        .unwrap();
        assert_eq!((i.name.as_str(), i.location.as_str()), ("x1", "m2"));
        assert!(i.config.is_empty() && i.devices.is_empty());
    }
}
