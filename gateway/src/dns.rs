//! The resolver custom domains are checked with: hickory's stub resolver,
//! asking the system's name servers (`/etc/resolv.conf`) or one given
//! (`https.resolver`, e.g. a test's DNS server).

use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::Resolver;
use kennel_core::dns::{Dns, DnsAnswer, DnsError};

/// A DNS resolver for custom domains.
pub struct HickoryDns {
    resolver: Resolver<TokioRuntimeProvider>,
}

impl std::fmt::Debug for HickoryDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HickoryDns").finish_non_exhaustive()
    }
}

impl HickoryDns {
    /// Asks `server` (UDP, then TCP), or the system's name servers.
    pub fn new(server: Option<SocketAddr>) -> Result<Self, DnsError> {
        let failed = |e: &dyn std::fmt::Display| DnsError {
            host: server.map_or_else(|| "the system resolver".into(), |s| s.to_string()),
            message: e.to_string(),
        };
        let builder = match server {
            Some(addr) => {
                let conn = |mut c: ConnectionConfig| {
                    c.port = addr.port();
                    c
                };
                let ns = NameServerConfig::new(
                    addr.ip(),
                    true,
                    vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                );
                Resolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => Resolver::builder_tokio().map_err(|e| failed(&e))?,
        };
        let mut builder = builder;
        // Answers change while someone fixes their records: ask each time.
        builder.options_mut().cache_size = 0;
        Ok(Self {
            resolver: builder.build().map_err(|e| failed(&e))?,
        })
    }
}

#[async_trait]
impl Dns for HickoryDns {
    async fn lookup(&self, host: &str) -> Result<DnsAnswer, DnsError> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let failed = |e: &dyn std::fmt::Display| DnsError {
            host: host.to_owned(),
            message: e.to_string(),
        };
        let mut answer = DnsAnswer::default();
        match self.resolver.lookup(fqdn.as_str(), RecordType::CNAME).await {
            Ok(l) => {
                answer.cname = l.answers().iter().find_map(|r| match &r.data {
                    RData::CNAME(c) => {
                        Some(c.0.to_string().trim_end_matches('.').to_ascii_lowercase())
                    }
                    _ => None,
                });
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
            Err(e) => return Err(failed(&e)),
        }
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => answer.addrs = ips.iter().collect::<Vec<IpAddr>>(),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
            Err(e) => return Err(failed(&e)),
        }
        Ok(answer)
    }
}
