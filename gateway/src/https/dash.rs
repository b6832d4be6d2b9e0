//! The dashboard on Kennel's host: the signed-in user's projects (theirs,
//! shared with them; all for admins), their state kept live by
//! server-sent events, how to reach each (SSH string with a copy button,
//! VS Code link, app link), and buttons. Every action is a line of the
//! command language run as the user through core's front door — the same
//! answer chat gives — so the web adds no business logic and no second
//! policy; a command box runs any other line (share, port, keys, secrets,
//! approve, …; `rm` asks for `yes` as in chat).
//!
//! Server-rendered HTML with one small script from Kennel's own host
//! (`script-src 'self'`); every form carries a CSRF token derived from the
//! session cookie and is also checked for same origin.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kennel_core::model::{Project, User};
use kennel_core::provision::NoProgress;
use kennel_core::render::Format;
use kennel_core::{Reply, Style};
use tokio::sync::mpsc;

use super::page::esc;
use super::{page, site, Body, Inner};

const SCRIPT: &str = r#"// Kennel's dashboard: live states, copy buttons.
const log = document.getElementById('log');
if (log) {
  const tail = new EventSource('/logtail?project=' + encodeURIComponent(log.dataset.project));
  tail.onmessage = (e) => { log.textContent = JSON.parse(e.data); log.dataset.seen = 'yes'; };
}
const es = log ? null : new EventSource('/events');
if (es) es.onmessage = (e) => {
  const states = JSON.parse(e.data);
  for (const [name, state] of Object.entries(states)) {
    const el = document.querySelector('[data-state="' + CSS.escape(name) + '"]');
    if (el && el.textContent !== state) {
      el.textContent = state; el.className = 'state ' + state;
      const card = el.closest('.p'); if (card) card.dataset.rowState = state;
    }
  }
};
// Forms whose answer streams (progress lines, then the answer) into a
// <pre> instead of loading a new page: new project, start, stop, restart.
async function stream(form, out) {
  out.hidden = false; out.textContent = ''; out.dataset.done = '';
  const resp = await fetch('/run', { method: 'POST', body: new URLSearchParams(new FormData(form)) });
  const reader = resp.body.getReader(); const dec = new TextDecoder();
  for (;;) { const { done, value } = await reader.read(); if (done) break; out.textContent += dec.decode(value, { stream: true }); }
  out.dataset.done = 'yes';
}
document.addEventListener('submit', (e) => {
  const f = e.target;
  if (f.id === 'new') { e.preventDefault(); stream(f, document.getElementById('progress')); }
  else if (f.dataset.stream) { e.preventDefault(); stream(f, document.getElementById('said')); }
});
document.addEventListener('click', (e) => {
  const b = e.target.closest('[data-copy]');
  if (!b) return;
  navigator.clipboard.writeText(b.dataset.copy).then(() => {
    const was = b.textContent; b.textContent = 'copied'; setTimeout(() => { b.textContent = was; }, 1200);
  });
});
"#;

const STYLE: &str = include_str!("static/dash.css");

/// The CSRF token of a session: derived from its cookie, so it needs no
/// storage and is useless without the cookie (which other sites cannot
/// read).
fn csrf_of(cookie: &str) -> String {
    kennel_core::web::token_hash(&format!("csrf:{cookie}"))
}

