//! A repository's `devcontainer.json` (Codespaces, DevPod, Coder and VS Code
//! read it), and what of it maps onto a Kennel VM.
//!
//! Kennel boots its own stack image, so `image`, `build`, `features`,
//! `mounts` and the like do not apply; the reply says so. What does map:
//! the lifecycle commands (`onCreateCommand`, `updateContentCommand`,
//! `postCreateCommand` once on the first boot, `postStartCommand` at every
//! boot, run in the VM as `dev` in /workspace), `forwardPorts` (the first
//! local one is the app port), `containerEnv` and `remoteEnv` (every
//! session's environment), `dockerComposeFile` (the file's other services
//! start with Docker Compose in the VM at every boot; `service`, the one an
//! editor would attach to, is the VM itself) and `name`. The file is the
//! guest's to write, so
//! it is read without following links, at most [`MAX_BYTES`], and nothing
//! in it ever runs on the host (`initializeCommand` included).

use std::collections::BTreeMap;
use std::path::Path;

use kennel_core::hostpath::Beneath;
use serde::Deserialize;
use serde_json::Value;

/// Where the file may be, in the order tools look.
pub const PATHS: [&str; 2] = [".devcontainer/devcontainer.json", ".devcontainer.json"];
/// Larger files are not read.
pub const MAX_BYTES: u64 = 256 * 1024;
/// `PATH` in a guest session before the file's `remoteEnv` (sshd's).
pub const GUEST_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/games";

/// The file as written: only what Kennel reads is typed; the rest is
/// looked at by name to say it does not apply.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    name: Option<String>,
    on_create_command: Option<Value>,
    update_content_command: Option<Value>,
    post_create_command: Option<Value>,
    post_start_command: Option<Value>,
    post_attach_command: Option<Value>,
    initialize_command: Option<Value>,
    forward_ports: Option<Vec<Value>>,
    app_port: Option<Value>,
    container_env: Option<BTreeMap<String, Option<String>>>,
    remote_env: Option<BTreeMap<String, Option<String>>>,
    remote_user: Option<String>,
    container_user: Option<String>,
    docker_compose_file: Option<Value>,
    service: Option<String>,
    run_services: Option<Vec<String>>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

/// Keys other tools act on that have no Kennel meaning.
const NOT_MAPPED: &[&str] = &[
    "image",
    "build",
    "dockerFile",
    "dockerfile",
    "context",
    "features",
    "overrideFeatureInstallOrder",
    "mounts",
    "workspaceMount",
    "workspaceFolder",
    "runArgs",
    "privileged",
    "capAdd",
    "securityOpt",
    "init",
    "overrideCommand",
    "shutdownAction",
    "hostRequirements",
];

/// What Kennel takes from a repository's devcontainer.json.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevContainer {
    /// The file, relative to the source (`.devcontainer/devcontainer.json`).
    pub file: String,
    pub name: Option<String>,
    /// `onCreateCommand`, `updateContentCommand`, `postCreateCommand` that
    /// are set, in the order they run, each as (key, shell script).
    pub create: Vec<(&'static str, String)>,
    /// `postStartCommand` as a shell script.
    pub post_start: Option<String>,
    /// Local ports of `forwardPorts` (or the older `appPort`), in order.
    pub ports: Vec<u16>,
    /// Session environment: `containerEnv`, then `remoteEnv` over it, with
    /// `${...}` references resolved.
    pub env: BTreeMap<String, String>,
    /// `dockerComposeFile`: the services Compose starts in the VM.
    pub compose: Option<Compose>,
    /// What did not apply or was dropped, for the reply.
    pub notes: Vec<String>,
}

/// A devcontainer.json's Compose setup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compose {
    /// The files, relative to /workspace, in order (later ones override).
    pub files: Vec<String>,
    /// The primary service: the VM itself, never started as a container.
    pub service: Option<String>,
    /// `runServices`: only these start (default: every other service).
    pub run_services: Option<Vec<String>>,
}

/// The outcome of looking for a devcontainer.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    None,
    Parsed(DevContainer),
    /// The file exists but cannot be used: the reply says why, and the
    /// project goes on without it.
    Broken {
        file: String,
        error: String,
    },
}

impl Found {
    /// The parsed file, if there is one.
    pub fn parsed(&self) -> Option<&DevContainer> {
        match self {
            Found::Parsed(d) => Some(d),
            _ => None,
        }
    }

