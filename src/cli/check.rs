//! `account-worker check`: configuration, broker reachability and vendors, without secrets.

use crate::broker;
use crate::config::{redact_url, LedgerLocation, RateLimitScope, Settings};
use secrecy::ExposeSecret;

/// Prints what the worker would run with; fails when the broker cannot be reached.
///
/// Nothing secret is printed: URLs go through `redact_url` (a password becomes `***`)
/// and no access key, secret key, app key, application key or shared secret is shown,
/// only the vendors' base URLs, the Mimecast app id and the PNCP media type.
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
    match &settings.ledger.location {
        LedgerLocation::File(path) => println!("ledger:        file:{}", path.display()),
        LedgerLocation::Redis(url) => println!("ledger:        {}", redact_url(url)),
    }
    println!("metrics:       http://{}/metrics", settings.metrics_addr);
    let scope = match settings.rate_limit_scope {
        RateLimitScope::Process => "per process",
        RateLimitScope::Fleet => "shared by the fleet",
    };
    let rate = |limit: Option<f64>| match limit {
        Some(per_second) => format!("{per_second:.2}/s {scope}"),
        None => "none".to_owned(),
    };
    match &settings.mimecast {
        Some(m) => println!(
            "mimecast:      {} (app id {}, rate limit {})",
            redact_url(m.base_url.as_str()),
            m.app_id,
            rate(m.rate_limit.map(|r| r.per_second()))
        ),
        None => {
            println!("mimecast:      not configured (jobs fail with err_vendor_not_configured)")
        }
    }
    match &settings.pncp {
        Some(p) => println!(
            "pncp:          {} ({}, rate limit {})",
            redact_url(p.base_url.as_str()),
            p.media_type,
            rate(p.rate_limit.map(|r| r.per_second()))
        ),
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
