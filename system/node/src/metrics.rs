//! Prometheus metrics: the recorder is installed once per process; `/metrics` renders it.
//! Metric names are listed here so dashboards and checkers have one place to look.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const FRAMES_IN: &str = "chatstream_frames_received_total";
pub const FRAMES_OUT: &str = "chatstream_frames_sent_total";
pub const ERRORS: &str = "chatstream_errors_total";
pub const CONNECTIONS: &str = "chatstream_connections";
pub const MESSAGES_ACCEPTED: &str = "chatstream_messages_accepted_total";
pub const MESSAGES_DUPLICATE: &str = "chatstream_messages_duplicate_total";
pub const SEND_SECONDS: &str = "chatstream_send_seconds";
pub const FANOUT_PUBLISHED: &str = "chatstream_fanout_published_total";
pub const FANOUT_FAILED: &str = "chatstream_fanout_failed_total";
pub const FANOUT_DELIVERED: &str = "chatstream_fanout_delivered_total";
/// Envelopes not published, by `reason`: redis_down, queue_full, late (its append did not
/// commit in time).
pub const FANOUT_SKIPPED: &str = "chatstream_fanout_skipped_total";
/// Live frames a connection did not get because it already had a later seq of the
/// conversation (the client fills the gap with sync).
pub const FANOUT_OUT_OF_ORDER: &str = "chatstream_fanout_out_of_order_total";
/// Redis commands refused at once because the link was down.
pub const REDIS_SKIPPED: &str = "chatstream_redis_skipped_total";
/// Times the Redis link was declared down.
pub const REDIS_TRIPS: &str = "chatstream_redis_link_trips_total";
pub const SLOW_CONSUMER_DISCONNECTS: &str = "chatstream_slow_consumer_disconnects_total";
pub const WRITE_STALL_DISCONNECTS: &str = "chatstream_write_stall_disconnects_total";
pub const IDLE_DISCONNECTS: &str = "chatstream_idle_disconnects_total";
pub const RATE_LIMIT_DISCONNECTS: &str = "chatstream_rate_limit_disconnects_total";
/// Error frames not written because the connection passed its per-second cap.
pub const ERROR_FRAMES_SUPPRESSED: &str = "chatstream_error_frames_suppressed_total";
/// Events dropped before the outbox because its batch queue was full, by `reason`.
pub const EVENTS_DROPPED: &str = "chatstream_events_dropped_total";
/// Directly published events (DELIVERED) written to the outbox instead, by `reason`:
/// refused (the producer's queue was full) or unacknowledged (within the delivery timeout).
pub const DIRECT_TO_OUTBOX: &str = "chatstream_events_direct_to_outbox_total";
/// Accepted TCP sockets, by whether TCP_NODELAY is set on them (read back with getsockopt).
pub const ACCEPTED_SOCKETS: &str = "chatstream_accepted_sockets_total";
pub const OUTBOX_PUBLISHED: &str = "chatstream_outbox_published_total";
pub const OUTBOX_BACKLOG: &str = "chatstream_outbox_backlog";
pub const OUTBOX_ERRORS: &str = "chatstream_outbox_relay_errors_total";
/// Outbox rows Kafka refused for good (too large), moved to `outbox_rejected`.
pub const OUTBOX_REJECTED: &str = "chatstream_outbox_rejected_total";
pub const ASYNC_FAILED: &str = "chatstream_kafka_async_failures_total";
pub const STREAM_CHUNKS: &str = "chatstream_stream_chunks_total";
pub const STREAM_SESSIONS: &str = "chatstream_stream_sessions_total";
/// Streams this node took over from a generator that died (its lease expired).
pub const STREAM_TAKEOVERS: &str = "chatstream_stream_takeovers_total";

/// Installs the global recorder (latency histograms get explicit buckets).
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}
