//! account-worker: keeps customer accounts at email-security and hosting vendors in
//! step with CRM events delivered as jobs over RabbitMQ.
#![forbid(unsafe_code)]
#![warn(
    unreachable_pub,
    missing_debug_implementations,
    clippy::await_holding_lock
)]

pub mod batcher;
pub mod bench;
pub mod broker;
pub mod circuit;
pub mod cli;
pub mod config;
pub mod health;
pub mod job;
pub mod ledger;
pub mod limiter;
pub mod metrics;
pub mod mock_vendor;
pub mod ordering;
pub mod pipeline;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod vendor;
pub mod worker;
