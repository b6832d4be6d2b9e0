//! The `kennel` binary: parses the command line, loads configuration, and
//! wires the parts together. Business logic lives in the library crates.

use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc, not glibc's malloc: the gateways allocate per request and per
/// packet on many tasks; bench/https.sh and bench/load.sh measure both.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The daemon's runtime; its workers tidy their heaps before they sleep
/// ([`tidy`]).
fn serve_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(tidy::before_sleep)
        .build()
}

/// Writes to standard output. A reader that went away (`kennel exec help |
/// head -1`) ends the program quietly, as it does any Unix filter, instead
/// of the panic `println!` gives on a broken pipe.
pub(crate) fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// `println!` through [`out`].
macro_rules! outln {
    ($($t:tt)*) => { $crate::out(format_args!("{}\n", format_args!($($t)*))) };
}
pub(crate) use outln;

mod backup;
mod bots;
mod config;
mod console;
mod datadir;
mod doctor;
mod image_cmd;
mod logging;
mod metrics;
mod serve;
mod stacks_cmd;
mod tidy;
mod wiring;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Chat-ops for per-project microVMs.
#[derive(Debug, Parser)]
#[command(name = "kennel", version, about, long_about = None)]
struct Cli {
    /// Configuration file (default: ./kennel.toml, then ~/.config/kennel/kennel.toml).
    #[arg(long, global = true, env = "KENNEL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides the config's data_dir).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon: control socket, provisioner, gateways and bots.
    Serve,
    /// Run one command of the command language as the local admin.
    Exec {
        /// Run as this user instead of the local admin (to try policy).
        #[arg(long = "as", value_name = "USER")]
        as_user: Option<String>,
        /// Answer in JSON.
        #[arg(long)]
        json: bool,
        /// The command line, e.g. 'new project myapp --stack rust'.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        words: Vec<String>,
    },
    /// Check this host and say what is missing and how to install it.
    Doctor {
        /// Answer in JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the configuration in force and where each value came from.
    Config,
    /// Build, list and remove guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Copy the store (consistently, while the daemon runs) and the keys
    /// into a new directory.
    Backup {
        /// Where to write the backup (a new or empty directory).
        dir: PathBuf,
    },
    /// Restore a backup into a fresh data directory (--data-dir).
    Restore {
        /// The backup made by `kennel backup`.
        dir: PathBuf,
    },
    /// Check a repository against the stacks before creating a project.
    #[command(subcommand)]
    Stacks(StacksCmd),
}

#[derive(Debug, Subcommand)]
enum StacksCmd {
    /// What `new project` would choose for a directory, and why: the stack
    /// with its evidence and scores, warnings, pinned versions the image
    /// does not meet, the devcontainer.json and the app port.
    Detect {
        /// The top of the repository.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Answer in JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the kernel artefacts and stack images (the base image if no stack is named).
    Build {
        /// Build this stack's image.
        #[arg(long, conflicts_with = "all")]
        stack: Option<String>,
        /// Build every stack's image.
        #[arg(long)]
        all: bool,
    },
    /// List built images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image no project uses, or every unused old one.
    Rm {
        /// The image id (see `kennel image ls`).
        #[arg(required_unless_present = "unused")]
        id: Option<String>,
        /// Remove every image that no VM uses and that is not its stack's newest.
        #[arg(long, conflicts_with = "id")]
        unused: bool,
    },
}

fn init_logging(filter: &str) {
    logging::init(filter, logging::LogFormat::Text);
}

/// Joins words into one command line. One argument is the whole line
/// (`kennel exec 'new project demo'`); with several, those that hold spaces
/// are quoted, so `kennel exec key add "ssh-ed25519 AAAA... me"` keeps the
/// key whole.
fn join_words(words: &[String]) -> String {
    if let [line] = words {
        return line.clone();
    }
    words
        .iter()
        .map(|w| {
            if w.contains(char::is_whitespace) || w.contains(['"', '\'']) || w.is_empty() {
                kennel_core::command::lex::quote(w)
            } else {
                w.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// No daemon answers for a data dir and it holds no data: the caller is
/// to point `kennel exec` elsewhere.
#[derive(Debug)]
struct NoKennel(PathBuf);

impl std::fmt::Display for NoKennel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no Kennel daemon answers for {} and there is no Kennel data there. Run this where \
             `kennel serve` keeps its data, pass --data-dir DIR (or set KENNEL_DATA_DIR), \
             or start one with `kennel serve`",
            self.0.display()
        )
    }
}

impl std::error::Error for NoKennel {}

/// Where the installed service keeps its data (`scripts/install.sh`).
const SERVICE_DATA_DIR: &str = "/var/lib/kennel";

fn exec(
    config: &config::Config,
    default_dir: bool,
    as_user: Option<String>,
    json: bool,
    words: &[String],
) -> Result<i32> {
    let req = console::Request {
        line: join_words(words),
        as_user,
        json,
    };
    let dir = datadir::DataDir::new(&config.data_dir);
    if let Some((exit, output)) = console::call_daemon(&dir.control_socket(), &req)? {
        outln!("{output}");
        return Ok(exit);
    }
    // No daemon here. A command that only reads never makes a data
    // directory to answer from: with no data here, it goes to the
    // service's daemon, or says where Kennel looked.
    let parsed = kennel_core::parse(&req.line);
    let reads_only = parsed.as_ref().map_or(true, |i| i.command.reads_only());
    if reads_only && !dir.db().exists() {
        if default_dir {
            let service = datadir::DataDir::new(std::path::Path::new(SERVICE_DATA_DIR));
            if let Some((exit, output)) = console::call_daemon(&service.control_socket(), &req)? {
                eprintln!(
                    "kennel: answered by the daemon of {} (there is no Kennel data in {})",
                    service.root().display(),
                    dir.root().display()
                );
                outln!("{output}");
                return Ok(exit);
            }
        }
        let needs_no_data = match &parsed {
            Err(_) => true,
            Ok(i) => matches!(
                i.command,
                kennel_core::Command::Help { .. }
                    | kennel_core::Command::Stacks
                    | kennel_core::Command::Templates
            ),
        };
        if needs_no_data {
            let rt = tokio::runtime::Runtime::new()?;
            let executor = wiring::ephemeral_executor(config)?;
            let (exit, output) =
                rt.block_on(console::run(&executor, &req, &console::StderrProgress));
            outln!("{output}");
            return Ok(exit);
        }
        return Err(NoKennel(dir.root().to_owned()).into());
    }
    eprintln!(
        "kennel: no daemon is running for {}; running this in-process",
        dir.root().display()
    );
    // No daemon answered: run in-process, owning the data dir meanwhile.
    // If another process holds the data dir, it is a daemon starting up
    // (its socket may be stale from a crash): give it a moment.
    let _lock = match dir.lock() {
        Ok(l) => l,
        Err(e) => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if let Some((exit, output)) = console::call_daemon(&dir.control_socket(), &req)? {
                    outln!("{output}");
                    return Ok(exit);
                }
            }
            return Err(e);
        }
    };
    let store = wiring::store(&dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (executor, local) = rt.block_on(async { wiring::executor(config, store) })?;
    let (exit, output) = rt.block_on(async {
        if let Some(p) = &local {
            // In-process commands never autostart: that is the daemon's.
            wiring::reconcile(&executor, p, false).await?;
        }
        anyhow::Ok(console::run(&executor, &req, &console::StderrProgress).await)
    })?;
    outln!("{output}");
    Ok(exit)
}

fn real_main() -> Result<i32> {
    let cli = Cli::parse();
    let loaded = config::load(cli.config.as_deref(), cli.data_dir.as_deref())?;
    let config = &loaded.config;
    match cli.command {
        Cmd::Serve => {
            logging::init(&config.log, config.log_format);
            let rt = serve_runtime()?;
            rt.block_on(serve::run(config))?;
            Ok(0)
        }
        Cmd::Exec {
            as_user,
            json,
            words,
        } => {
            init_logging("warn");
            let default_dir = cli.data_dir.is_none() && loaded.data_dir_is_default();
            match exec(config, default_dir, as_user, json, &words) {
                // `--json` means JSON, a failure to reach Kennel too: the
                // same shape and exit code as any other error.
                Err(e) => {
                    let kind = if e.downcast_ref::<NoKennel>().is_some() {
                        kennel_core::outcome::ErrorKind::NotFound
                    } else {
                        kennel_core::outcome::ErrorKind::Unavailable
                    };
                    if json {
                        outln!(
                            "{}",
                            serde_json::json!({"ok": false, "error": {"kind": kind, "message": format!("{e:#}")}})
                        );
                    } else {
                        eprintln!("error: {e:#}");
                    }
                    Ok(kind.exit_code())
                }
                ok => ok,
            }
        }
        Cmd::Doctor { json } => {
            let report = doctor::run(config, &kennel_provisioner::host::Host::real());
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out(format_args!("{}", report.to_text()));
            }
            Ok(i32::from(report.failed()))
        }
        Cmd::Backup { dir } => {
            init_logging("warn");
            let data = datadir::DataDir::new(&config.data_dir);
            outln!("{}", backup::backup(&data, &dir)?);
            Ok(0)
        }
        Cmd::Restore { dir } => {
            init_logging("warn");
            let data = datadir::DataDir::new(&config.data_dir);
            outln!("{}", backup::restore(&dir, &data)?);
            Ok(0)
        }
        Cmd::Stacks(StacksCmd::Detect { path, json }) => {
            init_logging("warn");
            stacks_cmd::detect(config, &path, json)?;
            Ok(0)
        }
        Cmd::Image(cmd) => {
            init_logging("warn");
            match cmd {
                ImageCmd::Build { stack, all } => image_cmd::build(config, stack.as_deref(), all)?,
                ImageCmd::Ls { json } => image_cmd::ls(config, json)?,
                ImageCmd::Rm { id, unused } => image_cmd::rm(config, id.as_deref(), unused)?,
            }
            Ok(0)
        }
        Cmd::Config => {
            out(format_args!(
                "{}",
                config::describe(&loaded, cli.data_dir.is_some())?
            ));
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    // Several TLS stacks meet in this binary (the chat SDKs, russh's
    // neighbours): rustls then has more than one crypto provider compiled in
    // and needs to be told which one to use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match real_main() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