impl Inner {
    /// `/`, `/do`, `/events` on Kennel's host for a signed-in user; the
    /// request back for other paths.
    pub(super) async fn dashboard_route(
        &self,
        req: Request<Incoming>,
        user: User,
    ) -> Result<Response<Body>, Request<Incoming>> {
        let csrf = csrf_of(&Self::cookie(&req).unwrap_or_default());
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => Ok(self.dashboard(&user, &csrf, None, None, None).await),
            (&Method::POST, "/do") => Ok(self.dash_do(req, user).await),
            (&Method::POST, "/run") => Ok(self.dash_run(req, user).await),
            (&Method::GET, "/events") => Ok(self.events(user)),
            (&Method::GET, "/logs") => Ok(self.logs_page(&req, &user)),
            (&Method::GET, "/logtail") => Ok(self.log_tail(&req, user)),
            _ => Err(req),
        }
    }

    /// The page: the answer to the last action, if any, then projects.
    async fn dashboard(
        &self,
        user: &User,
        csrf: &str,
        said: Option<(bool, String)>,
        confirm: Option<String>,
        qr: Option<String>,
    ) -> Response<Body> {
        let who = site::web_identity(user);
        let answered = self
            .gate
            .front_door(&who, user.clone(), "projects", Style::PLAIN, &NoProgress)
            .await;
        let projects = match answered.outcome {
            Ok(Reply::Projects { projects, .. }) => projects,
            _ => Vec::new(),
        };
        let cookie_csrf = csrf.to_owned();
        let mut html = format!(
            "<header class=\"top\"><h1>Kennel</h1><p>You are signed in as <b>{}</b> ({})</p><form method=\"post\" action=\"/logout\"><button>Sign out</button></form></header><main>",
            esc(user.name.as_str()),
            esc(user.role.as_str())
        );
        if let Some((ok, text)) = said {
            html.push_str(&format!(
                "<section class=\"said\" aria-live=\"polite\"><h2>{}</h2><pre>{}</pre>{}",
                if ok { "Done" } else { "Not done" },
                esc(&text),
                qr.map(|png| format!("<img class=\"qr\" alt=\"QR code of the link\" src=\"data:image/png;base64,{png}\">")).unwrap_or_default()
            ));
            if let Some(confirm) = confirm {
                html.push_str(&format!(
                    "<form method=\"post\" action=\"/do\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"line\" value=\"{}\"><button aria-label=\"confirm\">Yes, do it</button></form>",
                    esc(csrf),
                    esc(&confirm)
                ));
            }
            html.push_str("</section>");
        }
        html.push_str("<pre id=\"said\" aria-live=\"polite\" hidden></pre><h2>Projects</h2>");
        if projects.is_empty() {
            html.push_str(
                "<p>No projects yet. Make one below: <code>new project NAME --git URL</code>.</p>",
            );
        } else {
            html.push_str("<div class=\"projects\">");
            for p in &projects {
                let links = match self
                    .owners_view(user, p, format!("shares {}", p.name))
                    .await
                {
                    Some(Reply::Shares { links, .. }) => links,
                    _ => Vec::new(),
                };
                let domains = match self
                    .owners_view(user, p, format!("domains {}", p.name))
                    .await
                {
                    Some(Reply::Domains { domains }) => domains,
                    _ => Vec::new(),
                };
                html.push_str(&self.project_row(p, &cookie_csrf, &links, &domains));
            }
            html.push_str("</div>");
            html.push_str(&self.egress_asks(user, &projects, &cookie_csrf).await);
        }
        html.push_str(&format!(
            "<h2>New project</h2><form id=\"new\" method=\"post\" action=\"/do\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\"><label>Name <input type=\"text\" name=\"name\" required pattern=\"[a-z][a-z0-9-]*\" class=\"w-m\"></label> <label>Stack <input type=\"text\" name=\"stack\" placeholder=\"detect\" class=\"w-m\"></label> <label>Git URL <input type=\"text\" name=\"git\" placeholder=\"optional\" class=\"w-l\"></label> <label>Template <input type=\"text\" name=\"template\" placeholder=\"optional\" class=\"w-m\"></label> <label>CPUs <input type=\"number\" name=\"cpus\" min=\"1\" max=\"64\" placeholder=\"default\" class=\"w-s\"></label> <label>Memory <input type=\"text\" name=\"memory\" placeholder=\"e.g. 2G\" class=\"w-s\"></label> <label>Disk <input type=\"text\" name=\"disk\" placeholder=\"e.g. 10G\" class=\"w-s\"></label> <button>Create</button></form><pre id=\"progress\" aria-live=\"polite\" hidden></pre>",
            c = esc(&cookie_csrf)
        ));
        html.push_str(&self.keys_and_secrets(user, &cookie_csrf).await);
        if user.role.as_str() == "admin" {
            html.push_str(&self.requests_panel(user, &cookie_csrf).await);
        }
        html.push_str(&format!(
            "<h2>Run a command</h2><p>Any line you would send the bot: <code>share NAME USER --web</code>, <code>port NAME 8080</code>, <code>keys</code>, <code>key add …</code>, <code>secrets</code>, <code>requests</code>, <code>approve ID</code>, <code>rm NAME</code> then <code>yes</code>, <code>help</code>.</p><form method=\"post\" action=\"/do\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\"><label for=\"line\">Command</label><br><input type=\"text\" class=\"w-xl\" id=\"line\" name=\"line\" autocomplete=\"off\" required> <button>Run</button></form></main>",
            c = esc(&cookie_csrf)
        ));
        let mut r = page::dashboard(StatusCode::OK, "Kennel", &html);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    /// The user's SSH keys (remove; add by paste) and secrets (names
    /// only; set and remove).
    async fn keys_and_secrets(&self, user: &User, csrf: &str) -> String {
        let who = site::web_identity(user);
        let ask = |line: &'static str| {
            self.gate
                .front_door(&who, user.clone(), line, Style::PLAIN, &NoProgress)
        };
        let keys = match ask("keys").await.outcome {
            Ok(Reply::Keys { keys, .. }) => keys,
            _ => Vec::new(),
        };
        let secrets = match ask("secrets").await.outcome {
            Ok(Reply::Secrets { names }) => names,
            _ => Vec::new(),
        };
        let hidden = |line: &str| {
            format!(
                "<input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"line\" value=\"{}\">",
                esc(csrf),
                esc(line)
            )
        };
        let mut html = String::from("<h2>SSH keys</h2>");
        if keys.is_empty() {
            html.push_str("<p>No keys yet.</p>");
        } else {
            html.push_str("<table><thead><tr><th>Label</th><th>Fingerprint</th><th>State</th><th></th></tr></thead><tbody>");
            for k in &keys {
                let fp = k.fingerprint.as_str();
                html.push_str(&format!(
                    "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td><form class=\"inline\" method=\"post\" action=\"/do\">{}<button aria-label=\"remove key {}\">remove</button></form></td></tr>",
                    esc(k.label.as_deref().unwrap_or("")),
                    esc(fp),
                    esc(k.state.as_str()),
                    hidden(&format!("key rm {fp}")),
                    esc(fp),
                ));
            }
            html.push_str("</tbody></table>");
        }
        html.push_str(&format!(
            "<form method=\"post\" action=\"/do\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\"><input type=\"hidden\" name=\"form\" value=\"key\"><label>Public key <input type=\"text\" name=\"key\" placeholder=\"ssh-ed25519 AAAA… you@laptop\" required></label> <label>Label <input type=\"text\" name=\"label\" class=\"w-m\"></label> <button>Add key</button></form>",
            c = esc(csrf)
        ));
        html.push_str("<h2>Secrets</h2><p>Values are never shown again.</p>");
        if !secrets.is_empty() {
            html.push_str("<ul>");
            for n in &secrets {
                html.push_str(&format!(
                    "<li><code>{}</code> <form class=\"inline\" method=\"post\" action=\"/do\">{}<button aria-label=\"remove secret {}\">remove</button></form></li>",
                    esc(n),
                    hidden(&format!("secret rm {n}")),
                    esc(n)
                ));
            }
            html.push_str("</ul>");
        }
        html.push_str(&format!(
            "<form method=\"post\" action=\"/do\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\"><input type=\"hidden\" name=\"form\" value=\"secret\"><label>Name <input type=\"text\" name=\"secret\" placeholder=\"git-token\" required class=\"w-m\"></label> <label>Value <input type=\"password\" name=\"value\" required autocomplete=\"off\" class=\"w-l\"></label> <button>Set secret</button></form>",
            c = esc(csrf)
        ));
        html
    }

    /// Pending access requests with Approve and Deny (admins).
    async fn requests_panel(&self, user: &User, csrf: &str) -> String {
        let who = site::web_identity(user);
        let answered = self
            .gate
            .front_door(&who, user.clone(), "requests", Style::PLAIN, &NoProgress)
            .await;
        let Ok(Reply::Requests { requests }) = answered.outcome else {
            return String::new();
        };
        let users = match self
            .gate
            .front_door(&who, user.clone(), "users", Style::PLAIN, &NoProgress)
            .await
            .outcome
        {
            Ok(Reply::Users { users }) => users,
            _ => Vec::new(),
        };
        let mut html = String::from("<h2>Users</h2><table><thead><tr><th>User</th><th>Role</th><th>Signs in from</th><th>Keys</th></tr></thead><tbody>");
        for u in &users {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(u.user.name.as_str()),
                esc(u.user.role.as_str()),
                esc(&u
                    .identities
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")),
                u.active_keys
            ));
        }
        html.push_str("</tbody></table><h2>Access requests</h2>");
        if requests.is_empty() {
            html.push_str("<p>None pending.</p>");
            return html;
        }
        html.push_str("<table><thead><tr><th>#</th><th>From</th><th>Key</th><th>Note</th><th>Decide</th></tr></thead><tbody>");
        for r in &requests {
            let form = |line: String, label: &str, reason: bool| {
                format!(
                    "<form class=\"inline\" method=\"post\" action=\"/do\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"line\" value=\"{}\">{}<button aria-label=\"{label} request {id}\">{label}</button></form>",
                    esc(csrf),
                    esc(&line),
                    if reason {
                        format!("<input type=\"text\" name=\"reason\" placeholder=\"reason (optional)\" aria-label=\"reason for denying request {}\" class=\"w-m\"> ", r.id)
                    } else {
                        String::new()
                    },
                    id = r.id,
                )
            };
            html.push_str(&format!(
                "<tr><td>{id}</td><td>{from}</td><td><code>{fp}</code></td><td>{note}</td><td>{approve}{deny}</td></tr>",
                id = r.id,
                from = esc(&r.identity.to_string()),
                fp = esc(r.fingerprint.as_str()),
                note = esc(r.note.as_deref().unwrap_or("")),
                approve = form(format!("approve {}", r.id), "approve", false),
                deny = form(format!("deny {}", r.id), "deny", true),
            ));
        }
        html.push_str("</tbody></table>");
        html
    }

    /// What closed projects' VMs tried that nobody decided on, with the
    /// three answers as buttons; empty when there is none.
    async fn egress_asks(&self, user: &User, projects: &[Project], csrf: &str) -> String {
        let mut items = String::new();
        for p in projects {
            let Some(Reply::Egress { egress, .. }) = self
                .owners_view(user, p, format!("egress {}", p.name))
                .await
            else {
                continue;
            };
            for d in &egress.asked {
                let button = |verb: &str, label: &str| {
                    action_button(
                        csrf,
                        &format!("egress {} {verb} {d}", p.name),
                        &format!("{verb} {d} for {}", p.name),
                        label,
                        false,
                    )
                };
                items.push_str(&format!(
                    "<li><b>{}</b> tried to reach <code>{}</code> {}{}{}</li>",
                    esc(p.name.as_str()),
                    esc(d),
                    button("allow", "Allow"),
                    button("allow-once", "Allow once"),
                    button("deny", "Deny"),
                ));
            }
        }
        if items.is_empty() {
            return items;
        }
        format!("<h2>Egress asks</h2><p>Closed projects' VMs tried these; nothing gets through until you answer.</p><ul class=\"asks\">{items}</ul>")
    }

    /// What `line` answers about `p` for its owner or an admin (share
    /// links, custom domains); `None` for others, who see neither.
    async fn owners_view(&self, user: &User, p: &Project, line: String) -> Option<Reply> {
        if user.role.as_str() != "admin" && p.owner != user.name {
            return None;
        }
        let who = site::web_identity(user);
        self.gate
            .front_door(&who, user.clone(), &line, Style::PLAIN, &NoProgress)
            .await
            .outcome
            .ok()
    }

    fn project_row(
        &self,
        p: &Project,
        csrf: &str,
        links: &[kennel_core::model::ShareLink],
        domains: &[kennel_core::model::CustomDomain],
    ) -> String {
        let c = self.gate.connection(p);
        let name = p.name.as_str();
        let button = |line: String, label: &str| {
            action_button(csrf, &line, &format!("{label} {name}"), label, true)
        };
        // Each lifecycle button shows only in the states it applies to
        // (the stylesheet reads the card's state, which the page keeps live).
        let when = |class: &str, b: String| format!("<span class=\"{class}\">{b}</span>");
        let actions = [
            when("when-off", button(format!("start {name}"), "start")),
            when("when-on", button(format!("stop {name}"), "stop")),
            when("when-running", button(format!("restart {name}"), "restart")),
            format!(
                "<a href=\"/logs?project={n}\" aria-label=\"follow the log of {n}\">log</a> ",
                n = esc(name)
            ),
            if p.visibility.as_str() == "public" {
                button(format!("private {name}"), "make private")
            } else {
                button(format!("public {name}"), "make public")
            },
        ]
        .concat();
        // One form per thing to change; `form` names how `form_line` makes
        // its command line.
        let form = |kind: &str, stream: bool, legend: &str, fields: &str| {
            format!(
                "<fieldset><legend>{legend}</legend><form method=\"post\" action=\"/do\"{s}><input type=\"hidden\" name=\"csrf\" value=\"{c}\"><input type=\"hidden\" name=\"form\" value=\"{kind}\"><input type=\"hidden\" name=\"project\" value=\"{n}\">{fields}</form></fieldset>",
                s = if stream { " data-stream=\"1\"" } else { "" },
                c = esc(csrf),
                n = esc(name),
            )
        };
        let n = esc(name);
        let mut link_rows = String::new();
        for l in links {
            link_rows.push_str(&format!(
                "<li>#{id} {what}{note} · {visits} visits · until {until} {revoke}</li>",
                id = l.id,
                what = l
                    .port
                    .map_or_else(|| "app".to_owned(), |p| format!("port {p}")),
                note = l
                    .note
                    .as_ref()
                    .map(|t| format!(" ({})", esc(t)))
                    .unwrap_or_default(),
                visits = l.visits,
                until = esc(&kennel_core::model::format_time(l.expires_at)),
                revoke = action_button(
                    csrf,
                    &format!("unshare {name} {}", l.id),
                    &format!("revoke link {} of {name}", l.id),
                    "revoke",
                    false
                ),
            ));
        }
        let more = [
            form(
                "run",
                true,
                "Run a command in the VM",
                &format!("<input type=\"text\" class=\"w-l\" name=\"command\" required placeholder=\"cargo test\" aria-label=\"command to run in {n}\"> <span class=\"run\"><button aria-label=\"run in {n}\">run</button></span> {stop}", stop = button(format!("run stop {name}"), "stop what runs in")),
            ),
            form(
                "share",
                false,
                "Share",
                &format!("<label>With <input type=\"text\" name=\"user\" required class=\"w-m\" aria-label=\"share {n} with\"></label> <label><input type=\"checkbox\" name=\"ssh\" checked> SSH</label> <label><input type=\"checkbox\" name=\"web\" checked> web</label> <button name=\"verb\" value=\"share\">share</button> <button name=\"verb\" value=\"unshare\">unshare</button>"),
            ),
            form(
                "link",
                false,
                "Share by a one-use link",
                &format!("<label>Port <input type=\"number\" name=\"port\" min=\"1\" max=\"65535\" placeholder=\"app\" class=\"w-s\" aria-label=\"link port of {n}\"></label> <label>For <input type=\"text\" name=\"expires\" placeholder=\"7d\" class=\"w-s\" aria-label=\"link expiry of {n}\"></label> <label>Note <input type=\"text\" name=\"note\" class=\"w-m\" aria-label=\"link note of {n}\"></label> <button aria-label=\"make a link to {n}\">make link</button>"),
            ) + &if link_rows.is_empty() {
                String::new()
            } else {
                format!("<ul class=\"links\" aria-label=\"share links of {n}\">{link_rows}</ul>")
            },
            form(
                "domain",
                false,
                "Custom domain",
                &format!("<input type=\"text\" name=\"host\" required placeholder=\"app.example.com\" class=\"w-m\" aria-label=\"custom domain of {n}\"> <button aria-label=\"add the domain to {n}\">add</button>"),
            ) + &if domains.is_empty() {
                String::new()
            } else {
                let mut l = format!("<ul class=\"domains\" aria-label=\"custom domains of {n}\">");
                for d in domains {
                    let url = self.gate.settings().urls().custom_domain(&d.host);
                    l.push_str(&format!(
                        "<li><a href=\"{u}\">{h}</a> · {st} {rm}</li>",
                        u = esc(&url),
                        h = esc(&d.host),
                        st = esc(&d.state),
                        rm = action_button(
                            csrf,
                            &format!("domain rm {name} {}", d.host),
                            &format!("remove the domain {} of {name}", d.host),
                            "remove",
                            false
                        ),
                    ));
                }
                l.push_str("</ul>");
                l
            },
            form(
                "resize",
                false,
                "Resources",
                &format!("<label>CPUs <input type=\"number\" name=\"cpus\" min=\"1\" max=\"64\" value=\"{cpus}\" class=\"w-s\" aria-label=\"CPUs of {n}\"></label> <label>Memory <input type=\"text\" name=\"memory\" value=\"{mem}\" class=\"w-s\" aria-label=\"memory of {n}\"></label> <label>Disk <input type=\"text\" name=\"disk\" value=\"{disk}\" class=\"w-s\" aria-label=\"disk of {n}\"></label> <button aria-label=\"resize {n}\">resize</button>",
                    cpus = p.resources.vcpus,
                    mem = kennel_core::command::Size { mib: p.resources.memory_mib },
                    disk = kennel_core::command::Size { mib: p.resources.disk_mib },
                ),
            ),
            form(
                "port",
                false,
                "App port",
                &format!("<input type=\"number\" name=\"port\" min=\"1\" max=\"65535\" value=\"{port}\" class=\"w-s\" aria-label=\"app port of {n}\"> <button>set</button>", port = p.app_port),
            ),
            format!(
                "<fieldset><legend>Checkpoints</legend>{take} {list}</fieldset>",
                take = button(format!("checkpoint {name}"), "take checkpoint"),
                list = button(format!("checkpoints {name}"), "list checkpoints"),
            ),
            form(
                "rollback",
                false,
                "Roll back",
                &format!("<label>To <input type=\"text\" name=\"label\" required pattern=\"[a-z][a-z0-9-]*\" class=\"w-m\" aria-label=\"roll {n} back to\"></label> <button>roll back</button>"),
            ),
            form(
                "tags",
                false,
                "Tags",
                &format!("<input type=\"text\" name=\"tags\" required pattern=\"[a-z][a-z0-9 -]*\" class=\"w-m\" aria-label=\"tags of {n}\"> <button name=\"verb\" value=\"tag\">tag</button> <button name=\"verb\" value=\"untag\">untag</button>"),
            ),
            format!(
                "<fieldset><legend>Remove</legend>{rm}{purge}</fieldset>",
                rm = action_button(csrf, &format!("rm {name}"), &format!("remove {name}"), "remove", false),
                purge = action_button(
                    csrf,
                    &format!("rm {name} --purge"),
                    &format!("remove {name} and its source"),
                    "remove with its source",
                    false
                ),
            ),
        ]
        .concat();
        format!(
            "<article class=\"p\" data-row-state=\"{st}\"><header><h3>{n}</h3><span class=\"state {st}\" data-state=\"{n}\">{st}</span>{tags}</header><p class=\"meta\"><small>{owner} · {stack} · {cpus} CPU, {mem} MiB, {disk} disk · {vis}, port {port}</small></p><p class=\"reach\"><code>{ssh}</code> <button type=\"button\" data-copy=\"{ssh}\" aria-label=\"copy the SSH command for {n}\">copy</button><br><a href=\"{vscode}\">Open in VS Code</a> · <a href=\"{app}\">{app}</a></p><div class=\"actions\">{actions}</div><details><summary>Editors: Zed, ssh-config, JetBrains</summary><p><small>Zed: <code>{zed}</code></small></p><pre>{cfg}</pre><small>JetBrains Gateway: {jb}</small></details><details><summary>more</summary>{more}</details></article>",
            owner = esc(p.owner.as_str()),
            tags = if p.tags.is_empty() {
                String::new()
            } else {
                format!(
                    "<small class=\"tags\" aria-label=\"tags of {n}\">{t}</small>",
                    t = esc(&p.tags.join(" "))
                )
            },
            st = esc(p.state.as_str()),
            stack = esc(&p.stack),
            cpus = p.resources.vcpus,
            mem = p.resources.memory_mib,
            disk = kennel_core::command::Size { mib: p.resources.disk_mib },
            ssh = esc(&c.ssh_command),
            vscode = esc(&c.vscode_url),
            zed = esc(&c.zed_url),
            cfg = esc(&c.ssh_config),
            jb = esc(&c.jetbrains_hint),
            app = esc(&c.https_url),
            vis = esc(p.visibility.as_str()),
            port = p.app_port,
        )
    }

    /// A dashboard form's command line, once the form is known to come
    /// from this dashboard (same origin, the session's CSRF token); with
    /// the session's CSRF token for the page that answers.
    #[allow(clippy::result_large_err)] // the error is the answer to send
    async fn checked_form(
        &self,
        req: Request<Incoming>,
    ) -> Result<(String, Option<String>), Response<Body>> {
        let expected = csrf_of(&Self::cookie(&req).unwrap_or_default());
        let same_origin = self.same_origin(&req);
        let body = http_body_util::Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|_| page::status(StatusCode::PAYLOAD_TOO_LARGE, "That form is too large."))?;
        let (csrf, line) = form_line(&body);
        if !same_origin || csrf.as_deref() != Some(expected.as_str()) {
            return Err(page::status(
                StatusCode::FORBIDDEN,
                "That form did not come from this page (its CSRF token is missing or wrong); reload the dashboard and try again.",
            ));
        }
        Ok((expected, line))
    }

    /// `POST /do`: one line from a form, CSRF-checked, run as the user.
    async fn dash_do(&self, req: Request<Incoming>, user: User) -> Response<Body> {
        let (expected, line) = match self.checked_form(req).await {
            Ok(f) => f,
            Err(refused) => return refused,
        };
        let Some(line) = line.filter(|l| !l.trim().is_empty()) else {
            return self
                .dashboard(
                    &user,
                    &expected,
                    Some((false, "Type a command.".into())),
                    None,
                    None,
                )
                .await;
        };
        let who = site::web_identity(&user);
        let answered = self
            .gate
            .front_door(
                &who,
                user.clone(),
                &line,
                Style {
                    format: Format::Plain,
                    force_json: false,
                },
                &NoProgress,
            )
            .await;
        // A question (rm asks, twice for --purge): its answer is a button.
        let confirm = match &answered.outcome {
            Ok(Reply::Confirm { confirm_with, .. }) => Some(confirm_with.clone()),
            _ => None,
        };
        // A new share link: its QR code, for a phone to scan.
        let qr = match &answered.outcome {
            Ok(Reply::LinkCreated { url, .. }) => qr_png(url),
            _ => None,
        };
        self.dashboard(
            &user,
            &expected,
            Some((answered.outcome.is_ok(), answered.text)),
            confirm,
            qr,
        )
        .await
    }

    /// `POST /run`: like `/do`, but the answer streams: one line per
    /// progress step, then the rendered outcome (the new-project form's
    /// script shows it as chat shows its edited message).
    async fn dash_run(&self, req: Request<Incoming>, user: User) -> Response<Body> {
        let line = match self.checked_form(req).await {
            Ok((_, line)) => line,
            Err(refused) => return refused,
        };
        let Some(line) = line else {
            return page::status(StatusCode::BAD_REQUEST, "Name the project.");
        };
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            let who = site::web_identity(&user);
            let sink = TextSink(tx.clone());
            let answered = gate
                .front_door(
                    &who,
                    user,
                    &line,
                    Style {
                        format: Format::Plain,
                        force_json: false,
                    },
                    &sink,
                )
                .await;
            let _ = tx
                .send(Bytes::from(format!("\n{}\n", answered.text.trim_end())))
                .await;
        });
        super::api::streamed(rx, "text/plain; charset=utf-8")
    }

    /// `GET /logs?project=NAME`: the VM console's tail, followed live.
    fn logs_page(&self, req: &Request<Incoming>, user: &User) -> Response<Body> {
        let Some(name) = project_param(req) else {
            return page::status(
                StatusCode::BAD_REQUEST,
                "Name a project: /logs?project=NAME",
            );
        };
        let html = format!(
            "<header class=\"top\"><h1>Kennel</h1><p><a href=\"/\">Back to projects</a> · signed in as <b>{}</b></p></header><main><h2>Log of {n}</h2><pre id=\"log\" data-project=\"{n}\" aria-live=\"polite\">…</pre></main>",
            esc(user.name.as_str()),
            n = esc(name.as_str())
        );
        page::dashboard(StatusCode::OK, "Kennel", &html)
    }

    /// `GET /logtail?project=NAME`: `logs NAME` as the user, sent again
    /// (as a JSON string) whenever it changes, checked every 2 s.
    fn log_tail(&self, req: &Request<Incoming>, user: User) -> Response<Body> {
        let Some(name) = project_param(req) else {
            return page::status(StatusCode::BAD_REQUEST, "Name a project.");
        };
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            let who = site::web_identity(&user);
            let line = format!("logs {name} --lines 200");
            let mut last = String::new();
            loop {
                let answered = gate
                    .front_door(&who, user.clone(), &line, Style::PLAIN, &NoProgress)
                    .await;
                let text = answered.text;
                let msg = if text == last {
                    Bytes::from_static(b": ping\n\n")
                } else {
                    let m = format!("data: {}\n\n", serde_json::Value::String(text.clone()));
                    last = text;
                    Bytes::from(m)
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        super::api::streamed(rx, "text/event-stream")
    }

    /// `GET /events`: the states of the user's projects, sent again
    /// whenever one changes (checked every second, only when the store
    /// changed).
    fn events(&self, user: User) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            let who = site::web_identity(&user);
            let (mut seen_changes, mut last) = (u64::MAX, String::new());
            loop {
                let changes = gate.changes();
                if changes != seen_changes {
                    seen_changes = changes;
                    let answered = gate
                        .front_door(&who, user.clone(), "projects", Style::PLAIN, &NoProgress)
                        .await;
                    if let Ok(Reply::Projects { projects, .. }) = answered.outcome {
                        let states: serde_json::Map<String, serde_json::Value> = projects
                            .iter()
                            .map(|p| (p.name.to_string(), p.state.as_str().into()))
                            .collect();
                        let now = serde_json::Value::Object(states).to_string();
                        if now != last {
                            if tx
                                .send(Bytes::from(format!("data: {now}\n\n")))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            last = now;
                        }
                    }
                } else if tx.send(Bytes::from_static(b": ping\n\n")).await.is_err() {
                    // The browser went away.
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        super::api::streamed(rx, "text/event-stream")
    }
}

/// The CSRF token and the command line a dashboard form sends: `line`
/// itself (a deny's `reason` appended, quoted), or the new-project form's
/// fields made into `new project NAME [--stack S] [--git URL]
/// [--template T]`. Values are quoted as the command language quotes, so
/// a field cannot add flags of its own.
fn form_line(body: &[u8]) -> (Option<String>, Option<String>) {
    let mut f: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        f.insert(k.into_owned(), v.trim().to_owned());
    }
    let csrf = f.remove("csrf");
    let q = kennel_core::command::lex::quote;
    let line = if f.get("form").map(String::as_str) == Some("key") {
        f.get("key").filter(|k| !k.is_empty()).map(|k| {
            match f.get("label").filter(|l| !l.is_empty()) {
                Some(l) => format!("key add {} {}", q(k), q(l)),
                None => format!("key add {}", q(k)),
            }
        })
    } else if f.get("form").map(String::as_str) == Some("share") {
        match (f.get("project"), f.get("user")) {
            (Some(p), Some(u)) if !p.is_empty() && !u.is_empty() => {
                let verb = if f.get("verb").map(String::as_str) == Some("unshare") {
                    "unshare"
                } else {
                    "share"
                };
                let mut l = format!("{verb} {} {}", q(p), q(u));
                if verb == "share" {
                    let (ssh, web) = (f.contains_key("ssh"), f.contains_key("web"));
                    if ssh != web {
                        l.push_str(if ssh { " --ssh" } else { " --web" });
                    }
                }
                Some(l)
            }
            _ => None,
        }
    } else if f.get("form").map(String::as_str) == Some("port") {
        match (f.get("project"), f.get("port")) {
            (Some(p), Some(n)) if !p.is_empty() && !n.is_empty() => {
                Some(format!("port {} {}", q(p), q(n)))
            }
            _ => None,
        }
    } else if f.get("form").map(String::as_str) == Some("rollback") {
        // Asks first: the answer is the question, with its button.
        match (f.get("project"), f.get("label")) {
            (Some(p), Some(l)) if !p.is_empty() && !l.is_empty() => {
                Some(format!("rollback {} {}", q(p), q(l)))
            }
            _ => None,
        }
    } else if f.get("form").map(String::as_str) == Some("tags") {
        // Each tag its own word: `tag app web team-x`.
        match (f.get("project"), f.get("tags")) {
            (Some(p), Some(t)) if !p.is_empty() && !t.trim().is_empty() => {
                let verb = if f.get("verb").map(String::as_str) == Some("untag") {
                    "untag"
                } else {
                    "tag"
                };
                let mut l = format!("{verb} {}", q(p));
                for w in t.split_whitespace() {
                    l.push(' ');
                    l.push_str(&q(w));
                }
                Some(l)
            }
            _ => None,
        }
    } else if f.get("form").map(String::as_str) == Some("run") {
        // The command as typed: everything after the name is its own.
        match (f.get("project"), f.get("command")) {
            (Some(p), Some(c)) if !p.is_empty() && !c.is_empty() => {
                Some(format!("run {} {c}", q(p)))
            }
            _ => None,
        }
    } else if f.get("form").map(String::as_str) == Some("link") {
        f.get("project").filter(|p| !p.is_empty()).map(|p| {
            let mut l = format!("share {} --link", q(p));
            for (field, flag) in [
                ("port", "--port"),
                ("expires", "--expires"),
                ("note", "--note"),
            ] {
                if let Some(v) = f.get(field).filter(|v| !v.is_empty()) {
                    l.push_str(&format!(" {flag} {}", q(v)));
                }
            }
            l
        })
    } else if f.get("form").map(String::as_str) == Some("domain") {
        match (f.get("project"), f.get("host")) {
            (Some(p), Some(h)) if !p.is_empty() && !h.is_empty() => {
                Some(format!("domain add {} {}", q(p), q(h)))
            }
            _ => None,
        }
    } else if f.get("form").map(String::as_str) == Some("resize") {
        f.get("project").filter(|p| !p.is_empty()).map(|p| {
            let mut l = format!("resize {}", q(p));
            for (field, flag) in [
                ("cpus", "--cpus"),
                ("memory", "--memory"),
                ("disk", "--disk"),
            ] {
                if let Some(v) = f.get(field).filter(|v| !v.is_empty()) {
                    l.push_str(&format!(" {flag} {}", q(v)));
                }
            }
            l
        })
    } else if f.get("form").map(String::as_str) == Some("secret") {
        match (f.get("secret"), f.get("value")) {
            (Some(n), Some(v)) if !n.is_empty() && !v.is_empty() => {
                Some(format!("secret set {} {}", q(n), q(v)))
            }
            _ => None,
        }
    } else if let Some(name) = f.get("name").filter(|n| !n.is_empty()) {
        let mut l = format!("new project {}", q(name));
        for (field, flag) in [
            ("stack", "--stack"),
            ("git", "--git"),
            ("template", "--template"),
            ("cpus", "--cpus"),
            ("memory", "--memory"),
            ("disk", "--disk"),
        ] {
            if let Some(v) = f.get(field).filter(|v| !v.is_empty()) {
                l.push_str(&format!(" {flag} {}", q(v)));
            }
        }
        Some(l)
    } else {
        f.get("line")
            .map(|l| match f.get("reason").filter(|r| !r.is_empty()) {
                Some(r) => format!("{l} {}", q(r)),
                None => l.clone(),
            })
    };
    (csrf, line)
}

/// A button that posts one line to `/do`: its answer streams into the
/// page (`stream`), or loads as a page (questions, whose answer is a
/// button of its own).
fn action_button(csrf: &str, line: &str, aria: &str, label: &str, stream: bool) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"/do\"{}><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"line\" value=\"{}\"><button aria-label=\"{}\">{}</button></form>",
        if stream { " data-stream=\"1\"" } else { "" },
        esc(csrf),
        esc(line),
        esc(aria),
        esc(label)
    )
}

