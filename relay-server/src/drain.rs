//! Drains a session's queued deliveries to its agent over the queue stream.
//!
//! One stream per agent connection, opened by the agent right after the
//! welcome ([`hookrelay_shared::protocol`] describes the frames). Deliveries go
//! out in queue order, at most `window` of them unacknowledged; an
//! acknowledgement means the agent has them on disk, and only then are they
//! deleted here. Anything sent but unacknowledged when the link drops stays
//! queued and goes out again on the next connection; the agent recognises
//! the delivery ids it already has.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use hookrelay_shared::{
    codec::{read_frame, write_frame, CodecError},
    protocol::reset,
    DeliveryId, QueueAck, QueueOpen, QueuedDelivery, TunnelName,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    metrics::RelayMetrics,
    queue::{Queue, QueueError},
};

/// Most unacknowledged deliveries an agent may ask for.
pub const MAX_WINDOW: u32 = 1024;

/// Time the agent gets to write its opening frame on the queue stream.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Items read from the store per query.
const BATCH: usize = 64;

/// Acknowledged deliveries removed between two flushes of the queue.
const SYNC_EVERY: usize = 256;

/// Sent and not yet acknowledged, in stream order.
type InFlight = Arc<Mutex<VecDeque<(TunnelName, u64, DeliveryId)>>>;

/// Why a drain stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DrainError {
    #[error("the agent did not open the queue stream properly")]
    BadOpen,
    #[error("queue stream broken: {0}")]
    Stream(String),
    #[error("the agent acknowledged {0}, which was not in flight")]
    UnknownAck(DeliveryId),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Accepts the agent's queue stream on `connection` and drains `tunnels`
/// until the connection ends or `stop` fires.
pub(crate) async fn serve(
    connection: quinn::Connection,
    queue: Arc<dyn Queue>,
    tunnels: Vec<TunnelName>,
    stop: CancellationToken,
    metrics: Arc<RelayMetrics>,
) -> Result<(), DrainError> {
    let (send, mut recv) = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        s = connection.accept_bi() => s.map_err(|e| DrainError::Stream(e.to_string()))?,
    };
    // The agent writes its opening frame right away; one that does not may
    // not hold this task.
    let open: QueueOpen = match tokio::time::timeout(OPEN_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(Some(open))) => open,
        _ => return Err(DrainError::BadOpen),
    };
    let window = open.window.clamp(1, MAX_WINDOW);
    let in_flight: InFlight = Arc::default();
    let permits = Arc::new(Semaphore::new(window as usize));
    let acks = tokio::spawn(read_acks(
        recv,
        queue.clone(),
        in_flight.clone(),
        permits.clone(),
        metrics,
    ));
    let result = tokio::select! {
        r = send_all(send, &queue, &tunnels, &in_flight, &permits) => r,
        r = acks => match r {
            Ok(r) => r,
            Err(e) => Err(DrainError::Stream(format!("acknowledgement reader died: {e}"))),
        },
        () = stop.cancelled() => Ok(()),
    };
    let unacked = in_flight.lock().unwrap_or_else(|p| p.into_inner()).len();
    if unacked > 0 {
        debug!(
            unacked,
            "queue stream ended with deliveries unacknowledged; they stay queued"
        );
    }
    result
}

/// Sends every queued delivery of `tunnels`, then waits for more.
async fn send_all(
    mut send: quinn::SendStream,
    queue: &Arc<dyn Queue>,
    tunnels: &[TunnelName],
    in_flight: &InFlight,
    permits: &Arc<Semaphore>,
) -> Result<(), DrainError> {
    let changed = queue.changed();
    let mut cursors: HashMap<TunnelName, u64> = HashMap::new();
    let mut announced = false;
    loop {
        // Registered before looking, so a commit in between is not missed.
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let mut sent = 0usize;
        for tunnel in tunnels {
            let items = queue.after(tunnel, cursors.get(tunnel).copied(), BATCH)?;
            if !announced && !items.is_empty() {
                let waiting = queue.stats(tunnel).count;
                info!(%tunnel, waiting, "draining queued webhooks to the agent");
            }
            for item in items {
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| DrainError::Stream("closed".into()))?;
                // Returned by the acknowledgement reader.
                permit.forget();
                in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((tunnel.clone(), item.seq, item.head.delivery_id));
                cursors.insert(tunnel.clone(), item.seq);
                let frame = QueuedDelivery {
                    body_len: item.body_len,
                    head: item.head.clone(),
                };
                write_frame(&mut send, &frame).await.map_err(stream)?;
                let mut written = 0u64;
                for chunk in queue.body(&item) {
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(err) => {
                            // A promised length cannot be kept: cut the stream
                            // rather than send a short body as complete.
                            let _ = send.reset(reset::BODY_ABORTED.into());
                            return Err(err.into());
                        }
                    };
                    written += chunk.len() as u64;
                    send.write_chunk(chunk)
                        .await
                        .map_err(|e| DrainError::Stream(e.to_string()))?;
                }
                if written != item.body_len {
                    warn!(delivery_id = %item.head.delivery_id, written, expected = item.body_len, "stored body has the wrong length");
                    let _ = send.reset(reset::BODY_ABORTED.into());
                    return Err(DrainError::Stream(
                        "stored body has the wrong length".into(),
                    ));
                }
                sent += 1;
            }
        }
        if sent > 0 {
            announced = true;
            continue;
        }
        notified.await;
    }
}

/// Deletes deliveries as the agent acknowledges them and frees their window
/// slots.
async fn read_acks(
    mut recv: quinn::RecvStream,
    queue: Arc<dyn Queue>,
    in_flight: InFlight,
    permits: Arc<Semaphore>,
    metrics: Arc<RelayMetrics>,
) -> Result<(), DrainError> {
    let mut removed = 0usize;
    loop {
        let ack: QueueAck = match read_frame(&mut recv).await {
            Ok(Some(ack)) => ack,
            Ok(None) => return Ok(()),
            Err(err) => return Err(stream(err)),
        };
        loop {
            let front = in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            let Some((tunnel, seq, id)) = front else {
                return Err(DrainError::UnknownAck(ack.up_to));
            };
            // Already gone when an operator purged it meanwhile.
            if queue.remove(&tunnel, seq)? {
                metrics.queue_delivered(tunnel.as_str());
            }
            removed += 1;
            permits.add_permits(1);
            if id == ack.up_to {
                break;
            }
        }
        let idle = in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if removed >= SYNC_EVERY || (idle && removed > 0) {
            // Bounds what sled holds unflushed: without it, removing a backlog
            // as fast as the agent acknowledges took the relay from 50 MiB to
            // 68-315 MiB (13 runs of the memory benchmark); with it, flat.
            // Also once everything sent is acknowledged: the removed items'
            // body files are deleted only by a flush.
            queue.sync().await?;
            removed = 0;
        }
    }
}

fn stream(err: CodecError) -> DrainError {
    DrainError::Stream(err.to_string())
}
