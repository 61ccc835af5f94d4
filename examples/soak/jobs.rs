//! The soak's jobs: mixed additive and idempotent items for both vendors, one fresh account per item.

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

use account_worker::mock_vendor::Vendor;

/// One item as published, with what the mock must show for it afterwards.
#[derive(Debug, Clone)]
pub struct PlannedItem {
    pub vendor: Vendor,
    /// Mimecast `accountCode` or PNCP `accountId`; unique per item, so the mock's
    /// applied count of the account is the count of this item's applications.
    pub account: String,
    /// Whether the item carries `numberOfUsers` (applied twice = a violation).
    pub additive: bool,
}

/// One job as published.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    pub id: String,
    pub body: Vec<u8>,
    pub items: Vec<PlannedItem>,
}

/// Job `n` of run `run`: half Mimecast (1–3 items, 60 % of them additive), half
/// PNCP (1–2 items, all idempotent).
pub fn plan(run: &str, n: usize, rng: &mut StdRng) -> PlannedJob {
    let id = format!("soak-{run}-{n}");
    let mimecast = rng.random_bool(0.5);
    let count = if mimecast {
        rng.random_range(1..=3)
    } else {
        rng.random_range(1..=2)
    };
    let mut items = Vec::with_capacity(count);
    let mut data = Vec::with_capacity(count);
    for i in 0..count {
        let account = format!("SOAK-{run}-{n}-{i}");
        if mimecast {
            let additive = rng.random_bool(0.6);
            let item = if additive {
                json!({"accountCode": account, "numberOfUsers": rng.random_range(1..=50), "products": [9702]})
            } else {
                json!({"accountCode": account, "accountName": format!("Soak {n}.{i}"), "products": [9702, 9703]})
            };
            data.push(item);
            items.push(PlannedItem {
                vendor: Vendor::Mimecast,
                account,
                additive,
            });
        } else {
            data.push(json!({
                "accountId": account,
                "name": format!("Soak {n}.{i}"),
                "email": format!("soak-{n}-{i}@client.example"),
                "clientAssignedId": account,
            }));
            items.push(PlannedItem {
                vendor: Vendor::Pncp,
                account,
                additive: false,
            });
        }
    }
    let vendor = if mimecast { "mimecast" } else { "pncp" };
    let job: Value = json!({"jobId": id, "vendor": vendor, "data": data});
    PlannedJob {
        id,
        body: job.to_string().into_bytes(),
        items,
    }
}
