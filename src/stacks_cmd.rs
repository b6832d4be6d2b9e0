//! `kennel stacks detect PATH`: what `new project` would make of a
//! directory, before anyone creates a project from it.

use std::path::Path;

use anyhow::{bail, Result};
use kennel_provisioner::devcontainer;
use kennel_provisioner::pins;
use kennel_provisioner::stacks::Stacks;
use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Serialize)]
struct Report {
    path: String,
    stack: String,
    evidence: Vec<String>,
    warnings: Vec<String>,
    scores: Vec<(String, f64)>,
    pins: Vec<pins::Pin>,
    /// Pins the stack's image does not meet.
    pin_warnings: Vec<String>,
    /// What the repository's devcontainer.json gives (or why it cannot).
    devcontainer: Vec<String>,
    app_port: u16,
    app_port_from: String,
}

/// Prints detection's choice for `path`, with its reasons.
pub fn detect(config: &Config, path: &Path, json: bool) -> Result<()> {
    if !path.is_dir() {
        bail!(
            "{} is not a directory; give the top of a repository",
            path.display()
        );
    }
    let stacks = Stacks::load(&config.images.stacks_dir);
    if stacks.stacks.is_empty() {
        bail!(
            "no stacks in {}; set images.stacks_dir to Kennel's stacks/ folder",
            config.images.stacks_dir.display()
        );
    }
    let d = stacks.detect(path);
    let file = stacks.get(&d.stack).map(|s| s.file.clone());
    let found_pins = pins::find(path);
    let pin_warnings = pins::differences(
        &found_pins,
        &d.stack,
        &file
            .as_ref()
            .map(|f| f.versions.clone())
            .unwrap_or_default(),
    );
    let dc = devcontainer::load(
        path,
        &file.as_ref().map(|f| f.env.clone()).unwrap_or_default(),
    );
    let (app_port, app_port_from) = match dc.app_port() {
        Some(p) => (
            p,
            format!(
                "{} forwardPorts",
                dc.parsed().map_or("", |d| d.file.as_str())
            ),
        ),
        None => (
            file.as_ref().map_or(8080, |f| f.app_port),
            format!("the {} stack's default", d.stack),
        ),
    };
    let report = Report {
        path: path.display().to_string(),
        stack: d.stack.clone(),
        evidence: d.evidence.clone(),
        warnings: d.warnings.clone(),
        scores: d.scores.iter().filter(|(_, s)| *s > 0.0).cloned().collect(),
        pins: found_pins,
        pin_warnings,
        devcontainer: dc.notes(&d.stack),
        app_port,
        app_port_from,
    };
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut out = format!("{}: {}\n", report.path, d.summary());
    if !report.scores.is_empty() {
        let scores: Vec<String> = report
            .scores
            .iter()
            .map(|(n, s)| format!("{n} {s}"))
            .collect();
        out.push_str(&format!("  scores: {}\n", scores.join(", ")));
    }
    for w in &report.warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    for p in &report.pins {
        out.push_str(&format!("  pin: {} {} ({})\n", p.tool, p.version, p.file));
    }
    for w in &report.pin_warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    for n in &report.devcontainer {
        out.push_str(&format!("  note: {n}\n"));
    }
    out.push_str(&format!(
        "  app port: {} ({})\n",
        report.app_port, report.app_port_from
    ));
    crate::out(format_args!("{out}"));
    Ok(())
}
