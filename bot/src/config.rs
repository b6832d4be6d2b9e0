//! The bots' configuration sections (`[matrix]`, `[discord]`). They exist
//! whether or not a bot is compiled in, so one configuration file works
//! with every build; `kennel serve` says when a configured bot is not built.

use serde::{Deserialize, Serialize};

use crate::desk::Limits;

/// `[matrix]`: the Matrix bot. It runs when `homeserver` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixConfig {
    /// Homeserver base URL, e.g. `https://matrix.example.org`.
    pub homeserver: Option<String>,
    /// The bot's user id, e.g. `@kennel:example.org`.
    pub user: String,
    /// Password login (the session is then kept in `<data_dir>/bot/matrix`).
    pub password: Option<String>,
    /// Or an existing access token, with the device it belongs to.
    pub access_token: Option<String>,
    pub device_id: Option<String>,
    /// Room id (`!abc:example.org`) or alias (`#ops:example.org`) where
    /// access requests are posted for admins to decide.
    pub admin_room: Option<String>,
    /// Whose invites the bot accepts: user ids (`@ann:example.org`) or
    /// whole homeservers (`example.org`). Configured admins always may.
    pub invite_from: Vec<String>,
    /// What addresses the bot in group rooms besides a mention, e.g. `!kennel`.
    pub prefix: String,
    pub limits: Limits,
}

impl MatrixConfig {
    /// Whether the bot is configured to run.
    pub fn enabled(&self) -> bool {
        self.homeserver.as_deref().is_some_and(|h| !h.is_empty())
    }

    /// What is wrong with an enabled configuration, said so it can be fixed.
    pub fn problem(&self) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        let hs = self.homeserver.as_deref().unwrap_or_default();
        if !(hs.starts_with("https://") || hs.starts_with("http://")) {
            return Some(format!(
                "matrix.homeserver {hs:?} must be a URL like https://matrix.example.org"
            ));
        }
        let u = self.user.as_str();
        if !u.starts_with('@') || !u.contains(':') {
            return Some(format!(
                "matrix.user {u:?} must be the bot's Matrix id, like @kennel:example.org"
            ));
        }
        if self.password.is_none() && self.access_token.is_none() {
            return Some("set matrix.password (better: KENNEL_MATRIX__PASSWORD) or matrix.access_token with matrix.device_id".into());
        }
        if self.access_token.is_some() && self.device_id.is_none() {
            return Some(
                "matrix.access_token needs matrix.device_id (both come from the same login)".into(),
            );
        }
        if let Some(r) = &self.admin_room {
            // Room ids of room version 12 have no server part.
            let ok = (r.starts_with('!') && r.len() > 1) || (r.starts_with('#') && r.contains(':'));
            if !ok {
                return Some(format!(
                    "matrix.admin_room {r:?} must be a room id (!abc… as shown in the room's settings) or alias (#ops:example.org)"
                ));
            }
        }
        None
    }
}

/// `[discord]`: the Discord bot. It runs when `token` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordConfig {
    /// The bot token from the Developer Portal (better given as
    /// `KENNEL_DISCORD__TOKEN` than written in the file).
    pub token: Option<String>,
    /// Guilds (servers) whose slash commands the bot registers.
    pub guilds: Vec<u64>,
    /// Channel where access requests are posted with Approve/Deny buttons.
    pub admin_channel: Option<u64>,
    /// Base URL of the Discord API (tests point this at a local fake).
    pub api_base: Option<String>,
    pub limits: Limits,
}

impl DiscordConfig {
    /// Whether the bot is configured to run.
    pub fn enabled(&self) -> bool {
        self.token.as_deref().is_some_and(|t| !t.is_empty())
    }

    /// What is wrong with an enabled configuration, said so it can be fixed.
    pub fn problem(&self) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        if self.guilds.is_empty() {
            return Some("discord.guilds is empty: list the server (guild) ids whose slash commands Kennel registers".into());
        }
        // Discord ids are never 0 (serenity refuses them).
        if self.guilds.contains(&0) || self.admin_channel == Some(0) {
            return Some("discord.guilds and discord.admin_channel take Discord ids (copy them with Developer Mode on); 0 is not one".into());
        }
        if let Some(base) = &self.api_base {
            if !(base.starts_with("https://") || base.starts_with("http://")) {
                return Some(format!("discord.api_base {base:?} must be a URL"));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_mistakes_say_what_to_change() {
        let ok = MatrixConfig {
            homeserver: Some("https://m.example.org".into()),
            user: "@kennel:example.org".into(),
            password: Some("pw".into()),
            admin_room: Some("!abcdef".into()),
            ..MatrixConfig::default()
        };
        assert_eq!(ok.problem(), None);
        assert_eq!(MatrixConfig::default().problem(), None, "off is fine");
        let bad = |f: fn(&mut MatrixConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.problem().unwrap()
        };
        assert!(bad(|c| c.homeserver = Some("m.example.org".into())).contains("URL"));
        assert!(bad(|c| c.user = "kennel".into()).contains("@kennel:example.org"));
        assert!(bad(|c| c.password = None).contains("KENNEL_MATRIX__PASSWORD"));
        assert!(bad(|c| c.admin_room = Some("ops".into())).contains("room id"));
        let d = DiscordConfig {
            token: Some("t".into()),
            ..DiscordConfig::default()
        };
        assert!(d.problem().unwrap().contains("discord.guilds"));
    }
}
