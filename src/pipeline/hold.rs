//! Deliveries whose job waits without calling the vendor: its vendor is held
//! (the circuit is open) or another copy of the job is running.
//!
//! Such a delivery stays unacked while it waits. RabbitMQ closes the whole
//! channel, every job in flight on it for either vendor, once a delivery has
//! been unacked longer than its `consumer_timeout`; and every waiting delivery
//! takes a place in the prefetch, so a queue full of one held vendor's jobs
//! would keep the other vendor's jobs behind them from ever being delivered.
//! So a waiting delivery goes back to the tail of its queue:
//! - at the latest `HELD_DELIVERY_MAX` after it was received;
//! - at once when its vendor already has `room` deliveries waiting (enough to
//!   probe the vendor and resume at full speed when it answers), paced so that a
//!   queue holding nothing but waiting jobs is not cycled at broker speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::job::VendorKind;

/// How long one delivery may wait without calling, and the signal that a later
/// job of its account waits behind it (then a waiting job goes back at once,
/// its followers after it, so one held account cannot fill the prefetch).
#[derive(Debug, Clone)]
pub struct DeliveryHold {
    /// Arrival plus `HELD_DELIVERY_MAX`.
    pub until: Instant,
    /// Notified when a later job of one of its accounts is in line behind it.
    pub followed: Arc<Notify>,
}

#[cfg(test)]
impl DeliveryHold {
    /// A hold ending at `until` that nothing follows.
    fn until(until: Instant) -> Self {
        Self {
            until,
            followed: Arc::new(Notify::new()),
        }
    }
}

/// The deliveries waiting now, per vendor, and the pace of requeues.
#[derive(Debug)]
pub(crate) struct Holds {
    waiting: [AtomicUsize; 2],
    room: usize,
    pacer: Mutex<Pacer>,
}

/// A token bucket for requeues beyond the room: a burst of a prefetch's worth,
/// refilled by time and by every job that finishes (finished jobs mean the
/// queue has work behind the waiting ones, worth reaching quickly).
#[derive(Debug)]
struct Pacer {
    tokens: f64,
    burst: f64,
    per_second: f64,
    at: Instant,
}

impl Pacer {
    /// Takes a turn now, or says how long until one is due.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        Some(Duration::from_secs_f64(
            (1.0 - self.tokens) / self.per_second,
        ))
    }

    fn credit(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }
}

/// One delivery waiting; leaves the count when dropped.
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    holds: &'a Holds,
    vendor: usize,
    /// Counted in the vendor's room: waits until the deadline, or until a
    /// later job of its account waits behind it.
    kept: bool,
    deadline: Instant,
    followed: Arc<Notify>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.kept {
            self.holds.waiting[self.vendor].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn index(vendor: VendorKind) -> usize {
    match vendor {
        VendorKind::Mimecast => 0,
        VendorKind::Pncp => 1,
    }
}

impl Holds {
    /// Room for `room` waiting deliveries per vendor; requeues beyond it at
    /// `per_second` (with a burst of as many), plus one per finished job.
    pub(crate) fn new(room: usize, per_second: usize) -> Self {
        let per_second = per_second.max(1) as f64;
        Self {
            waiting: [AtomicUsize::new(0), AtomicUsize::new(0)],
            room: room.max(1),
            pacer: Mutex::new(Pacer {
                tokens: per_second,
                burst: per_second,
                per_second,
                at: Instant::now(),
            }),
        }
    }

    /// A delivery of `vendor`'s job starts waiting; it must go back to the
    /// queue by `deadline` at the latest.
    pub(crate) fn enter(&self, vendor: VendorKind, hold: &DeliveryHold) -> Waiting<'_> {
        let vendor = index(vendor);
        let kept = self.waiting[vendor]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.room).then_some(n + 1)
            })
            .is_ok();
        Waiting {
            holds: self,
            vendor,
            kept,
            deadline: hold.until,
            followed: hold.followed.clone(),
        }
    }

    /// A job finished: the queue has work worth reaching.
    pub(crate) fn credit(&self) {
        self.pacer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .credit();
    }

    /// Waits for a turn to put a delivery back in the queue, so that a queue of
    /// nothing but deliveries going back is not cycled at broker speed.
    pub(crate) async fn paced(&self) {
        while let Some(wait) = self.take_turn() {
            tokio::time::sleep(wait).await;
        }
    }

    fn take_turn(&self) -> Option<Duration> {
        self.pacer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(Instant::now())
    }
}

impl Waiting<'_> {
    /// Resolves when the delivery should go back to the tail of its queue.
    async fn requeue_due(&self) {
        if self.kept {
            return tokio::select! {
                _ = tokio::time::sleep_until(self.deadline) => {}
                _ = self.followed.notified() => {}
            };
        }
        while let Some(wait) = self.holds.take_turn() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tokio::time::sleep_until(self.deadline) => return,
            }
        }
    }
}

/// Resolves when `waiting` is due to go back to the queue; never for `None`
/// (the job is not waiting).
pub(crate) async fn requeue_due(waiting: Option<&Waiting<'_>>) {
    match waiting {
        Some(waiting) => waiting.requeue_due().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deliveries_within_the_room_wait_until_their_deadline() {
        let holds = Holds::new(2, 10);
        let deadline = DeliveryHold::until(Instant::now() + Duration::from_secs(600));
        let first = holds.enter(VendorKind::Mimecast, &deadline);
        let _second = holds.enter(VendorKind::Mimecast, &deadline);
        let started = Instant::now();
        requeue_due(Some(&first)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_room_deliveries_go_back_at_once_but_paced() {
        let holds = Holds::new(1, 4);
        let deadline = DeliveryHold::until(Instant::now() + Duration::from_secs(600));
        let _kept = holds.enter(VendorKind::Mimecast, &deadline);
        // The other vendor has its own room.
        let other = holds.enter(VendorKind::Pncp, &deadline);
        assert!(other.kept);
        let started = Instant::now();
        for _ in 0..4 {
            requeue_due(Some(&holds.enter(VendorKind::Mimecast, &deadline))).await;
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "a burst goes at once");
        for _ in 0..8 {
            requeue_due(Some(&holds.enter(VendorKind::Mimecast, &deadline))).await;
        }
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "then at most 4 a second: {:?}",
            started.elapsed()
        );
        holds.credit();
        let before = Instant::now();
        requeue_due(Some(&holds.enter(VendorKind::Mimecast, &deadline))).await;
        assert_eq!(
            before.elapsed(),
            Duration::ZERO,
            "a finished job earns a turn"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_in_the_room_is_freed_when_its_delivery_stops_waiting() {
        let holds = Holds::new(1, 1);
        let deadline = DeliveryHold::until(Instant::now() + Duration::from_secs(600));
        drop(holds.enter(VendorKind::Mimecast, &deadline));
        assert!(holds.enter(VendorKind::Mimecast, &deadline).kept);
    }
}
