//! Every metric tapstream exports, defined in one place.
//!
//! Names follow Prometheus practice: `tapstream_<what>_<unit>_total` for counters, base units
//! (bytes, seconds), and bounded labels only (`queue`, `cause`, `result`, `reason`; never a
//! capture id). Stages emit through the `metrics` facade once per batch, not per frame, using
//! handles created when the stage starts, which also makes every series exist at zero from the
//! start.

use metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

use capture_common::XdpCounters;

/// Frames the XDP program saw, by outcome (`result`: redirected, redirect_error, passed,
/// dropped, meta_error) and RX queue.
pub const XDP_FRAMES: &str = "tapstream_xdp_frames_total";
/// Frames the XDP program saw, per RX queue.
pub const XDP_SEEN: &str = "tapstream_xdp_seen_frames_total";
/// Frames a capture wanted (a filter matched), per RX queue.
pub const XDP_MATCHED: &str = "tapstream_xdp_matched_frames_total";
/// Frames cut to fit a UMEM frame, per RX queue.
pub const XDP_TRUNCATED: &str = "tapstream_xdp_truncated_frames_total";
/// Frames the AF_XDP socket lost, by `cause` (rx_dropped, rx_ring_full, fill_ring_empty,
/// invalid_descs), per RX queue.
pub const XSK_DROPS: &str = "tapstream_xsk_dropped_frames_total";
/// Frames the writer took off the RX ring, per queue.
pub const WRITER_FRAMES: &str = "tapstream_writer_frames_total";
/// Bytes of the frames the writer took off the RX ring, per queue.
pub const WRITER_BYTES: &str = "tapstream_writer_bytes_total";
/// Records appended to capture chunks (a frame wanted by two captures counts twice).
pub const WRITER_RECORDS: &str = "tapstream_writer_records_total";
/// Frames a writer could not store for a capture, by `cause` (chunk_queue_full,
/// no_chunk_buffer), per queue.
pub const WRITER_DROPS: &str = "tapstream_writer_dropped_frames_total";
/// Chunks handed to the next stage, per queue.
pub const CHUNKS: &str = "tapstream_chunks_total";
/// Chunk buffers in use (queued or open), out of the pool.
pub const CHUNK_BUFFERS_IN_USE: &str = "tapstream_chunk_buffers_in_use";
/// Chunks waiting in the queue to the next stage.
pub const CHUNK_QUEUE_DEPTH: &str = "tapstream_chunk_queue_depth";

/// Bytes of objects sent to the store (parts and single PUTs, indexes excluded).
pub const UPLOAD_BYTES: &str = "tapstream_upload_bytes_total";
/// Parts uploaded.
pub const UPLOAD_PARTS: &str = "tapstream_upload_parts_total";
/// Time to upload one part, retries included.
pub const UPLOAD_PART_SECONDS: &str = "tapstream_upload_part_duration_seconds";
/// Parts uploading now.
pub const UPLOAD_PARTS_IN_FLIGHT: &str = "tapstream_upload_parts_in_flight";
/// Store requests waiting for a connection of the pool (`store.max_connections`).
pub const UPLOAD_CONNECTIONS_WAITING: &str = "tapstream_upload_connections_waiting";
/// Store requests retried after a retryable error, by `operation`.
pub const UPLOAD_RETRIES: &str = "tapstream_upload_retries_total";
/// Store requests that failed for good, by `retryable` (true: the outage lasted too long).
pub const UPLOAD_ERRORS: &str = "tapstream_upload_errors_total";
/// Objects completed.
pub const OBJECTS: &str = "tapstream_objects_total";
/// Chunks waiting in spools now.
pub const SPOOL_CHUNKS: &str = "tapstream_spool_chunks";
/// Bytes of the chunks waiting in spools now.
pub const SPOOL_BYTES: &str = "tapstream_spool_bytes";
/// Spools moved to the quarantine because they can never be uploaded.
pub const SPOOL_QUARANTINED: &str = "tapstream_spool_quarantined_total";
/// Uploads of capture files to CloudShark, by `result` (ok, failed; each attempt counts).
pub const CLOUDSHARK_UPLOADS: &str = "tapstream_cloudshark_uploads_total";
/// Bytes of capture files CloudShark answered for (taken or refused).
pub const CLOUDSHARK_BYTES: &str = "tapstream_cloudshark_bytes_total";
/// Capture files waiting in the CloudShark spool now.
pub const CLOUDSHARK_SPOOLED: &str = "tapstream_cloudshark_spooled_files";
/// Chunk bytes into compression, and compressed bytes out.
pub const COMPRESS_INPUT_BYTES: &str = "tapstream_compress_input_bytes_total";
pub const COMPRESS_OUTPUT_BYTES: &str = "tapstream_compress_output_bytes_total";
/// Time to compress one chunk.
pub const COMPRESS_SECONDS: &str = "tapstream_compress_chunk_duration_seconds";
/// The zstd level of the chunk compressed last (with `compression = "auto"` it follows the
/// backlog).
pub const COMPRESS_LEVEL: &str = "tapstream_compress_level";
/// Captures running now.
pub const CAPTURES_ACTIVE: &str = "tapstream_captures_active";
/// Captures ended, by `reason` (duration, packets, bytes, idle, stopped, error, interrupted).
pub const CAPTURES_ENDED: &str = "tapstream_captures_ended_total";

