//! The workers' own counters, read from their `/metrics`: what the broker and the
//! mock cannot see (deliveries requeued while held, broker sessions reopened).

use std::time::Duration;

/// `account_worker_held_requeued_total`: held deliveries put back at the tail of their queue.
pub const HELD_REQUEUED: &str = "account_worker_held_requeued_total";
/// `account_worker_broker_reconnects_total`: broker sessions lost and reopened; a
/// channel the broker closed over a consumer timeout shows here.
pub const BROKER_RECONNECTS: &str = "account_worker_broker_reconnects_total";

/// The counters the soak reports, as one worker process last showed them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub held_requeued: u64,
    pub broker_reconnects: u64,
}

/// A free port on 127.0.0.1 for a worker's `METRICS_ADDR`: fixed for the
/// worker's life (restarts included) so the soak knows where to scrape it, and
/// found free so two soaks on one machine never collide.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// Scrapes `http://127.0.0.1:<port>/metrics`; `None` when the worker does not answer.
pub async fn scrape(client: &reqwest::Client, port: u16) -> Option<Counters> {
    let text = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    Some(Counters {
        held_requeued: value(&text, HELD_REQUEUED).unwrap_or(0),
        broker_reconnects: value(&text, BROKER_RECONNECTS).unwrap_or(0),
    })
}

/// Scrapes each worker's counters, keeping the last answer of one that does not answer now.
pub async fn scrape_all(
    client: &reqwest::Client,
    ports: &[u16],
    counters: &mut [Option<Counters>],
) {
    for (port, last) in ports.iter().zip(counters.iter_mut()) {
        if let Some(now) = scrape(client, *port).await {
            *last = Some(now);
        }
    }
}

/// The workers' counters for a progress line.
pub fn shown(counters: &[Option<Counters>]) -> String {
    let each: Vec<String> = counters
        .iter()
        .map(|c| {
            c.map_or("-".to_owned(), |c| {
                format!(
                    "requeued {} reconnects {}",
                    c.held_requeued, c.broker_reconnects
                )
            })
        })
        .collect();
    format!("[{}]", each.join("; "))
}

/// The value of an unlabelled counter in Prometheus text.
fn value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        let number: f64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(number as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_exact_name() {
        let text = "# HELP x\naccount_worker_held_requeued_total 12\naccount_worker_broker_reconnects_total 0\naccount_worker_held_requeued_total_other 99\n";
        assert_eq!(value(text, HELD_REQUEUED), Some(12));
        assert_eq!(value(text, BROKER_RECONNECTS), Some(0));
        assert_eq!(value(text, "account_worker_missing_total"), None);
    }
}
