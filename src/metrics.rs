//! Prometheus metrics, with RabbitMQ's names where the meaning is the same
//! so that existing dashboards keep working.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Node-wide counters and gauges. Per-queue figures are read from the queue
/// runners when `/metrics` is scraped (see `admin`).
pub struct Metrics {
    pub registry: Registry,
    pub connections_opened: Counter,
    pub connections_closed: Counter,
    pub connections: Gauge,
    pub channels_opened: Counter,
    pub channels_closed: Counter,
    pub channels: Gauge,
    pub published: Counter,
    pub delivered: Counter,
    pub acked: Counter,
    pub confirmed: Counter,
    pub unroutable_returned: Counter,
    pub unroutable_dropped: Counter,
    pub dead_lettered: Counter,
    pub memory_used_bytes: Gauge,
    pub memory_alarm: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            connections_opened: Counter::default(),
            connections_closed: Counter::default(),
            connections: Gauge::default(),
            channels_opened: Counter::default(),
            channels_closed: Counter::default(),
            channels: Gauge::default(),
            published: Counter::default(),
            delivered: Counter::default(),
            acked: Counter::default(),
            confirmed: Counter::default(),
            unroutable_returned: Counter::default(),
            unroutable_dropped: Counter::default(),
            dead_lettered: Counter::default(),
            memory_used_bytes: Gauge::default(),
            memory_alarm: Gauge::default(),
            registry: Registry::default(),
        };
        // prometheus-client appends `_total` to counter names.
        let r = &mut registry;
        r.register(
            "rabbitmq_connections_opened",
            "Connections opened",
            m.connections_opened.clone(),
        );
        r.register(
            "rabbitmq_connections_closed",
            "Connections closed",
            m.connections_closed.clone(),
        );
        r.register(
            "rabbitmq_connections",
            "Open connections",
            m.connections.clone(),
        );
        r.register(
            "rabbitmq_channels_opened",
            "Channels opened",
            m.channels_opened.clone(),
        );
        r.register(
            "rabbitmq_channels_closed",
            "Channels closed",
            m.channels_closed.clone(),
        );
        r.register("rabbitmq_channels", "Open channels", m.channels.clone());
        r.register(
            "rabbitmq_global_messages_received",
            "Messages published to the node",
            m.published.clone(),
        );
        r.register(
            "rabbitmq_global_messages_delivered",
            "Messages delivered to consumers",
            m.delivered.clone(),
        );
        r.register(
            "rabbitmq_global_messages_acknowledged",
            "Messages acknowledged by consumers",
            m.acked.clone(),
        );
        r.register(
            "rabbitmq_global_messages_confirmed",
            "Publisher confirms sent",
            m.confirmed.clone(),
        );
        r.register(
            "rabbitmq_global_messages_unroutable_returned",
            "Unroutable mandatory messages returned",
            m.unroutable_returned.clone(),
        );
        r.register(
            "rabbitmq_global_messages_unroutable_dropped",
            "Unroutable messages dropped",
            m.unroutable_dropped.clone(),
        );
        r.register(
            "rabbitmq_global_messages_dead_lettered",
            "Messages dead-lettered",
            m.dead_lettered.clone(),
        );
        r.register(
            "rabbitmq_process_resident_memory_bytes",
            "Resident memory of the node",
            m.memory_used_bytes.clone(),
        );
        r.register(
            "rabbitmq_alarms_memory_used_watermark",
            "1 while the memory alarm blocks publishers",
            m.memory_alarm.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