/// Fleet requests read from the broker (every message, whatever became of it).
/// Frames put in an interface's lookback history.
pub const LOOKBACK_RECORDED: &str = "tapstream_lookback_recorded_frames_total";
/// Frames the lookback recording dropped (its own drops, never a capture's).
pub const LOOKBACK_DROPPED: &str = "tapstream_lookback_dropped_frames_total";
/// Frames evicted from the lookback history (the oldest, beyond the memory budget).
pub const LOOKBACK_EVICTED: &str = "tapstream_lookback_evicted_frames_total";
/// Bytes the lookback history holds.
pub const LOOKBACK_BYTES: &str = "tapstream_lookback_bytes";
/// Bytes the lookback history holds in its directory.
pub const LOOKBACK_DISK_BYTES: &str = "tapstream_lookback_disk_bytes";
/// Chunks the lookback history holds.
pub const LOOKBACK_CHUNKS: &str = "tapstream_lookback_chunks";
/// Seconds between the oldest and the newest frame of the lookback history.
pub const LOOKBACK_HORIZON: &str = "tapstream_lookback_horizon_seconds";
pub const FLEET_REQUESTS_RECEIVED: &str = "tapstream_fleet_requests_received_total";
/// Fleet requests handled, by `outcome`: accepted, refused, ignored (not for this node),
/// duplicate (seen before: nothing new started).
pub const FLEET_REQUESTS: &str = "tapstream_fleet_requests_total";
/// Fleet requests refused, by `code` (expired, over_cap, bad_filter, bad_request,
/// not_allowed, unavailable).
pub const FLEET_REFUSED: &str = "tapstream_fleet_requests_refused_total";
/// Fleet events added to the broker's events stream.
pub const FLEET_EVENTS_PUBLISHED: &str = "tapstream_fleet_events_published_total";
/// Attempts to add an event that failed (the event is kept and sent again).
pub const FLEET_EVENTS_FAILED: &str = "tapstream_fleet_events_failed_total";
/// Events dropped unsent because too many waited while the broker was unreachable.
pub const FLEET_EVENTS_DROPPED: &str = "tapstream_fleet_events_dropped_total";
/// 1 while the fleet's broker is reachable, else 0, by `transport` (redis, nats).
pub const FLEET_BROKER_CONNECTED: &str = "tapstream_fleet_broker_connected";

/// Lines written to the audit log, by `decision` (allowed, refused).
pub const AUDIT_LINES: &str = "tapstream_audit_lines_total";
/// Audit lines that could not be written or synced to disk (the request was answered all
/// the same): alert on any.
pub const AUDIT_ERRORS: &str = "tapstream_audit_write_errors_total";

/// The `outcome` labels of [`FLEET_REQUESTS`].
pub const FLEET_OUTCOMES: [&str; 4] = ["accepted", "refused", "ignored", "duplicate"];

/// Registers the fleet's series at zero (when a broker is configured), the counters once
/// however many transports start (a second must not reset what the first counted), the gauge
/// of `transport`; `codes` are the `code` labels of refusals.
pub fn register_fleet(codes: impl IntoIterator<Item = &'static str>, transport: &'static str) {
    gauge!(FLEET_BROKER_CONNECTED, "transport" => transport).set(0.0);
    static COUNTERS: std::sync::Once = std::sync::Once::new();
    let mut codes = Some(codes);
    COUNTERS.call_once(|| register_fleet_counters(codes.take().expect("once")));
}

