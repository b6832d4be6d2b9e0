//! `kennel serve`: the daemon. It owns the data dir, the store's writes and
//! every part that is built, and stops gracefully on SIGTERM or SIGINT.

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::datadir::DataDir;
use crate::{console, wiring};

/// How often running projects' VMMs are checked for having died.
const VM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the idle supervisor looks (and samples guest CPU).
const IDLE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often idle times are written down for the next daemon.
const IDLE_PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Raises the soft open-file limit to the hard one. Every SSH session,
/// HTTPS connection and VM costs descriptors, and the soft limit a service
/// usually starts with (1,024 under systemd, whose hard limit is 524,288)
/// would refuse connections long before the hard one.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current == l.maximum {
        return;
    }
    let before = l.current;
    l.current = l.maximum;
    match setrlimit(Resource::Nofile, l) {
        Ok(()) => tracing::debug!(?before, now = ?l.maximum, "raised the open-file limit"),
        Err(e) => tracing::warn!(error = %e, ?before, "cannot raise the open-file limit"),
    }
}

/// Runs the daemon until a signal arrives.
pub async fn run(config: &Config) -> Result<()> {
    raise_open_file_limit();
    let dir = DataDir::new(&config.data_dir);
    let _lock = dir.lock()?;
    let store = wiring::store(&dir)?;
    // Metrics first, so that start-up (reconcile) is counted too.
    let metrics_addr = config.metrics.addr()?;
    if let Err(e) = crate::metrics::install(metrics_addr) {
        tracing::warn!(error = format!("{e:#}"), "running without metrics");
    }
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = tokio::spawn(crate::metrics::sample(
        store.clone(),
        dir.db(),
        async move {
            let _ = metrics_stopped.await;
        },
    ));
    let (exec, local) = wiring::executor(config, store)?;
    match &local {
        Some(p) => {
            // VMs adopted below are guarded from now on too (new ones
            // load the guard before they boot).
            let has_vms =
                std::fs::read_dir(dir.root().join("vms")).is_ok_and(|mut d| d.next().is_some());
            if let (true, wiring::Backend::Local(local)) = (has_vms, p) {
                local.guard_host().await;
            }
            wiring::reconcile(&exec, p, config.vm.autostart).await?;
            tracing::info!(backend = %p.describe(), "provisioner ready");
        }
        None => tracing::warn!("VMs are not available on this host; see `kennel doctor`"),
    }
    // The SSH gateway.
    let key = wiring::ssh_host_key(config)?;
    let listener = tokio::net::TcpListener::bind(config.ssh.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for SSH on {}: {e}; set ssh.listen to a free address",
                config.ssh.listen
            )
        })?;
    let ssh_addr = listener.local_addr()?;
    let gateway = kennel_gateway::ssh::SshGateway::new(exec.gate(), wiring::ssh_settings(config));
    let links = gateway.links();
    // `run` reaches VMs through the same connections.
    exec.set_guest_shell(links.clone());
    match kennel_gateway::dns::HickoryDns::new(config.https.resolver) {
        Ok(dns) => exec.set_dns(std::sync::Arc::new(dns)),
        Err(e) => tracing::warn!(error = %e, "no DNS resolver: custom domains cannot be checked"),
    }
    let (stop_ssh, ssh_stopped) = tokio::sync::oneshot::channel::<()>();
    let ssh_task = tokio::spawn(gateway.run(listener, key, async move {
        let _ = ssh_stopped.await;
    }));
    tracing::info!(addr = %ssh_addr, "SSH gateway listening");
    // The HTTPS gateway.
    let tls = kennel_gateway::https::tls::server_config(&wiring::tls_source(config, &dir))
        .map_err(|e| anyhow::anyhow!("cannot set up HTTPS: {e}"))?;
    let https_listener = tokio::net::TcpListener::bind(config.https.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for HTTPS on {}: {e}; set https.listen to a free address",
                config.https.listen
            )
        })?;
    let https_addr = https_listener.local_addr()?;
    // One connection per VM for both gateways.
    let https = kennel_gateway::https::HttpsGateway::with_links(
        &exec.gate(),
        kennel_gateway::https::HttpsSettings {
            trusted_proxies: config.https.trusted_proxies.clone(),
            wake_wait: std::time::Duration::from_secs(config.https.wake_wait_secs),
            app_start_wait: std::time::Duration::from_secs(config.https.app_start_wait_secs),
            ..Default::default()
        },
        links,
    );
    let (stop_https, https_stopped) = tokio::sync::oneshot::channel::<()>();
    let https_task = tokio::spawn(https.run(https_listener, tls, async move {
        let _ = https_stopped.await;
    }));
    tracing::info!(addr = %https_addr, domain = %config.https.domain, "HTTPS gateway listening");
    // The metadata service (the LLM gateway, /kennel/v1): a link into each
    // running VM that carries its guest's connections back here, and a
    // socket per project.
    let meta =
        kennel_gateway::meta::MetaService::new(exec.gate(), wiring::meta_settings(config, &dir)?)
            .map_err(|e| anyhow::anyhow!("cannot set up the metadata service: {e}"))?;
    let (stop_meta, meta_stopped) = tokio::sync::oneshot::channel::<()>();
    let meta_links = kennel_gateway::vmlink::VmLinks::new(exec.gate());
    let meta_task = tokio::spawn(meta.run(Some(meta_links), async move {
        let _ = meta_stopped.await;
    }));
    // VMs that die under a running project (a killed VMM, a guest panic)
    // are noticed within a few seconds and shown stopped, saying why.
    let (stop_watch, watch_stopped) = tokio::sync::oneshot::channel::<()>();
    let watch_task = {
        let exec = exec.clone();
        tokio::spawn(async move {
            exec.watch_vms(VM_CHECK_EVERY, async move {
                let _ = watch_stopped.await;
            })
            .await;
        })
    };
    // On Incus, its event stream keeps Kennel's picture of which
    // instances run, so the watcher above asks Incus nothing per project.
    let (stop_events, events_stopped) = tokio::sync::oneshot::channel::<()>();
    let events_task = match &local {
        Some(wiring::Backend::Incus(p)) => {
            let p = p.clone();
            Some(tokio::spawn(async move {
                p.watch_events(async move {
                    let _ = events_stopped.await;
                })
                .await;
            }))
        }
        _ => None,
    };
    // Egress policies reach the provisioner (VMs found running keep
    // theirs), and closed projects' asks reach their owners.
    let egress_task = {
        let exec = exec.clone();
        tokio::spawn(async move { exec.watch_egress().await })
    };
    // VMs nobody uses are stopped (vm.idle_stop); their idle times are
    // written down for the next daemon, last when this one stops.
    let (stop_idle, idle_stopped) = tokio::sync::oneshot::channel::<()>();
    let idle_task = {
        let exec = exec.clone();
        tokio::spawn(async move {
            exec.watch_idle(IDLE_CHECK_EVERY, IDLE_PERSIST_EVERY, async move {
                let _ = idle_stopped.await;
            })
            .await;
        })
    };
    // The chat bots: each in its own task, stopped with the daemon.
    let (stop_bots, bots_stopped) = tokio::sync::watch::channel(false);
    let bots = crate::bots::start(config, &exec, dir.root(), &bots_stopped);
    let socket = dir.control_socket();
    tracing::info!(data_dir = %dir.root().display(), socket = %socket.display(), ssh = %ssh_addr, https = %https_addr, "kennel serve ready");
    crate::logging::tell(format_args!(
        "kennel serve: data in {}, control socket {}, SSH on {ssh_addr}, HTTPS on {https_addr} (https://{})",
        dir.root().display(),
        socket.display(),
        config.https.domain
    ));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = console::serve(exec, &socket) => r,
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
    };
    let _ = stop_ssh.send(());
    let _ = stop_https.send(());
    let _ = https_task.await;
    let _ = stop_meta.send(());
    let _ = meta_task.await;
    let _ = stop_bots.send(true);
    let _ = stop_watch.send(());
    let _ = watch_task.await;
    let _ = stop_events.send(());
    if let Some(t) = events_task {
        let _ = t.await;
    }
    let _ = stop_idle.send(());
    let _ = idle_task.await;
    egress_task.abort();
    let _ = ssh_task.await;
    for bot in bots {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), bot).await;
    }
    let _ = stop_metrics.send(());
    let _ = metrics_task.await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("kennel serve stopped");
    crate::logging::tell(format_args!("kennel serve: stopped"));
    result
}
