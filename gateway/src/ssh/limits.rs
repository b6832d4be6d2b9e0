//! Limits: connections per address and per user, failed sign-ins per
//! address, access requests per address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::{Conn, Shared, Target, Who};

impl Shared {
    /// Counts an access request against the address; false past its limit.
    pub(super) fn may_file_request(&self, ip: Option<IpAddr>) -> bool {
        let (Some(ip), Ok(mut c)) = (ip, self.counters.lock()) else {
            return false;
        };
        let e = c.requests.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() > Duration::from_secs(3600) {
            *e = (0, Instant::now());
        }
        if e.0 >= self.settings.max_requests_per_ip {
            return false;
        }
        e.0 += 1;
        true
    }
}

impl Conn {
    pub(super) fn failed_auth(&self) {
        if let (Some(ip), Ok(mut c)) = (self.ip, self.shared.counters.lock()) {
            let e = c.failures.entry(ip).or_insert((0, Instant::now()));
            if e.1.elapsed() > Duration::from_secs(600) {
                *e = (0, Instant::now());
            }
            e.0 += 1;
        }
    }

    pub(super) fn blocked(&self) -> bool {
        let limit = self.shared.settings.max_auth_failures_per_ip;
        match (self.ip, self.shared.counters.lock()) {
            (Some(ip), Ok(c)) => c.failures.get(&ip).is_some_and(|(n, since)| {
                *n >= limit && since.elapsed() < Duration::from_secs(600)
            }),
            _ => false,
        }
    }

    pub(super) fn span(&self) -> tracing::Span {
        let user = match &self.who {
            Some(Who::Known { user, .. }) => user.name.to_string(),
            Some(Who::Unknown { .. }) => "(unknown key)".into(),
            None => "-".into(),
        };
        let project = match &self.target {
            Target::Project(p) => p.to_string(),
            Target::Console => "-".into(),
        };
        tracing::info_span!("ssh", session = self.id, user = %user, project = %project)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.counters.lock() {
            if let Some(ip) = self.ip {
                if let Some(n) = c.per_ip.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                }
            }
            if let Some(Who::Known { user, .. }) = &self.who {
                if let Some(n) = c.per_user.get_mut(user.name.as_str()) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
}
