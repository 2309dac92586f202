//! Prometheus metrics: the counters and gauges the server keeps, and their text rendering
//! for `GET /metrics`. Counters are lock-free atomics, so updating one on a hot path costs
//! one atomic add.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Reason = [(&'static str, &'static str); 1];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    refused: Family<Reason, Counter>,
    pub tls_handshake_failures: Counter,
    pub joins: Counter,
    bad_first_frames: Family<Reason, Counter>,
    pub auth_failures: Counter,
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    pub slow_consumers: Counter,
    pub oversize_messages: Counter,
    pub channels: Gauge,
    pub history_frames: Gauge,
    pub history_bytes: Gauge,
    /// 1 while the NATS backplane is connected (0 without --nats or while it is down).
    pub nats_connected: Gauge,
    pub nats_disconnects: Counter,
    pub nats_reconnects: Counter,
    pub nats_publish_failures: Counter,
    pub nats_lagged: Counter,
    pub nats_consumer_lost: Counter,
    /// NATS links reading the stream with direct gets while their lost consumer is rebuilt.
    pub nats_direct_reads: Gauge,
    /// NATS links that should be up and are not (failed, trying again).
    pub nats_links_down: Gauge,
    /// Peer links that should be up and are not (failed, trying again).
    pub peer_links_down: Gauge,
    pub peer_links_up: Gauge,
    pub peer_link_failures: Counter,
    pub history_persist_dropped: Counter,
    pub history_corrupt_files: Counter,
    pub rate_limited: Counter,
    budget_refusals: Family<Reason, Counter>,
    resumes: Family<Reason, Counter>,
    pub memory_budget: Gauge,
    pub memory_used: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mles");
        let m = Metrics {
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            refused: Family::default(),
            tls_handshake_failures: Counter::default(),
            joins: Counter::default(),
            bad_first_frames: Family::default(),
            auth_failures: Counter::default(),
            messages_in: Counter::default(),
            bytes_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_out: Counter::default(),
            slow_consumers: Counter::default(),
            oversize_messages: Counter::default(),
            channels: Gauge::default(),
            history_frames: Gauge::default(),
            history_bytes: Gauge::default(),
            nats_connected: Gauge::default(),
            nats_disconnects: Counter::default(),
            nats_reconnects: Counter::default(),
            nats_publish_failures: Counter::default(),
            nats_lagged: Counter::default(),
            nats_consumer_lost: Counter::default(),
            nats_direct_reads: Gauge::default(),
            nats_links_down: Gauge::default(),
            peer_links_down: Gauge::default(),
            peer_links_up: Gauge::default(),
            peer_link_failures: Counter::default(),
            history_persist_dropped: Counter::default(),
            history_corrupt_files: Counter::default(),
            rate_limited: Counter::default(),
            budget_refusals: Family::default(),
            resumes: Family::default(),
            memory_budget: Gauge::default(),
            memory_used: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections_open",
            "Connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "connections_accepted",
            "TCP connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        r.register("joins", "Members joined to a channel", m.joins.clone());
        r.register(
            "bad_first_frames",
            "Connections closed for a bad join frame, by reason",
            m.bad_first_frames.clone(),
        );
        r.register(
            "auth_failures",
            "Join frames refused for bad or missing auth",
            m.auth_failures.clone(),
        );
        r.register(
            "messages_in",
            "Frames received from members",
            m.messages_in.clone(),
        );
        r.register(
            "bytes_in",
            "Payload bytes received from members",
            m.bytes_in.clone(),
        );
        r.register(
            "messages_out",
            "Frames delivered to members",
            m.messages_out.clone(),
        );
        r.register(
            "bytes_out",
            "Payload bytes delivered to members",
            m.bytes_out.clone(),
        );
        r.register(
            "slow_consumers",
            "Members disconnected for falling behind",
            m.slow_consumers.clone(),
        );
        r.register(
            "oversize_messages",
            "Connections closed for an oversize message",
            m.oversize_messages.clone(),
        );
        r.register(
            "channels",
            "Channels with members or history",
            m.channels.clone(),
        );
        r.register(
            "history_frames",
            "Frames held in channel history",
            m.history_frames.clone(),
        );
        r.register(
            "history_bytes",
            "Bytes held in channel history",
            m.history_bytes.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS (with --nats)",
            m.nats_connected.clone(),
        );
        r.register(
            "nats_disconnects",
            "Times the NATS connection was lost",
            m.nats_disconnects.clone(),
        );
        r.register(
            "nats_reconnects",
            "Times the NATS connection came back after a loss",
            m.nats_reconnects.clone(),
        );
        r.register(
            "nats_publish_failures",
            "Frames whose publish to NATS failed (retried after reconnect unless too big)",
            m.nats_publish_failures.clone(),
        );
        r.register(
            "nats_lagged",
            "Times a NATS link fell so far behind the stream that frames may have been lost",
            m.nats_lagged.clone(),
        );
        r.register(
            "nats_consumer_lost",
            "Times a NATS link's consumer stopped delivering (its node lost) and was rebuilt",
            m.nats_consumer_lost.clone(),
        );
        r.register(
            "nats_direct_reads",
            "NATS links reading the stream directly while their lost consumer is rebuilt",
            m.nats_direct_reads.clone(),
        );
        r.register(
            "nats_links_down",
            "NATS links that should be up and are not (failed, trying again)",
            m.nats_links_down.clone(),
        );
        r.register(
            "peer_links_down",
            "Peer links that should be up and are not (failed, trying again)",
            m.peer_links_down.clone(),
        );
        r.register(
            "peer_links_up",
            "Links to peer servers that are up",
            m.peer_links_up.clone(),
        );
        r.register(
            "peer_link_failures",
            "Failed attempts to link to a peer",
            m.peer_link_failures.clone(),
        );
        r.register(
            "history_persist_dropped",
            "Frames not persisted because the disk fell behind",
            m.history_persist_dropped.clone(),
        );
        r.register(
            "history_corrupt_files",
            "History files found damaged or unreadable at start",
            m.history_corrupt_files.clone(),
        );
        r.register(
            "rate_limited",
            "Connections closed for exceeding the message rate",
            m.rate_limited.clone(),
        );
        r.register(
            "memory_refusals",
            "Things refused because the memory budget was spent, by what",
            m.budget_refusals.clone(),
        );
        r.register(
            "resumes",
            "Clients that asked to resume, by result (recovered, not_recovered)",
            m.resumes.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "The memory budget (--max-memory)",
            m.memory_budget.clone(),
        );
        r.register(
            "memory_used_bytes",
            "Bytes charged to the memory budget now",
            m.memory_used.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a connection refused before it was served.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts a connection closed for a bad join frame.
    pub fn bad_first_frame(&self, reason: &'static str) {
        self.bad_first_frames
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counts something refused for lack of memory (`connection`, `channel`, `frame`, ...).
    pub fn budget_refused(&self, what: &'static str) {
        self.budget_refusals.get_or_create(&[("what", what)]).inc();
    }

    /// Counts a client that asked to resume, and whether its position was honoured.
    pub fn resumed(&self, recovered: bool) {
        let result = if recovered {
            "recovered"
        } else {
            "not_recovered"
        };
        self.resumes.get_or_create(&[("result", result)]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