    /// The app port the file asks for: the first local `forwardPorts` entry.
    pub fn app_port(&self) -> Option<u16> {
        self.parsed().and_then(|d| d.ports.first().copied())
    }

    /// Lines for the requester (none when there is no file).
    pub fn notes(&self, stack: &str) -> Vec<String> {
        match self {
            Found::None => Vec::new(),
            Found::Broken { file, error } => vec![format!(
                "{file} could not be read ({error}); going on without it. Fix it and 'restart' the project to apply it."
            )],
            Found::Parsed(d) => d.describe(stack),
        }
    }
}

/// Looks for the file in `source` and reads it. `known` is the guest's
/// environment before the file (the stack's variables) for `${containerEnv:X}`.
pub fn load(source: &Path, known: &BTreeMap<String, String>) -> Found {
    let Ok(root) = Beneath::open(source) else {
        return Found::None;
    };
    for rel in PATHS {
        match root.read_file(Path::new(rel), MAX_BYTES + 1) {
            Ok(None) => continue,
            Ok(Some(bytes)) if bytes.len() as u64 > MAX_BYTES => {
                return Found::Broken {
                    file: rel.into(),
                    error: format!("larger than {} KiB", MAX_BYTES / 1024),
                }
            }
            Ok(Some(bytes)) => {
                return match String::from_utf8(bytes) {
                    Ok(text) => parse(rel, &text, known),
                    Err(_) => Found::Broken {
                        file: rel.into(),
                        error: "not UTF-8".into(),
                    },
                }
            }
            Err(e) => {
                return Found::Broken {
                    file: rel.into(),
                    error: e.to_string(),
                }
            }
        }
    }
    Found::None
}

/// Parses a devcontainer.json (JSON with comments and trailing commas).
pub fn parse(file: &str, text: &str, known: &BTreeMap<String, String>) -> Found {
    let options = jsonc_parser::ParseOptions::default();
    let f: File = match jsonc_parser::parse_to_serde_value(text, &options) {
        Ok(f) => f,
        Err(e) => {
            return Found::Broken {
                file: file.into(),
                error: e.to_string(),
            }
        }
    };
    let mut d = DevContainer {
        file: file.into(),
        name: f.name.filter(|n| !n.trim().is_empty()),
        ..DevContainer::default()
    };
    for (key, value) in [
        ("onCreateCommand", &f.on_create_command),
        ("updateContentCommand", &f.update_content_command),
        ("postCreateCommand", &f.post_create_command),
    ] {
        if let Some(v) = value {
            match script(v) {
                Ok(Some(s)) => d.create.push((key, s)),
                Ok(None) => {}
                Err(e) => d.notes.push(format!("{key} ignored: {e}")),
            }
        }
    }
    if let Some(v) = &f.post_start_command {
        match script(v) {
            Ok(s) => d.post_start = s,
            Err(e) => d.notes.push(format!("postStartCommand ignored: {e}")),
        }
    }
    if f.post_attach_command.is_some() {
        d.notes.push(
            "postAttachCommand is not run (Kennel has no attach step; use postStartCommand)".into(),
        );
    }
    if f.initialize_command.is_some() {
        d.notes.push(
            "initializeCommand is not run: it runs on the host in other tools, and Kennel runs nothing from a repository on the host".into(),
        );
    }
    let mut others = Vec::new();
    let ports =
        f.forward_ports
            .unwrap_or_default()
            .into_iter()
            .chain(f.app_port.into_iter().flat_map(|v| match v {
                Value::Array(a) => a,
                v => vec![v],
            }));
    for p in ports {
        match local_port(&p) {
            Some(port) if !d.ports.contains(&port) => d.ports.push(port),
            Some(_) => {}
            None => others.push(match p {
                Value::String(s) => s,
                v => v.to_string(),
            }),
        }
    }
    if !others.is_empty() {
        d.notes.push(format!(
            "forwardPorts {} name other containers, which Kennel does not run",
            others.join(", ")
        ));
    }
    let mut env = known.clone();
    env.entry("PATH".into())
        .or_insert_with(|| GUEST_PATH.into());
    env.entry("HOME".into())
        .or_insert_with(|| "/home/dev".into());
    env.entry("USER".into()).or_insert_with(|| "dev".into());
    for (key, vars) in [
        ("containerEnv", f.container_env),
        ("remoteEnv", f.remote_env),
    ] {
        for (k, v) in vars.unwrap_or_default() {
            if !valid_env_name(&k) {
                d.notes
                    .push(format!("{key} {k:?} ignored: not a variable name"));
                continue;
            }
            let Some(v) = v else {
                // `null` unsets in remoteEnv.
                env.remove(&k);
                d.env.remove(&k);
                continue;
            };
            let value = substitute(&v, &env, &mut d.notes);
            if value.contains(['\n', '\r', '\0']) {
                d.notes
                    .push(format!("{key} {k} ignored: its value spans lines"));
                continue;
            }
            env.insert(k.clone(), value.clone());
            d.env.insert(k, value);
        }
    }
    if let Some(v) = &f.docker_compose_file {
        match compose_files(file, v) {
            Ok(files) if files.is_empty() => {}
            Ok(files) => {
                d.compose = Some(Compose {
                    files,
                    service: f.service.clone().filter(|s| !s.trim().is_empty()),
                    run_services: f.run_services.clone(),
                })
            }
            Err(e) => d.notes.push(format!("dockerComposeFile ignored: {e}")),
        }
    }
    if let Some(u) = f.remote_user.or(f.container_user).filter(|u| u != "dev") {
        d.notes.push(format!("sessions run as dev, not {u}"));
    }
    let unmapped: Vec<&str> = NOT_MAPPED
        .iter()
        .copied()
        .filter(|k| f.rest.contains_key(*k))
        .collect();
    if !unmapped.is_empty() {
        d.notes.push(format!(
            "{} {} not apply: Kennel boots its own stack image",
            unmapped.join(", "),
            if unmapped.len() == 1 { "does" } else { "do" }
        ));
    }
    Found::Parsed(d)
}