fn register_fleet_counters(codes: impl IntoIterator<Item = &'static str>) {
    describe_counter!(FLEET_REQUESTS_RECEIVED, Unit::Count, "Fleet requests read from the broker");
    describe_counter!(FLEET_REQUESTS, Unit::Count, "Fleet requests handled, by outcome");
    describe_counter!(FLEET_REFUSED, Unit::Count, "Fleet requests refused, by code");
    describe_counter!(FLEET_EVENTS_PUBLISHED, Unit::Count, "Fleet events added to the events stream");
    describe_counter!(FLEET_EVENTS_FAILED, Unit::Count, "Attempts to add a fleet event that failed");
    describe_counter!(FLEET_EVENTS_DROPPED, Unit::Count, "Fleet events dropped unsent");
    describe_gauge!(FLEET_BROKER_CONNECTED, Unit::Count, "Whether the fleet's broker is reachable");
    for name in [FLEET_REQUESTS_RECEIVED, FLEET_EVENTS_PUBLISHED, FLEET_EVENTS_FAILED, FLEET_EVENTS_DROPPED] {
        counter!(name).absolute(0);
    }
    for outcome in FLEET_OUTCOMES {
        counter!(FLEET_REQUESTS, "outcome" => outcome).absolute(0);
    }
    for code in codes {
        counter!(FLEET_REFUSED, "code" => code).absolute(0);
    }
}

/// Operations that are retried, for the `operation` label.
pub const OPERATIONS: [&str; 4] =
    ["PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"];

/// The `cause` labels of the AF_XDP sockets' drops, in the order [`QueueKernelMetrics::set_xsk`]
/// takes them.
pub const SOCKET_DROP_CAUSES: [&str; 4] = ["rx_dropped", "rx_ring_full", "fill_ring_empty", "invalid_descs"];

/// Registers every series that has no per-queue handle at zero, so dashboards and alerts see
/// them from the start; `stop_reasons` are the `reason` labels of ended captures.
pub fn register_all(stop_reasons: impl IntoIterator<Item = &'static str>) {
    describe();
    for name in
        [UPLOAD_BYTES, UPLOAD_PARTS, OBJECTS, COMPRESS_INPUT_BYTES, COMPRESS_OUTPUT_BYTES, SPOOL_QUARANTINED]
    {
        counter!(name).absolute(0);
    }
    metrics::histogram!(COMPRESS_SECONDS).record(0.0);
    metrics::gauge!(COMPRESS_LEVEL).set(0.0);
    for op in OPERATIONS {
        counter!(UPLOAD_RETRIES, "operation" => op).absolute(0);
    }
    for r in ["true", "false"] {
        counter!(UPLOAD_ERRORS, "retryable" => r).absolute(0);
    }
    for result in ["ok", "failed"] {
        counter!(CLOUDSHARK_UPLOADS, "result" => result).absolute(0);
    }
    counter!(CLOUDSHARK_BYTES).absolute(0);
    gauge!(CLOUDSHARK_SPOOLED).set(0.0);
    for reason in stop_reasons {
        counter!(CAPTURES_ENDED, "reason" => reason).absolute(0);
    }
    for decision in ["allowed", "refused"] {
        counter!(AUDIT_LINES, "decision" => decision).absolute(0);
    }
    counter!(AUDIT_ERRORS).absolute(0);
    gauge!(UPLOAD_PARTS_IN_FLIGHT).set(0.0);
    gauge!(UPLOAD_CONNECTIONS_WAITING).set(0.0);
    gauge!(SPOOL_CHUNKS).set(0.0);
    gauge!(SPOOL_BYTES).set(0.0);
    gauge!(CAPTURES_ACTIVE).set(0.0);
    metrics::histogram!(UPLOAD_PART_SECONDS).record(0.0);
}

