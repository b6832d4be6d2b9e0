//! The HTTPS gateway alone, for `bench/https.sh`: one public project
//! `app` whose app is at BACKEND, on DOMAIN, listening on PORT, with the
//! development CA in DIR. Runs until killed.
//!
//!     https_bench BACKEND PORT DOMAIN DIR

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use kennel_core::testing::World;
use kennel_core::Settings;
use kennel_gateway::https::{tls, HttpsGateway, HttpsSettings};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The daemon's heap tidy before each sleep, so that its cost is measured.
#[path = "../../src/tidy.rs"]
mod tidy;

// One worker thread, as nginx runs one worker process here: both are pinned
// to one CPU.
fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(tidy::before_sleep)
        .build()
        .unwrap()
        .block_on(serve());
}

async fn serve() {
    let a: Vec<String> = std::env::args().collect();
    let (backend, port, domain, dir) = (&a[1], a[2].parse::<u16>().unwrap(), &a[3], &a[4]);
    let w = World::new()
        .settings(Settings {
            domain: domain.clone(),
            https_port: port,
            ..Settings::default()
        })
        .build();
    *w.vms.app_addr.lock().unwrap() = Some(backend.clone());
    w.run(&w.admin, "new project app --stack rust")
        .await
        .unwrap();
    w.run(&w.admin, "public app").await.unwrap();
    let config = tls::server_config(&tls::TlsSource::DevCa {
        dir: dir.into(),
        domain: domain.clone(),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    println!("ready");
    HttpsGateway::new(&w.exec.gate(), HttpsSettings::default())
        .run(listener, config, std::future::pending())
        .await
        .unwrap();
}
