//! Prometheus metrics on their own listener (`metrics.listen`, default
//! `127.0.0.1:9464`, the exporter convention), through the `metrics`
//! facade: the library crates record, this installs the exporter and
//! samples what is a state rather than an event (projects by state, the
//! store's size). docs/operations.md lists every metric.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kennel_core::model::ProjectState;
use kennel_core::store::Store;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// How often states are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Installs the exporter listening on `listen`; `None` turns metrics off.
/// An address in use is an error for the caller to report; the daemon
/// runs on without metrics.
pub fn install(listen: Option<SocketAddr>) -> Result<()> {
    let Some(addr) = listen else {
        return Ok(());
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Prefix("kennel_new_project".into()),
            &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("kennel_https_request_seconds".into()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )?
        .install()
        .with_context(|| {
            format!("cannot serve metrics on {addr}; set metrics.listen to a free address, or to \"\" to turn metrics off")
        })?;
    describe();
    tracing::info!(%addr, "metrics listening (Prometheus, /metrics)");
    Ok(())
}

fn describe() {
    describe_gauge!("kennel_projects", "Projects by state.");
    describe_gauge!(
        "kennel_store_bytes",
        Unit::Bytes,
        "Size of the store (SQLite file and its WAL)."
    );
    describe_counter!(
        "kennel_commands_total",
        "Commands run, by front end, command and outcome."
    );
    describe_histogram!(
        "kennel_new_project_seconds",
        Unit::Seconds,
        "Successful `new project` runs, from the start of the provisioner's work to ready."
    );
    describe_histogram!(
        "kennel_new_project_stage_seconds",
        Unit::Seconds,
        "Successful `new project` runs, by stage."
    );
    describe_counter!(
        "kennel_new_project_failures_total",
        "`new project` runs that failed (and were rolled back), by the stage that failed."
    );
    describe_counter!("kennel_boots_total", "VM boots, by outcome.");
    describe_counter!("kennel_boot_failures_total", "Failed VM boots, by cause.");
    describe_counter!(
        "kennel_ssh_connections_total",
        "SSH connections accepted by the gateway."
    );
    describe_counter!(
        "kennel_ssh_channels_total",
        "Channels into VMs, by kind (session, direct-tcpip, direct-streamlocal, jump, agent)."
    );
    describe_gauge!(
        "kennel_ssh_channels_open",
        "Channels into VMs open now, by kind."
    );
    describe_counter!(
        "kennel_ssh_bytes_total",
        Unit::Bytes,
        "Bytes carried between SSH clients and VMs, by direction."
    );
    describe_counter!(
        "kennel_https_connections_total",
        "HTTPS connections accepted."
    );
    describe_gauge!(
        "kennel_https_connections_open",
        "HTTPS connections open now."
    );
    describe_counter!(
        "kennel_https_requests_total",
        "HTTPS requests, by site (kennel, project, unknown) and status code."
    );
    describe_histogram!(
        "kennel_https_request_seconds",
        Unit::Seconds,
        "Time to the response head, by site."
    );
}

/// Samples projects by state and the store's size until `stop`.
pub async fn sample(store: Store, db: PathBuf, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        let counts = store
            .call(|c| {
                let mut q = c.prepare("SELECT state, COUNT(*) FROM projects GROUP BY state")?;
                let rows =
                    q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(Into::into)
            })
            .await;
        if let Ok(counts) = counts {
            for state in ProjectState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state.as_str())
                    .map_or(0, |(_, n)| *n);
                #[allow(clippy::cast_precision_loss)] // a count of projects
                metrics::gauge!("kennel_projects", "state" => state.as_str()).set(n as f64);
            }
        }
        let size: u64 = ["", "-wal"]
            .iter()
            .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
            .map(|m| m.len())
            .sum();
        #[allow(clippy::cast_precision_loss)] // bytes, as Prometheus wants them
        metrics::gauge!("kennel_store_bytes").set(size as f64);
        tokio::select! {
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
            () = &mut stop => return,
        }
    }
}
