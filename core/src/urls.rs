//! The one place that spells the addresses Kennel hands out: a project's
//! app URL (`https://NAME.DOMAIN[:PORT]`), another port's
//! (`https://NAME--P.DOMAIN[:PORT]`), Kennel's own host (dashboard, login
//! links, the API) and the SSH string (`ssh NAME@HOST[ -p PORT]`).
//!
//! Every reply, page and chat message that prints one of these builds it
//! here, so a non-default port (8443, 2222) is never dropped from one reply
//! and kept in another. The gateways' host parsing ([`crate`] users in
//! `gateway/src/https/route.rs`) is the inverse of [`Urls::app_host`].

use crate::names::ProjectName;

/// Where Kennel's gateways listen, as people reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls {
    pub ssh_host: String,
    pub ssh_port: u16,
    pub domain: String,
    pub https_port: u16,
}

/// `:PORT` after a host in an `https://` URL, or nothing for 443.
pub fn https_port_suffix(port: u16) -> String {
    match port {
        443 => String::new(),
        p => format!(":{p}"),
    }
}

impl Urls {
    /// The host name of a project's app (`port`: another port's site).
    pub fn app_host(&self, name: &str, port: Option<u16>) -> String {
        match port {
            Some(p) => format!("{name}--{p}.{}", self.domain),
            None => format!("{name}.{}", self.domain),
        }
    }

    /// `https://NAME.DOMAIN[:PORT]`: a project's app.
    pub fn app(&self, name: &ProjectName) -> String {
        format!(
            "https://{}{}",
            self.app_host(name.as_str(), None),
            https_port_suffix(self.https_port)
        )
    }

    /// `https://NAME--P.DOMAIN[:PORT]`: another port of a project's VM.
    pub fn app_port(&self, name: &ProjectName, port: u16) -> String {
        format!(
            "https://{}{}",
            self.app_host(name.as_str(), Some(port)),
            https_port_suffix(self.https_port)
        )
    }

    /// `https://DOMAIN[:PORT]`: Kennel's own host (dashboard, API).
    pub fn kennel(&self) -> String {
        format!(
            "https://{}{}",
            self.domain,
            https_port_suffix(self.https_port)
        )
    }

    /// `https://HOST[:PORT]`: a project's app at a custom domain.
    pub fn custom_domain(&self, host: &str) -> String {
        format!("https://{host}{}", https_port_suffix(self.https_port))
    }

    /// A share link: redeemed on the project's (port's) own host.
    pub fn share_link(&self, name: &ProjectName, port: Option<u16>, token: &str) -> String {
        format!(
            "https://{}{}/__kennel/link/{token}",
            self.app_host(name.as_str(), port),
            https_port_suffix(self.https_port)
        )
    }

    /// A one-time sign-in link for `token`.
    pub fn login(&self, token: &str) -> String {
        format!("{}/login/{token}", self.kennel())
    }

    /// `NAME@HOST`, what `ssh` takes (without the port). `name` is a
    /// project's, or a placeholder in help text (`NAME`).
    pub fn ssh_target(&self, name: &str) -> String {
        format!("{name}@{}", self.ssh_host)
    }

    /// `ssh [-p PORT ]HOST COMMAND`: a command of the command language
    /// over SSH (the console, no project).
    pub fn ssh_console(&self, command: &str) -> String {
        let port = match self.ssh_port {
            22 => String::new(),
            p => format!("-p {p} "),
        };
        format!("ssh {port}{} {command}", self.ssh_host)
    }

    /// `sftp [-P PORT ]NAME@HOST`: files in and out of a project.
    pub fn sftp(&self, name: &str) -> String {
        let port = match self.ssh_port {
            22 => String::new(),
            p => format!("-P {p} "),
        };
        format!("sftp {port}{}", self.ssh_target(name))
    }

    /// `ssh NAME@HOST[ -p PORT]`, ready to paste.
    pub fn ssh_command(&self, name: &str) -> String {
        let port = match self.ssh_port {
            22 => String::new(),
            p => format!(" -p {p}"),
        };
        format!("ssh {}{port}", self.ssh_target(name))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn urls(ssh_port: u16, https_port: u16) -> Urls {
        Urls {
            ssh_host: "kennel.example.org".into(),
            ssh_port,
            domain: "example.org".into(),
            https_port,
        }
    }

    #[test]
    fn default_ports_are_left_out_and_others_kept() {
        let n = ProjectName::new("myapp").unwrap();
        let std = urls(22, 443);
        assert_eq!(std.app(&n), "https://myapp.example.org");
        assert_eq!(std.app_port(&n, 5173), "https://myapp--5173.example.org");
        assert_eq!(std.kennel(), "https://example.org");
        assert_eq!(std.ssh_command(n.as_str()), "ssh myapp@kennel.example.org");
        let odd = urls(2222, 8443);
        assert_eq!(odd.app(&n), "https://myapp.example.org:8443");
        assert_eq!(
            odd.app_port(&n, 5173),
            "https://myapp--5173.example.org:8443"
        );
        assert_eq!(odd.login("t0k"), "https://example.org:8443/login/t0k");
        assert_eq!(
            odd.ssh_command(n.as_str()),
            "ssh myapp@kennel.example.org -p 2222"
        );
        assert_eq!(
            odd.ssh_console("request-access"),
            "ssh -p 2222 kennel.example.org request-access"
        );
        assert_eq!(
            std.ssh_console("projects"),
            "ssh kennel.example.org projects"
        );
        assert_eq!(
            odd.sftp("PROJECT"),
            "sftp -P 2222 PROJECT@kennel.example.org"
        );
    }
}
