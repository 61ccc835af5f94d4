//! `account-worker check`: configuration, broker reachability and vendors, without secrets.

use crate::broker;
use crate::config::{redact_url, Settings};
use secrecy::ExposeSecret;

/// Prints what the worker would run with; fails when the broker cannot be reached.
pub async fn run(settings: &Settings) -> Result<(), broker::BrokerError> {
    let broker_settings = &settings.broker;
    println!("configuration: ok");
    println!(
        "broker:        {}",
        redact_url(broker_settings.amqp_url.expose_secret())
    );
    println!(
        "queues:        {} -> {} / {}",
        broker_settings.jobs_queue.jobs,
        broker_settings.jobs_queue.results,
        broker_settings.jobs_queue.dead
    );
    println!("concurrency:   {}", broker_settings.concurrency);
    match &settings.mimecast {
        Some(m) => println!(
            "mimecast:      {} (app id {}, rate limit {})",
            m.base_url,
            m.app_id,
            m.rate_limit
                .map(|r| format!("{:.2}/s", r.per_second()))
                .unwrap_or_else(|| "none".to_owned())
        ),
        None => {
            println!("mimecast:      not configured (jobs fail with err_vendor_not_configured)")
        }
    }
    match &settings.pncp {
        Some(p) => println!("pncp:          {} ({})", p.base_url, p.media_type),
        None => {
            println!("pncp:          not configured (jobs fail with err_vendor_not_configured)")
        }
    }
    let connection = broker::connect(&broker_settings.amqp_url, "account-worker check").await?;
    broker::declare(&connection, &broker_settings.jobs_queue).await?;
    let _ = connection.close(200, "check done".into()).await;
    println!("broker:        reachable, queues declared");
    Ok(())
}
