//! `kennel image build|ls|rm|prune`: guest kernel and stack images.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use kennel_provisioner::image::{BuildEnv, Images, Recipe};
use kennel_provisioner::kernel;
use kennel_provisioner::process::SystemRunner;
use kennel_provisioner::stacks::{Stacks, BASE};

use crate::config::Config;
use crate::datadir::DataDir;

/// Prints `[  12.3s] what: step` lines.
struct Steps {
    start: Instant,
}

impl Steps {
    fn say(&self, what: &str, step: &str) {
        eprintln!(
            "[{:>7.1}s] {what}: {step}",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Builds the kernel artefacts and the images of `stacks` (all if empty).
pub fn build(config: &Config, only: Option<&str>, all: bool) -> Result<()> {
    let dir = DataDir::new(&config.data_dir);
    dir.create()?;
    let stacks = Stacks::load(&config.images.stacks_dir);
    for (name, e) in &stacks.broken {
        eprintln!("warning: stack {name} is broken and skipped: {e}");
    }
    let base = stacks.get(BASE).with_context(|| {
        format!(
            "no usable base stack in {}",
            config.images.stacks_dir.display()
        )
    })?;
    let wanted: Vec<&kennel_provisioner::stacks::Stack> = match (only, all) {
        (Some(name), _) => vec![stacks.get(name).with_context(|| {
            format!(
                "there is no stack '{name}'; known stacks: {}",
                stacks.names().join(", ")
            )
        })?],
        (None, true) => stacks.stacks.iter().collect(),
        (None, false) => vec![base],
    };
    let recipe = Recipe::load(&config.images.recipe_dir)?;
    let images = Images::new(&dir.root().join("images"));
    let steps = Steps {
        start: Instant::now(),
    };
    let runner = SystemRunner;
    let k = kernel::ensure(images.dir(), &runner, &mut |s| steps.say("kernel", s))
        .context("building the kernel artefacts")?;
    steps.say(
        "kernel",
        &format!(
            "{} ({} modules in the initramfs)",
            k.manifest.kernel_release,
            k.manifest.modules.len()
        ),
    );
    let apt_sources = config.images.apt_sources();
    let modules = k.module_tree();
    let env = BuildEnv {
        recipe: &recipe,
        kernel: &k.manifest,
        apt_sources: &apt_sources,
        apt_cache: config.images.apt_cache.as_deref(),
        modules: modules.as_deref(),
    };
    let mut failed = Vec::new();
    for stack in wanted {
        let name = stack.name().to_owned();
        match images.ensure(&env, base, stack, &runner, &mut |s| steps.say(&name, s)) {
            Ok((info, built)) => steps.say(
                &name,
                &format!(
                    "{} {} ({} MiB{})",
                    if built { "built" } else { "up to date:" },
                    info.id,
                    info.size_bytes >> 20,
                    if built {
                        format!(", {:.1}s", info.build_seconds)
                    } else {
                        String::new()
                    }
                ),
            ),
            Err(e) => {
                eprintln!("error: {name}: {:#}", anyhow::Error::from(e));
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("images not built: {}", failed.join(", "));
    }
    Ok(())
}

/// Lists images.
pub fn ls(config: &Config, json: bool) -> Result<()> {
    let dir = DataDir::new(&config.data_dir);
    let images = Images::new(&dir.root().join("images"));
    let list = images.list();
    let refs = Images::references(&dir.root().join("vms"));
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        crate::outln!("No images yet. Build them with `kennel image build --all`.");
        return Ok(());
    }
    crate::outln!(
        "{:<8} {:<24} {:>9} {:<20} {:>7}  used by",
        "stack",
        "id",
        "size",
        "built at",
        "build"
    );
    for i in list {
        crate::outln!(
            "{:<8} {:<24} {:>6} MiB {:<20} {:>6.0}s  {}",
            i.stack,
            i.id,
            i.size_bytes >> 20,
            kennel_core::model::format_time(i.built_at),
            i.build_seconds,
            refs.get(&i.id).map_or("-".to_owned(), |v| v.join(", "))
        );
    }
    Ok(())
}

/// Removes one image, or prunes unreferenced old ones.
pub fn rm(config: &Config, id: Option<&str>, prune: bool) -> Result<()> {
    let dir = DataDir::new(&config.data_dir);
    let images = Images::new(&dir.root().join("images"));
    let vms = dir.root().join("vms");
    match (id, prune) {
        (Some(id), false) => {
            let info = images.remove(id, &vms)?;
            crate::outln!("removed {}", info.id);
        }
        (None, true) => {
            let removed = images.prune(&vms)?;
            crate::outln!(
                "removed {} image(s){}",
                removed.len(),
                removed
                    .iter()
                    .map(|i| format!(" {}", i.id))
                    .collect::<String>()
            );
        }
        _ => bail!("name one image id, or pass --unused"),
    }
    Ok(())
}