/// The `project` query parameter, if it is a project name.
fn project_param<B>(req: &Request<B>) -> Option<kennel_core::names::ProjectName> {
    let q = req.uri().query()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "project")
        .and_then(|(_, v)| kennel_core::names::ProjectName::new(&v).ok())
}

/// Each progress step as one line of text.
struct TextSink(mpsc::Sender<Bytes>);

impl kennel_core::provision::ProgressSink for TextSink {
    fn report(&self, p: kennel_core::provision::Progress) {
        let _ = self.0.try_send(Bytes::from(format!("… {p}\n")));
    }

    /// A `run`'s output, as it comes (the page decodes it as a stream,
    /// so a character split across chunks arrives whole).
    fn output(&self, bytes: &[u8]) {
        let _ = self.0.try_send(Bytes::copy_from_slice(bytes));
    }

    fn streams_output(&self) -> bool {
        true
    }
}

/// A QR code of `data` as a PNG (one pixel per module; the page scales
/// it up), base64 for a `data:` URL.
fn qr_png(data: &str) -> Option<String> {
    use base64::Engine;
    kennel_core::qr::png(data, 1).map(|png| base64::engine::general_purpose::STANDARD.encode(png))
}

/// `/static/dash.css`.
pub(super) fn stylesheet() -> Response<Body> {
    let mut r = Response::new(page::full(STYLE));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `/static/dash.js`.
pub(super) fn script() -> Response<Body> {
    let mut r = Response::new(page::full(SCRIPT));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::form_line;

    #[test]
    fn the_tags_form_makes_one_word_per_tag() {
        let (_, line) = form_line(b"csrf=t&form=tags&project=app&tags=web+team-x&verb=tag");
        assert_eq!(line.as_deref(), Some("tag app web team-x"));
        let (_, line) = form_line(b"csrf=t&form=tags&project=app&tags=web&verb=untag");
        assert_eq!(line.as_deref(), Some("untag app web"));
        // `--yes` typed in the box makes no valid command.
        let (_, line) = form_line(b"csrf=t&form=tags&project=app&tags=a+--yes");
        let line = line.unwrap();
        assert!(kennel_core::parse(&line).is_err(), "{line}");
        let (_, line) = form_line(b"csrf=t&form=tags&project=app&tags=+");
        assert_eq!(line, None);
    }

    #[test]
    fn the_rollback_form_is_one_quoted_line() {
        let (csrf, line) = form_line(b"csrf=t&form=rollback&project=app&label=c1");
        assert_eq!(csrf.as_deref(), Some("t"));
        assert_eq!(line.as_deref(), Some("rollback app c1"));
        // A field cannot add flags of its own.
        let (_, line) = form_line(b"csrf=t&form=rollback&project=app&label=c1+--yes");
        assert_eq!(line.as_deref(), Some("rollback app \"c1 --yes\""));
        let (_, line) = form_line(b"csrf=t&form=rollback&project=app&label=");
        assert_eq!(line, None);
    }
}