/// Registers descriptions of every metric.
pub fn describe() {
    describe_counter!(UPLOAD_BYTES, Unit::Bytes, "Bytes of objects sent to the store");
    describe_counter!(UPLOAD_PARTS, Unit::Count, "Multipart parts uploaded");
    describe_histogram!(UPLOAD_PART_SECONDS, Unit::Seconds, "Time to upload one part, retries included");
    describe_gauge!(UPLOAD_PARTS_IN_FLIGHT, Unit::Count, "Parts uploading now");
    describe_gauge!(
        UPLOAD_CONNECTIONS_WAITING,
        Unit::Count,
        "Store requests waiting for a pooled connection"
    );
    describe_counter!(UPLOAD_RETRIES, Unit::Count, "Store requests retried, by operation");
    describe_counter!(UPLOAD_ERRORS, Unit::Count, "Store requests failed for good");
    describe_counter!(OBJECTS, Unit::Count, "Objects completed");
    describe_gauge!(SPOOL_CHUNKS, Unit::Count, "Chunks waiting in spools");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes of the chunks waiting in spools");
    describe_counter!(SPOOL_QUARANTINED, Unit::Count, "Spools quarantined: they can never be uploaded");
    describe_counter!(CLOUDSHARK_UPLOADS, Unit::Count, "Uploads of capture files to CloudShark, by result");
    describe_counter!(CLOUDSHARK_BYTES, Unit::Bytes, "Bytes of capture files sent to CloudShark");
    describe_gauge!(CLOUDSHARK_SPOOLED, Unit::Count, "Capture files waiting in the CloudShark spool");
    describe_counter!(COMPRESS_INPUT_BYTES, Unit::Bytes, "Chunk bytes compressed");
    describe_counter!(COMPRESS_OUTPUT_BYTES, Unit::Bytes, "Compressed bytes produced");
    describe_histogram!(COMPRESS_SECONDS, Unit::Seconds, "Time to compress one chunk");
    describe_gauge!(COMPRESS_LEVEL, Unit::Count, "zstd level of the chunk compressed last");
    describe_gauge!(CAPTURES_ACTIVE, Unit::Count, "Captures running");
    describe_counter!(CAPTURES_ENDED, Unit::Count, "Captures ended, by reason");
    describe_counter!(AUDIT_LINES, Unit::Count, "Lines written to the audit log, by decision");
    describe_counter!(AUDIT_ERRORS, Unit::Count, "Audit lines that could not be written or synced");
    describe_counter!(XDP_FRAMES, Unit::Count, "Frames the XDP program handled, by result");
    describe_counter!(XDP_SEEN, Unit::Count, "Frames the XDP program saw");
    describe_counter!(XDP_MATCHED, Unit::Count, "Frames at least one capture wanted");
    describe_counter!(XDP_TRUNCATED, Unit::Count, "Frames cut to fit a UMEM frame");
    describe_counter!(XSK_DROPS, Unit::Count, "Frames the AF_XDP socket lost, by cause");
    describe_counter!(WRITER_FRAMES, Unit::Count, "Frames taken off the RX ring");
    describe_counter!(WRITER_BYTES, Unit::Bytes, "Bytes of frames taken off the RX ring");
    describe_counter!(WRITER_RECORDS, Unit::Count, "PCAP records appended to capture chunks");
    describe_counter!(WRITER_DROPS, Unit::Count, "Frames a writer could not store, by cause");
    describe_counter!(CHUNKS, Unit::Count, "Chunks handed to the next stage");
    describe_gauge!(CHUNK_BUFFERS_IN_USE, Unit::Count, "Chunk buffers in use");
    describe_gauge!(CHUNK_QUEUE_DEPTH, Unit::Count, "Chunks queued for the next stage");
    describe_counter!(LOOKBACK_RECORDED, Unit::Count, "Frames put in the lookback history");
    describe_counter!(LOOKBACK_DROPPED, Unit::Count, "Frames the lookback recording dropped");
    describe_counter!(LOOKBACK_EVICTED, Unit::Count, "Frames evicted from the lookback history");
    describe_gauge!(LOOKBACK_BYTES, Unit::Bytes, "Bytes the lookback history holds");
    describe_gauge!(LOOKBACK_DISK_BYTES, Unit::Bytes, "Bytes the lookback history holds in its directory");
    describe_gauge!(LOOKBACK_CHUNKS, Unit::Count, "Chunks the lookback history holds");
    describe_gauge!(LOOKBACK_HORIZON, Unit::Seconds, "Age span of the lookback history");
}

/// Handles for one interface's lookback history.
pub struct LookbackMetrics {
    /// Frames recorded.
    pub recorded: Counter,
    /// Frames the recording dropped.
    pub dropped: Counter,
    /// Frames evicted.
    pub evicted: Counter,
    /// Bytes held.
    pub bytes: Gauge,
    /// Bytes held in the directory.
    pub disk_bytes: Gauge,
    /// Chunks held.
    pub chunks: Gauge,
    /// Oldest to newest frame held, in seconds.
    pub horizon: Gauge,
}