impl DevContainer {
    /// The script run once on the first boot: the create steps in order,
    /// stopping at the first that fails (as other tools do).
    pub fn create_script(&self) -> Option<String> {
        if self.create.is_empty() {
            return None;
        }
        let mut s =
            String::from("#!/bin/sh\n# From devcontainer.json; run once, as dev, in /workspace.\n");
        for (key, step) in &self.create {
            s.push_str(&format!(
                "echo '== {key}'\n( {step}\n) || {{ rc=$?; echo \"== {key} failed with exit $rc\"; exit $rc; }}\n"
            ));
        }
        Some(s)
    }

    /// The script run at every boot.
    pub fn start_script(&self) -> Option<String> {
        self.post_start
            .as_ref()
            .map(|s| format!("#!/bin/sh\n# postStartCommand from devcontainer.json; every boot, as dev, in /workspace.\n{s}\n"))
    }

    /// The script run at every boot before the create steps: `docker
    /// compose up` of every service but the primary one (or those of
    /// `runServices`), from the folder of the devcontainer.json as other
    /// tools do, without building or pulling what is not there.
    pub fn compose_script(&self) -> Option<String> {
        let c = self.compose.as_ref()?;
        let files: String = c
            .files
            .iter()
            .map(|f| format!(" -f {}", sh_quote(&format!("/workspace/{f}"))))
            .collect();
        let select = match &c.run_services {
            Some(list) => format!(
                "services={}",
                sh_quote(
                    &list
                        .iter()
                        .filter(|s| Some(s.as_str()) != c.service.as_deref())
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            ),
            None => format!(
                "all=$(docker compose{files} config --services)\nservices=$(printf '%s\\n' \"$all\" | grep -vxF -e {} || true)",
                sh_quote(c.service.as_deref().unwrap_or(""))
            ),
        };
        Some(format!(
            "#!/bin/sh\n# dockerComposeFile from devcontainer.json: its services but the VM's own ({}), every boot, as dev.\nset -e\n{select}\nif [ -z \"$services\" ]; then echo 'no services to start'; exit 0; fi\n# shellcheck disable=SC2086\nexec docker compose{files} up --detach --no-deps --no-build --pull never $services\n",
            c.service.as_deref().unwrap_or("none named")
        ))
    }

    /// `~/.ssh/environment` lines (sshd: `NAME=value`, no quoting).
    pub fn ssh_environment(&self) -> String {
        self.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
    }

    /// The same for login shells, which reset `PATH` in /etc/profile.
    pub fn shell_environment(&self) -> String {
        self.env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
            .collect()
    }

    fn describe(&self, stack: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut parts = Vec::new();
        if !self.create.is_empty() {
            parts.push(format!(
                "{} once on the first boot",
                self.create
                    .iter()
                    .map(|(k, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.post_start.is_some() {
            parts.push("postStartCommand at every boot".into());
        }
        if !self.env.is_empty() {
            parts.push(format!(
                "{} in every session",
                self.env
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(p) = self.ports.first() {
            parts.push(format!("app port {p} (forwardPorts)"));
        }
        if let Some(c) = &self.compose {
            parts.push(format!(
                "Compose services from {} at every boot ({} is this VM; containers reach it and you reach them on their published ports)",
                c.files.join(", "),
                c.service.as_deref().unwrap_or("no service")
            ));
        }
        out.push(format!(
            "{}{}: {}; Kennel uses its own {stack} stack image",
            self.file,
            self.name
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            if parts.is_empty() {
                "nothing that applies to a VM".into()
            } else {
                parts.join("; ")
            }
        ));
        if self.ports.len() > 1 {
            out.push(format!(
                "other forwardPorts: {}; reach them with ssh -L PORT:localhost:PORT",
                self.ports
                    .iter()
                    .skip(1)
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.extend(self.notes.iter().map(|n| format!("devcontainer: {n}")));
        out
    }
}

/// A lifecycle command as one shell script: a string as is (sh -c), an
/// array as one command without a shell, an object as its commands run in
/// parallel, the script failing if any fails.
/// `dockerComposeFile` (a path or a list, relative to the folder of the
/// devcontainer.json `file`) as paths relative to the source, which must
/// stay inside it.
fn compose_files(file: &str, v: &Value) -> Result<Vec<String>, String> {
    let list: Vec<&str> = match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().ok_or("entries must be paths"))
            .collect::<Result<_, _>>()?,
        _ => return Err("must be a path or a list of paths".into()),
    };
    let dir = Path::new(file).parent().unwrap_or(Path::new(""));
    list.into_iter()
        .map(|f| {
            let mut parts: Vec<String> = Vec::new();
            for c in dir.join(f).components() {
                match c {
                    std::path::Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
                    std::path::Component::CurDir => {}
                    std::path::Component::ParentDir if parts.pop().is_some() => {}
                    _ => return Err(format!("{f:?} is outside the repository")),
                }
            }
            if parts.is_empty() || f.contains(['\n', '\r', '\0']) {
                return Err(format!("{f:?} is not a file in the repository"));
            }
            Ok(parts.join("/"))
        })
        .collect()
}

fn script(v: &Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(a) => argv(a).map(Some),
        Value::Object(o) => {
            let mut lines = Vec::new();
            let mut waits = Vec::new();
            for (i, (name, c)) in o.iter().enumerate() {
                let one = match c {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => argv(a)?,
                    _ => {
                        return Err(format!(
                            "the command {name:?} is neither a string nor an array"
                        ))
                    }
                };
                lines.push(format!("( {one}\n) & p{i}=$!"));
                waits.push(format!("wait $p{i} || rc=$?"));
            }
            if lines.is_empty() {
                return Ok(None);
            }
            Ok(Some(format!(
                "{}\nrc=0\n{}\nexit $rc",
                lines.join("\n"),
                waits.join("\n")
            )))
        }
        _ => Err("neither a string, an array nor an object".into()),
    }
}

fn argv(a: &[Value]) -> Result<String, String> {
    let words: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
    match words {
        Some(w) if !w.is_empty() => Ok(w.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ")),
        Some(_) => Err("an empty array".into()),
        None => Err("an array with something other than strings".into()),
    }
}

/// A `forwardPorts` entry naming a port in this VM: `3000`, `"3000"`,
/// `"localhost:3000"`, `"127.0.0.1:3000"`.
fn local_port(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|p| *p > 0),
        Value::String(s) => {
            let port = match s.rsplit_once(':') {
                Some(("localhost" | "127.0.0.1" | "0.0.0.0", port)) => port,
                Some(_) => return None,
                None => s.as_str(),
            };
            port.parse::<u16>().ok().filter(|p| *p > 0)
        }
        _ => None,
    }
}

fn valid_env_name(k: &str) -> bool {
    k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Resolves `${containerWorkspaceFolder}`, `${containerEnv:X}`,
/// `${remoteEnv:X}`, `${localEnv:X[:default]}` (the host's environment is
/// never passed in: the default, or empty) and the other variables tools
/// define, leaving anything else as written.
fn substitute(v: &str, env: &BTreeMap<String, String>, notes: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(start) = rest.find("${") {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + 2..).unwrap_or_default();
        let Some(end) = after.find('}') else {
            out.push_str(rest.get(start..).unwrap_or_default());
            return out;
        };
        let var = after.get(..end).unwrap_or_default();
        let (kind, arg) = var.split_once(':').unwrap_or((var, ""));
        match kind {
            "containerWorkspaceFolder" | "localWorkspaceFolder" => out.push_str("/workspace"),
            "containerWorkspaceFolderBasename" | "localWorkspaceFolderBasename" => {
                out.push_str("workspace");
            }
            "containerEnv" | "remoteEnv" => {
                out.push_str(env.get(arg).map_or("", String::as_str));
            }
            "localEnv" => {
                let (name, default) = arg.split_once(':').unwrap_or((arg, ""));
                if default.is_empty() {
                    notes.push(format!(
                        "${{localEnv:{name}}} is empty: Kennel does not pass the host's environment into VMs"
                    ));
                }
                out.push_str(default);
            }
            _ => {
                out.push_str("${");
                out.push_str(var);
                out.push('}');
            }
        }
        rest = after.get(end + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// `'...'` for sh, with `'` written as `'\''`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> DevContainer {
        match parse(".devcontainer/devcontainer.json", text, &BTreeMap::new()) {
            Found::Parsed(d) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn comments_trailing_commas_strings_and_arrays() {
        let d = parsed(
            r#"{
              // A Node app.
              "name": "My App",
              /* block */ "image": "mcr.microsoft.com/devcontainers/javascript-node:18",
              "features": { "ghcr.io/devcontainers/features/github-cli:1": {} },
              "postCreateCommand": "npm ci",
              "postStartCommand": ["npm", "run", "dev -- --host"],
              "forwardPorts": [3000, "localhost:9229", "db:5432", 3000,],
              "containerEnv": { "APP_ENV": "dev", },
              "remoteEnv": {
                "PATH": "${containerEnv:PATH}:/workspace/node_modules/.bin",
                "ROOT": "${containerWorkspaceFolder}/src",
                "TOKEN": "${localEnv:GITHUB_TOKEN}",
                "QUOTE": "it's",
              },
            }"#,
        );
        assert_eq!(d.name.as_deref(), Some("My App"));
        assert_eq!(d.create, [("postCreateCommand", "npm ci".to_owned())]);
        assert_eq!(d.post_start.as_deref(), Some("'npm' 'run' 'dev -- --host'"));
        assert_eq!(d.ports, [3000, 9229]);
        assert_eq!(
            d.env["PATH"],
            format!("{GUEST_PATH}:/workspace/node_modules/.bin")
        );
        assert_eq!(d.env["ROOT"], "/workspace/src");
        assert_eq!(d.env["TOKEN"], "");
        assert_eq!(d.env["APP_ENV"], "dev");
        assert!(d.shell_environment().contains("export QUOTE='it'\\''s'\n"));
        assert!(d.ssh_environment().contains("QUOTE=it's\n"));
        let notes = d.describe("node").join("\n");
        assert!(notes.contains(".devcontainer/devcontainer.json (My App): postCreateCommand once on the first boot; postStartCommand at every boot;"), "{notes}");
        assert!(
            notes.contains("app port 3000 (forwardPorts); Kennel uses its own node stack image"),
            "{notes}"
        );
        assert!(notes.contains("other forwardPorts: 9229"), "{notes}");
        assert!(notes.contains("db:5432 name other containers"), "{notes}");
        assert!(
            notes.contains("image, features do not apply: Kennel boots its own stack image"),
            "{notes}"
        );
        assert!(notes.contains("localEnv:GITHUB_TOKEN"), "{notes}");
    }

    #[test]
    fn object_commands_run_in_parallel_and_steps_in_order() {
        let d = parsed(
            r#"{ "onCreateCommand": "make deps",
                 "postCreateCommand": { "server": "npm ci", "docs": ["pip", "install", "-r", "docs/req.txt"] },
                 "updateContentCommand": "" }"#,
        );
        assert_eq!(d.create.len(), 2, "{:?}", d.create);
        assert_eq!(d.create[0].0, "onCreateCommand");
        let s = d.create_script().unwrap();
        assert!(s.find("onCreateCommand").unwrap() < s.find("postCreateCommand").unwrap());
        assert!(s.contains("( npm ci\n) & p1=$!"), "{s}");
        assert!(s.contains("'pip' 'install' '-r' 'docs/req.txt'"), "{s}");
        assert!(s.contains("wait $p0 || rc=$?"), "{s}");
    }

    #[test]
    fn a_broken_file_says_where() {
        let f = parse(
            "devcontainer.json",
            "{\n  \"name\": \"x\"\n  \"image\" \"y\"\n}",
            &BTreeMap::new(),
        );
        let Found::Broken { error, .. } = &f else {
            panic!("{f:?}")
        };
        assert!(error.contains("line 3"), "{error}");
        assert!(
            f.notes("base")[0].contains("going on without it"),
            "{:?}",
            f.notes("base")
        );
        let f = parse(
            "devcontainer.json",
            r#"{"forwardPorts": 3000}"#,
            &BTreeMap::new(),
        );
        assert!(matches!(f, Found::Broken { .. }), "{f:?}");
        let f = parse(
            "devcontainer.json",
            r#"{"postCreateCommand": 7, "remoteEnv": {"A B": "x", "OK": "a\nb"}}"#,
            &BTreeMap::new(),
        );
        let d = f.parsed().unwrap();
        assert!(d.create.is_empty());
        assert!(d.env.is_empty(), "{:?}", d.env);
        assert_eq!(d.notes.len(), 3, "{:?}", d.notes);
    }

    #[test]
    fn it_is_read_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(d.path().join("host.json"), r#"{"name": "host secret"}"#).unwrap();
        std::os::unix::fs::symlink(d.path().join("host.json"), src.join(".devcontainer.json"))
            .unwrap();
        let f = load(&src, &BTreeMap::new());
        assert!(
            matches!(f, Found::Broken { ref error, .. } if error.contains("link")),
            "{f:?}"
        );
        std::fs::remove_file(src.join(".devcontainer.json")).unwrap();
        assert_eq!(load(&src, &BTreeMap::new()), Found::None);
        std::fs::create_dir_all(src.join(".devcontainer")).unwrap();
        std::fs::write(
            src.join(".devcontainer/devcontainer.json"),
            r#"{"forwardPorts": [8080]}"#,
        )
        .unwrap();
        std::fs::write(
            src.join(".devcontainer.json"),
            r#"{"forwardPorts": [9090]}"#,
        )
        .unwrap();
        assert_eq!(load(&src, &BTreeMap::new()).parsed().unwrap().ports, [8080]);
    }

    #[test]
    fn compose_files_start_every_service_but_the_vms_own() {
        let d = parsed(
            r#"{ "dockerComposeFile": ["../compose.yaml", "compose.dev.yaml"], "service": "app" }"#,
        );
        let c = d.compose.clone().unwrap();
        assert_eq!(c.files, ["compose.yaml", ".devcontainer/compose.dev.yaml"]);
        assert_eq!(c.service.as_deref(), Some("app"));
        let script = d.compose_script().unwrap();
        assert!(
            script.contains("docker compose -f '/workspace/compose.yaml' -f '/workspace/.devcontainer/compose.dev.yaml' config --services"),
            "{script}"
        );
        assert!(script.contains("grep -vxF -e 'app'"), "{script}");
        assert!(script.contains("up --detach --no-deps --no-build --pull never $services"));
        assert!(d
            .describe("node")
            .iter()
            .any(|l| l.contains("Compose services from compose.yaml")));
        assert!(
            !d.notes.iter().any(|n| n.contains("dockerComposeFile")),
            "{:?}",
            d.notes
        );

        let d = parsed(
            r#"{ "dockerComposeFile": "c.yml", "service": "app", "runServices": ["db", "app", "it's"] }"#,
        );
        let script = d.compose_script().unwrap();
        assert!(script.contains("services='db it'\\''s'"), "{script}");

        for bad in [r#""/etc/compose.yaml""#, r#""../../x.yaml""#, "3", r#"[1]"#] {
            let d = parsed(&format!(r#"{{ "dockerComposeFile": {bad} }}"#));
            assert!(d.compose.is_none(), "{bad}");
            assert!(
                d.notes
                    .iter()
                    .any(|n| n.starts_with("dockerComposeFile ignored")),
                "{bad}: {:?}",
                d.notes
            );
        }
    }
}