impl LookbackMetrics {
    /// Creates (at zero) the series of `interface`.
    pub fn new(interface: &str) -> Self {
        let i = interface.to_owned();
        Self {
            recorded: counter!(LOOKBACK_RECORDED, "interface" => i.clone()),
            dropped: counter!(LOOKBACK_DROPPED, "interface" => i.clone()),
            evicted: counter!(LOOKBACK_EVICTED, "interface" => i.clone()),
            bytes: gauge!(LOOKBACK_BYTES, "interface" => i.clone()),
            disk_bytes: gauge!(LOOKBACK_DISK_BYTES, "interface" => i.clone()),
            chunks: gauge!(LOOKBACK_CHUNKS, "interface" => i.clone()),
            horizon: gauge!(LOOKBACK_HORIZON, "interface" => i),
        }
    }
}

/// Handles for one RX queue's XDP and socket counters, set from absolute kernel values.
pub struct QueueKernelMetrics {
    seen: Counter,
    matched: Counter,
    truncated: Counter,
    results: [Counter; 5],
    xsk: [Counter; 4],
}

impl QueueKernelMetrics {
    /// Creates (at zero) the series of `queue`.
    pub fn new(queue: u32) -> Self {
        let q = queue.to_string();
        let result = |r: &'static str| counter!(XDP_FRAMES, "queue" => q.clone(), "result" => r);
        let cause = |c: &'static str| counter!(XSK_DROPS, "queue" => q.clone(), "cause" => c);
        Self {
            seen: counter!(XDP_SEEN, "queue" => q.clone()),
            matched: counter!(XDP_MATCHED, "queue" => q.clone()),
            truncated: counter!(XDP_TRUNCATED, "queue" => q.clone()),
            results: [
                result("redirected"),
                result("redirect_error"),
                result("passed"),
                result("dropped"),
                result("meta_error"),
            ],
            xsk: SOCKET_DROP_CAUSES.map(cause),
        }
    }

    /// Publishes the XDP program's counters of this queue.
    pub fn set_xdp(&self, c: &XdpCounters) {
        self.seen.absolute(c.seen);
        self.matched.absolute(c.matched);
        self.truncated.absolute(c.truncated);
        for (counter, value) in
            self.results.iter().zip([c.redirected, c.redirect_errors, c.passed, c.dropped, c.meta_errors])
        {
            counter.absolute(value);
        }
    }

    /// Publishes the socket's drop counters, in the order of [`SOCKET_DROP_CAUSES`].
    pub fn set_xsk(&self, drops: [u64; 4]) {
        for (counter, value) in self.xsk.iter().zip(drops) {
            counter.absolute(value);
        }
    }
}

/// Handles for one writer.
pub struct WriterMetrics {
    /// Frames off the ring.
    pub frames: Counter,
    /// Bytes off the ring.
    pub bytes: Counter,
    /// Records appended.
    pub records: Counter,
    /// Drops because the chunk queue was full.
    pub drops_queue_full: Counter,
    /// Drops because no chunk buffer was free.
    pub drops_no_buffer: Counter,
    /// Chunks handed on.
    pub chunks: Counter,
}

impl WriterMetrics {
    /// Creates (at zero) the series of `queue`.
    pub fn new(queue: u32) -> Self {
        let q = queue.to_string();
        Self {
            frames: counter!(WRITER_FRAMES, "queue" => q.clone()),
            bytes: counter!(WRITER_BYTES, "queue" => q.clone()),
            records: counter!(WRITER_RECORDS, "queue" => q.clone()),
            drops_queue_full: counter!(WRITER_DROPS, "queue" => q.clone(), "cause" => "chunk_queue_full"),
            drops_no_buffer: counter!(WRITER_DROPS, "queue" => q.clone(), "cause" => "no_chunk_buffer"),
            chunks: counter!(CHUNKS, "queue" => q),
        }
    }
}

/// Gauges of the chunk pool and queue.
pub struct ChunkGauges {
    /// Buffers in use.
    pub buffers_in_use: Gauge,
    /// Queue depth.
    pub queue_depth: Gauge,
}

impl ChunkGauges {
    /// Creates (at zero) the gauges.
    pub fn new() -> Self {
        Self { buffers_in_use: gauge!(CHUNK_BUFFERS_IN_USE), queue_depth: gauge!(CHUNK_QUEUE_DEPTH) }
    }
}

impl Default for ChunkGauges {
    fn default() -> Self {
        Self::new()
    }
}
