//! `warren perf`: a load generator for AMQP 0-9-1 brokers, modelled on
//! RabbitMQ's PerfTest.
//!
//! It exists so that Warren can be measured the same way RabbitMQ usually is,
//! and so that the two can be compared with identical client behaviour (see
//! `bench/compare.sh`). It speaks plain AMQP 0-9-1 through `lapin`, so it
//! works against any compatible broker.
//!
//! Shape of a run:
//! - queues are declared (durable, `x-queue-type` quorum or classic) unless
//!   `--no-declare`, in which case they are only checked to exist;
//! - consumers start first, each on its own connection and channel, so that
//!   nothing published during the run is missed;
//! - producers then publish persistent messages to the default exchange, each
//!   on its own connection and channel. The first 8 bytes of every body are the
//!   send time in nanoseconds (big-endian, like PerfTest's Java `ByteBuffer`)
//!   relative to one `Instant` shared by the whole process, so consumers in
//!   this process can compute end-to-end latency without clock skew;
//! - one line of statistics is printed every second; after `--time` seconds
//!   producers stop, outstanding confirms and deliveries get at most
//!   [`DRAIN`] to arrive, connections are closed, and a summary is printed
//!   (and, with `--json`, one JSON line for scripts).
//!
//! Accounting: rates in the summary cover the measured window only (from the
//! end of `--warmup` to the moment producers are told to stop). Totals count
//! the whole run including warmup and drain. Latency histograms cover
//! everything after warmup, including the drain, because a message that
//! waited in a backlog really did have that latency.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll, Waker},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ConsumerDelegate,
    PublisherConfirm,
    message::DeliveryResult,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::{JoinError, JoinSet},
    time::{MissedTickBehavior, sleep_until, timeout},
};

/// Longest time spent, after producers stop, waiting for outstanding
/// confirms and deliveries. Keeps every run bounded even if the broker
/// stalls.
const DRAIN: Duration = Duration::from_secs(5);

/// Time allowed for closing connections once work is done; a broker that
/// does not answer `connection.close` must not hang the tool.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Load generator options. Names and short flags follow RabbitMQ PerfTest
/// where PerfTest has an equivalent.
#[derive(clap::Args, Debug, Clone)]
pub struct PerfArgs {
    /// AMQP URI of the broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,

    /// Number of producers (one connection and channel each).
    #[arg(short = 'x', long, default_value_t = 1)]
    pub producers: usize,

    /// Number of consumers (one connection and channel each).
    #[arg(short = 'y', long, default_value_t = 1)]
    pub consumers: usize,

    /// Message body size in bytes (at least 8: the body carries the send
    /// timestamp).
    #[arg(short = 's', long, default_value_t = 1024)]
    pub size: usize,

    /// Publishing rate limit per producer, in messages per second (0 = as
    /// fast as possible).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    pub rate: f64,

    /// Run duration in seconds. 0 is allowed only with --pmessages, and then
    /// the run lasts until every producer has sent its messages.
    #[arg(short = 'z', long, default_value_t = 10)]
    pub time: u64,

    /// Messages each producer sends before stopping (0 = no limit).
    #[arg(short = 'C', long, default_value_t = 0)]
    pub pmessages: u64,

    /// Publisher confirm window: maximum unconfirmed messages in flight per
    /// producer (0 = publisher confirms off).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub confirm: usize,

    /// Consumer prefetch (basic.qos). 0 = unlimited, which is also PerfTest's
    /// default.
    #[arg(short = 'q', long, default_value_t = 0)]
    pub qos: u16,

    /// Acknowledge with multiple=true once every N messages (1 = ack each
    /// message individually).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub multi_ack_every: u64,

    /// Consume with automatic acknowledgement (no basic.ack sent).
    #[arg(short = 'a', long)]
    pub autoack: bool,

    /// Number of queues; producers and consumers are spread over them
    /// round-robin.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,

    /// Queue name pattern; `%d` is replaced by the queue number, from 1.
    #[arg(long, default_value = "perf-%d")]
    pub queue_pattern: String,

    /// Type of the declared (durable) queues.
    #[arg(long, default_value = "quorum", value_parser = ["quorum", "classic"])]
    pub queue_type: String,

    /// Do not declare queues; they must already exist.
    #[arg(long)]
    pub no_declare: bool,

    /// Also print the summary as one JSON object line.
    #[arg(long)]
    pub json: bool,

    /// Seconds at the start of the run that are not counted in the summary.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
}

/// Run the load generator until `--time` (or `--pmessages`) is reached, then
/// print the summary.
pub async fn run(args: PerfArgs) -> Result<()> {
    validate(&args)?;
    let args = Arc::new(args);
    let queues = queue_names(&args);
    let stats = Arc::new(Stats::new()?);
    let mut tasks = Tasks::new();

    let outcome = drive(&args, &queues, &stats, &mut tasks).await;
    if outcome.is_err() {
        // Leave nothing running behind the error, but do not wait long for it.
        tasks.abandon().await;
    }
    let measured = outcome?;
    print_summary(&args, &stats, &measured);
    Ok(())
}

fn validate(args: &PerfArgs) -> Result<()> {
    if args.size < 8 {
        bail!("--size must be at least 8: the first 8 bytes of each body hold the send timestamp");
    }
    if args.queues == 0 {
        bail!("--queues must be at least 1");
    }
    if args.queues > 1 && !args.queue_pattern.contains("%d") {
        bail!(
            "--queue-pattern {:?} has no %d, so {} queues would all get the same name",
            args.queue_pattern,
            args.queues
        );
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        bail!("--rate must be a non-negative number");
    }
    if args.time == 0 && (args.pmessages == 0 || args.producers == 0) {
        bail!("--time 0 needs --pmessages and at least one producer, or the run would never end");
    }
    if !args.autoack && args.qos > 0 && args.multi_ack_every > u64::from(args.qos) {
        bail!(
            "--multi-ack-every {} exceeds --qos {}: consumers would stall waiting for \
             deliveries the broker will not send until they ack",
            args.multi_ack_every,
            args.qos
        );
    }
    if args.producers == 0 && args.consumers == 0 {
        bail!("nothing to do: no producers and no consumers");
    }
    Ok(())
}

fn queue_names(args: &PerfArgs) -> Vec<String> {
    (1..=args.queues)
        .map(|i| args.queue_pattern.replace("%d", &i.to_string()))
        .collect()
}

/// Counters and latency histograms shared by all tasks.
///
/// Histograms hold the current one-second interval only; the reporter takes
/// them every second, prints the interval and folds it into the run totals.
struct Stats {
    /// Common time origin for the timestamps carried in message bodies.
    origin: Instant,
    sent: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    received: AtomicU64,
    /// End-to-end latency (publish to delivery), microseconds.
    latency: Mutex<Histogram<u64>>,
    /// Publish to confirm latency, microseconds.
    confirm_latency: Mutex<Histogram<u64>>,
    /// An empty histogram to swap in when an interval is taken.
    empty: Histogram<u64>,
}

impl Stats {
    fn new() -> Result<Self> {
        // 3 significant digits from 1 µs to an hour; anything slower is
        // clamped to an hour by `saturating_record`. Fixed bounds avoid
        // resizing on the hot path.
        let empty = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .context("creating latency histogram")?;
        Ok(Self {
            origin: Instant::now(),
            sent: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            received: AtomicU64::new(0),
            latency: Mutex::new(empty.clone()),
            confirm_latency: Mutex::new(empty.clone()),
            empty,
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            confirmed: self.confirmed.load(Ordering::Relaxed),
            nacked: self.nacked.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }

    /// Take the current interval's histograms, leaving empty ones behind.
    fn take_interval(&self) -> (Histogram<u64>, Histogram<u64>) {
        let lat = std::mem::replace(&mut *lock(&self.latency), self.empty.clone());
        let conf = std::mem::replace(&mut *lock(&self.confirm_latency), self.empty.clone());
        (lat, conf)
    }
}

/// A poisoned lock only means another task panicked while recording a
/// sample; the histogram itself is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy, Default)]
struct Counts {
    sent: u64,
    confirmed: u64,
    nacked: u64,
    received: u64,
}

/// What the summary needs from the run besides the shared [`Stats`].
struct Measured {
    /// Length of the measured window (warmup excluded).
    window: Duration,
    /// Counter increase over the measured window.
    delta: Counts,
    latency: Histogram<u64>,
    confirm_latency: Histogram<u64>,
    /// The run ended before the warmup did, so nothing was excluded.
    warmup_incomplete: bool,
}

/// Running producer and consumer tasks, and the signals that stop them.
struct Tasks {
    producers: JoinSet<Result<()>>,
    consumers: JoinSet<Result<()>>,
    stop_producers: watch::Sender<bool>,
    stop_consumers: watch::Sender<bool>,
}

impl Tasks {
    fn new() -> Self {
        Self {
            producers: JoinSet::new(),
            consumers: JoinSet::new(),
            stop_producers: watch::channel(false).0,
            stop_consumers: watch::channel(false).0,
        }
    }

    /// Error path: ask everything to stop, give it a moment to close its
    /// connection cleanly, then abort what is left.
    async fn abandon(&mut self) {
        self.stop_producers.send_replace(true);
        self.stop_consumers.send_replace(true);
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        for set in [&mut self.producers, &mut self.consumers] {
            while let Ok(Some(_)) = tokio::time::timeout_at(deadline, set.join_next()).await {}
            set.abort_all();
        }
    }
}

fn task_result(joined: std::result::Result<Result<()>, JoinError>) -> Result<()> {
    joined.map_err(|e| anyhow!("a perf task failed unexpectedly: {e}"))?
}

/// Hide the password of a URI before it appears in a message.
fn redact(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_owned();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return uri.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &uri[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => uri.to_owned(),
    }
}

async fn connect(uri: &str, name: String) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.clone().into());
    Connection::connect_with_runtime(uri, props, async_rs::Runtime::tokio_current())
        .await
        .with_context(|| format!("{name}: cannot connect to {}", redact(uri)))
}

/// Close a connection, bounded in time. Failure to close is reported but is
/// not an error of the run: the measurements are already complete.
async fn close(conn: &Connection, name: &str) {
    match timeout(CLOSE_TIMEOUT, conn.close(200, "perf run finished".into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("warning: {name}: closing connection: {e}"),
        Err(_) => eprintln!("warning: {name}: broker did not answer connection.close in time"),
    }
}

async fn declare_queues(args: &PerfArgs, queues: &[String]) -> Result<()> {
    let conn = connect(&args.uri, "perf-setup".to_owned()).await?;
    let result = async {
        let channel = conn
            .create_channel()
            .await
            .context("perf-setup: opening channel")?;
        for queue in queues {
            if args.no_declare {
                // A passive declare fails with 404 if the queue is missing,
                // which reads better than a consumer failing later.
                let options = QueueDeclareOptions::default().passive();
                channel
                    .queue_declare(queue.as_str().into(), options, FieldTable::default())
                    .await
                    .with_context(|| format!("queue {queue:?} does not exist (--no-declare)"))?;
            } else {
                let mut arguments = FieldTable::default();
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString(args.queue_type.as_str().into()),
                );
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::durable(),
                        arguments,
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "declaring queue {queue:?} (durable, x-queue-type={}); if it \
                             exists with other arguments, delete it or use --no-declare",
                            args.queue_type
                        )
                    })?;
            }
        }
        // Closed explicitly: dropping a lapin channel starts closing it, which
        // would race with the connection close below.
        channel
            .close(200, "declared".into())
            .await
            .context("perf-setup: closing channel")
    }
    .await;
    close(&conn, "perf-setup").await;
    result
}

async fn drive(
    args: &Arc<PerfArgs>,
    queues: &[String],
    stats: &Arc<Stats>,
    tasks: &mut Tasks,
) -> Result<Measured> {
    declare_queues(args, queues).await?;

    // Consumers first, so that every message published is seen.
    for id in 1..=args.consumers {
        let queue = queues[(id - 1) % queues.len()].clone();
        let ready =
            start_consumer(id, queue, args, stats, tasks.stop_consumers.subscribe()).await?;
        tasks.consumers.spawn(ready);
    }
    for id in 1..=args.producers {
        let queue = queues[(id - 1) % queues.len()].clone();
        let ready =
            start_producer(id, queue, args, stats, tasks.stop_producers.subscribe()).await?;
        tasks.producers.spawn(ready);
    }
    eprintln!(
        "running: {} producer(s), {} consumer(s), {} {} queue(s), {} B bodies, confirm window {}, \
         qos {}, {}",
        args.producers,
        args.consumers,
        queues.len(),
        args.queue_type,
        args.size,
        args.confirm,
        args.qos,
        if args.time > 0 {
            format!("{} s", args.time)
        } else {
            format!("{} messages per producer", args.pmessages)
        }
    );

    let start = Instant::now();
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::from_std(start) + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    // If the process falls behind, report late rather than in a burst; rates
    // use the real elapsed time anyway.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut latency = stats.empty.clone();
    let mut confirm_latency = stats.empty.clone();
    let mut baseline = (args.warmup == 0).then(|| (start, Counts::default()));
    let mut last = (start, Counts::default());
    let mut second = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);

    loop {
        tokio::select! {
            _ = ticker.tick() => {
                second += 1;
                let now = Instant::now();
                let counts = stats.counts();
                let (lat, conf) = stats.take_interval();
                print_tick(args, now - start, now - last.0, &last.1, &counts, &lat, second <= args.warmup);
                if second > args.warmup {
                    add(&mut latency, &lat);
                    add(&mut confirm_latency, &conf);
                }
                if second == args.warmup {
                    baseline = Some((now, counts));
                }
                last = (now, counts);
                if args.time > 0 && second >= args.time {
                    break;
                }
            }
            Some(joined) = tasks.producers.join_next() => {
                task_result(joined)?;
                // A producer only ends on its own when it reached --pmessages.
                if tasks.producers.is_empty() {
                    break;
                }
            }
            Some(joined) = tasks.consumers.join_next() => {
                task_result(joined)?;
                bail!("a consumer stopped before the end of the run");
            }
            _ = &mut interrupted => {
                eprintln!("interrupted: stopping early");
                break;
            }
        }
    }

    let end = Instant::now();
    let end_counts = stats.counts();
    tasks.stop_producers.send_replace(true);
    let warmup_incomplete = baseline.is_none();
    let (base_time, base_counts) = baseline.unwrap_or((start, Counts::default()));
    let delta = Counts {
        sent: end_counts.sent - base_counts.sent,
        confirmed: end_counts.confirmed - base_counts.confirmed,
        nacked: end_counts.nacked - base_counts.nacked,
        received: end_counts.received - base_counts.received,
    };

    // Producers wait (at most DRAIN) for their outstanding confirms, then
    // close their connections.
    let producers_deadline = tokio::time::Instant::now() + DRAIN + CLOSE_TIMEOUT;
    while let Some(joined) =
        tokio::time::timeout_at(producers_deadline, tasks.producers.join_next())
            .await
            .map_err(|_| anyhow!("producers did not stop within {:?}", DRAIN + CLOSE_TIMEOUT))?
    {
        task_result(joined)?;
    }

    drain_consumers(args, stats, tasks).await?;
    tasks.stop_consumers.send_replace(true);
    let consumers_deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT * 2;
    while let Some(joined) =
        tokio::time::timeout_at(consumers_deadline, tasks.consumers.join_next())
            .await
            .map_err(|_| anyhow!("consumers did not stop within {:?}", CLOSE_TIMEOUT * 2))?
    {
        task_result(joined)?;
    }

    // Whatever arrived since the last tick (the drain, or a partial second)
    // still belongs to the run.
    let (lat, conf) = stats.take_interval();
    if !warmup_incomplete {
        add(&mut latency, &lat);
        add(&mut confirm_latency, &conf);
    } else {
        // Nothing was excluded, so measure everything that was recorded.
        latency = lat;
        confirm_latency = conf;
    }

    Ok(Measured {
        window: end.saturating_duration_since(base_time),
        delta,
        latency,
        confirm_latency,
        warmup_incomplete,
    })
}

/// Give consumers up to [`DRAIN`] to receive what producers sent. Stops
/// early when everything arrived, or when nothing arrived for a second
/// (for example when some queues have no consumer, so the counts can never
/// match).
async fn drain_consumers(args: &PerfArgs, stats: &Stats, tasks: &mut Tasks) -> Result<()> {
    if args.consumers == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + DRAIN;
    let mut last_received = stats.received.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            Some(joined) = tasks.consumers.join_next() => {
                task_result(joined)?;
                bail!("a consumer stopped before the end of the run");
            }
        }
        let counts = stats.counts();
        if counts.received >= counts.sent {
            return Ok(());
        }
        let now = Instant::now();
        if counts.received != last_received {
            last_received = counts.received;
            last_progress = now;
        }
        if now >= deadline || now - last_progress >= Duration::from_secs(1) {
            return Ok(());
        }
    }
}

fn add(total: &mut Histogram<u64>, interval: &Histogram<u64>) {
    // Both histograms have the same bounds, so adding cannot run out of
    // range; if it ever failed, losing one interval's samples beats aborting
    // the run.
    let _ = total.add(interval);
}

/// How many lapin calls (publishes or acks) a task may have started but not
/// yet seen written to the socket.
const PIPELINE: usize = 256;

/// A lapin call whose frames may already be queued.
type Call<T> = Pin<Box<dyn Future<Output = lapin::Result<T>> + Send>>;

enum Slot<T> {
    Running(Call<T>),
    Done(lapin::Result<T>),
}

/// Started lapin calls, completed in start order.
///
/// `basic_publish` and `basic_ack` queue their frames on the first poll, and
/// the rest of the future only waits until the I/O loop has written them.
/// Awaiting that after every message costs a thread hand-off per message and
/// capped a producer or consumer at a few thousand messages per second, far
/// below what the broker can do. So calls are polled once when started (which
/// queues the frames, in start order) and their completions are collected
/// later, oldest first, with at most [`PIPELINE`] outstanding. If lapin ever
/// deferred queuing to a later poll, this would only become slower, not wrong:
/// calls are then driven from the front, in order.
struct Pipeline<T> {
    slots: VecDeque<Slot<T>>,
}

impl<T> Pipeline<T> {
    fn new() -> Self {
        Self {
            slots: VecDeque::with_capacity(PIPELINE),
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn poll_now(call: &mut Call<T>) -> Option<lapin::Result<T>> {
        match call
            .as_mut()
            .poll(&mut TaskContext::from_waker(Waker::noop()))
        {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }
    }

    fn start(&mut self, mut call: Call<T>) {
        let slot = match Self::poll_now(&mut call) {
            Some(out) => Slot::Done(out),
            None => Slot::Running(call),
        };
        self.slots.push_back(slot);
    }

    /// The oldest call's result if it has completed, without waiting.
    fn take_ready(&mut self) -> Option<lapin::Result<T>> {
        let front = self.slots.front_mut()?;
        if let Slot::Running(call) = front {
            *front = Slot::Done(Self::poll_now(call)?);
        }
        match self.slots.pop_front() {
            Some(Slot::Done(out)) => Some(out),
            _ => None,
        }
    }

    /// Wait for the oldest call. Cancel-safe: if dropped, the call stays.
    async fn next(&mut self) -> Option<lapin::Result<T>> {
        let front = self.slots.front_mut()?;
        if let Slot::Running(call) = front {
            let out = call.as_mut().await;
            *front = Slot::Done(out);
        }
        match self.slots.pop_front() {
            Some(Slot::Done(out)) => Some(out),
            _ => None,
        }
    }
}

/// Forwards deliveries to a channel in arrival order.
///
/// lapin runs the future returned by a delegate as its own task, so async
/// work there could be reordered; sending inside `on_new_delivery` itself
/// happens synchronously in delivery order. Using a delegate rather than the
/// `Consumer` stream avoids depending on a futures crate just for `next()`.
struct Forward(mpsc::UnboundedSender<DeliveryResult>);

impl ConsumerDelegate for Forward {
    fn on_new_delivery(
        &self,
        delivery: DeliveryResult,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // The receiver is gone only once the consume loop has ended, at
        // which point deliveries no longer matter.
        let _ = self.0.send(delivery);
        Box::pin(std::future::ready(()))
    }
}

struct ConsumerTask {
    name: String,
    queue: String,
    args: Arc<PerfArgs>,
    stats: Arc<Stats>,
    conn: Connection,
    channel: Channel,
    /// Kept alive for the lifetime of the task.
    _consumer: lapin::Consumer,
    deliveries: mpsc::UnboundedReceiver<DeliveryResult>,
    acks: Pipeline<()>,
    /// Messages received since the last ack (multi-ack batching).
    unacked: u64,
    last_tag: u64,
}

/// Connect and start consuming; returns the consume loop to spawn. Doing
/// setup before spawning lets connection errors stop the run at once.
async fn start_consumer(
    id: usize,
    queue: String,
    args: &Arc<PerfArgs>,
    stats: &Arc<Stats>,
    stop: watch::Receiver<bool>,
) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
    let name = format!("perf-consumer-{id}");
    let conn = connect(&args.uri, name.clone()).await?;
    let channel = conn
        .create_channel()
        .await
        .with_context(|| format!("{name}: opening channel"))?;
    if args.qos > 0 {
        channel
            .basic_qos(args.qos, BasicQosOptions::default())
            .await
            .with_context(|| format!("{name}: basic.qos {}", args.qos))?;
    }
    let options = BasicConsumeOptions {
        no_ack: args.autoack,
        ..BasicConsumeOptions::default()
    };
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            name.as_str().into(),
            options,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("{name}: basic.consume on queue {queue:?}"))?;
    let (tx, deliveries) = mpsc::unbounded_channel();
    consumer.set_delegate(Forward(tx));

    let mut task = ConsumerTask {
        name,
        queue,
        args: Arc::clone(args),
        stats: Arc::clone(stats),
        conn,
        channel,
        _consumer: consumer,
        deliveries,
        acks: Pipeline::new(),
        unacked: 0,
        last_tag: 0,
    };
    Ok(async move {
        let result = task.consume(stop).await;
        task.finish(result.is_ok()).await;
        result
    })
}

impl ConsumerTask {
    async fn consume(&mut self, mut stop: watch::Receiver<bool>) -> Result<()> {
        loop {
            let delivery = tokio::select! {
                d = self.deliveries.recv() => d,
                _ = stop.changed() => return Ok(()),
            };
            let delivery = match delivery {
                Some(Ok(Some(d))) => d,
                Some(Ok(None)) => bail!(
                    "{}: the broker cancelled the consumer on queue {:?}",
                    self.name,
                    self.queue
                ),
                Some(Err(e)) => {
                    return Err(anyhow!(e).context(format!(
                        "{}: receiving from queue {:?}",
                        self.name, self.queue
                    )));
                }
                None => bail!("{}: delivery stream ended", self.name),
            };
            let now = self.stats.now_ns();
            if let Some(ts) = delivery.data.first_chunk::<8>() {
                let sent = u64::from_be_bytes(*ts);
                // A timestamp from the future cannot be ours (for example a
                // leftover message from an earlier run): do not record it.
                if sent <= now {
                    lock(&self.stats.latency).saturating_record((now - sent) / 1000);
                }
            }
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            if self.args.autoack {
                continue;
            }
            self.unacked += 1;
            self.last_tag = delivery.delivery_tag;
            if self.unacked >= self.args.multi_ack_every {
                self.ack(self.args.multi_ack_every > 1);
            }
            while let Some(done) = self.acks.take_ready() {
                done.with_context(|| format!("{}: basic.ack", self.name))?;
            }
            if self.acks.len() >= PIPELINE {
                if let Some(done) = self.acks.next().await {
                    done.with_context(|| format!("{}: basic.ack", self.name))?;
                }
            }
        }
    }

    fn ack(&mut self, multiple: bool) {
        let channel = self.channel.clone();
        let tag = self.last_tag;
        self.acks.start(Box::pin(async move {
            channel.basic_ack(tag, BasicAckOptions { multiple }).await
        }));
        self.unacked = 0;
    }

    async fn finish(&mut self, clean: bool) {
        if clean && self.unacked > 0 {
            // Settle the partial batch so nothing is redelivered after we go.
            self.ack(true);
        }
        let settle = async {
            while let Some(done) = self.acks.next().await {
                if let Err(e) = done {
                    eprintln!("warning: {}: basic.ack: {e}", self.name);
                    break;
                }
            }
        };
        let _ = timeout(CLOSE_TIMEOUT, settle).await;
        close(&self.conn, &self.name).await;
    }
}

/// A published message waiting for its confirm: the confirm future, the send
/// time, and the window slot it occupies until confirmed.
type Pending = (PublisherConfirm, u64, OwnedSemaphorePermit);

/// What a started publish yields once written: its confirm future, send
/// time, and window slot (when confirms are on).
type Published = (PublisherConfirm, u64, Option<OwnedSemaphorePermit>);

struct ProducerTask {
    name: String,
    queue: String,
    args: Arc<PerfArgs>,
    stats: Arc<Stats>,
    conn: Connection,
    channel: Channel,
    /// The confirm window: one permit per unconfirmed message, given back
    /// when its confirm arrives.
    slots: Arc<Semaphore>,
    publishes: Pipeline<Published>,
    /// Hands confirms to the tracker; `None` when confirms are off.
    pending: Option<mpsc::UnboundedSender<Pending>>,
}

/// Connect and prepare a producer; returns the publish loop to spawn.
async fn start_producer(
    id: usize,
    queue: String,
    args: &Arc<PerfArgs>,
    stats: &Arc<Stats>,
    stop: watch::Receiver<bool>,
) -> Result<impl Future<Output = Result<()>> + Send + 'static> {
    let name = format!("perf-producer-{id}");
    let conn = connect(&args.uri, name.clone()).await?;
    let channel = conn
        .create_channel()
        .await
        .with_context(|| format!("{name}: opening channel"))?;
    if args.confirm > 0 {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .with_context(|| format!("{name}: confirm.select"))?;
    }
    let mut task = ProducerTask {
        name,
        queue,
        args: Arc::clone(args),
        stats: Arc::clone(stats),
        conn,
        channel,
        slots: Arc::new(Semaphore::new(args.confirm.max(1))),
        publishes: Pipeline::new(),
        pending: None,
    };
    Ok(async move {
        let tracker = (task.args.confirm > 0).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            task.pending = Some(tx);
            tokio::spawn(track_confirms(rx, Arc::clone(&task.stats)))
        });
        let result = task.publish(stop).await;
        let result = result.and(task.finish(tracker).await);
        close(&task.conn, &task.name).await;
        result
    })
}

impl ProducerTask {
    async fn publish(&mut self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let mut body = vec![0u8; self.args.size];
        let routing_key: lapin::types::ShortString = self.queue.as_str().into();
        let start = tokio::time::Instant::now();
        let window = self.args.confirm;
        let mut n = 0u64;
        loop {
            while let Some(done) = self.publishes.take_ready() {
                self.published(done)?;
            }
            if *stop.borrow() || (self.args.pmessages > 0 && n >= self.args.pmessages) {
                return Ok(());
            }
            if self.args.rate > 0.0 {
                // Schedule by message count rather than sleeping a fixed gap,
                // so timer granularity does not lower the achieved rate.
                let due = start + Duration::from_secs_f64(n as f64 / self.args.rate);
                if due > tokio::time::Instant::now() {
                    tokio::select! {
                        _ = sleep_until(due) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                }
            }
            let permit = if window > 0 {
                // Keep finishing started publishes while waiting: their
                // confirms are what free window slots.
                loop {
                    tokio::select! {
                        permit = Arc::clone(&self.slots).acquire_owned() => {
                            break Some(permit.context("confirm window closed")?);
                        }
                        Some(done) = self.publishes.next() => self.published(done)?,
                        _ = stop.changed() => return Ok(()),
                    }
                }
            } else {
                None
            };
            let sent_at = self.stats.now_ns();
            body[..8].copy_from_slice(&sent_at.to_be_bytes());
            let channel = self.channel.clone();
            let routing_key = routing_key.clone();
            let payload = body.clone();
            let properties = properties.clone();
            self.publishes.start(Box::pin(async move {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        routing_key,
                        BasicPublishOptions::default(),
                        &payload,
                        properties,
                    )
                    .await?;
                Ok((confirm, sent_at, permit))
            }));
            n += 1;
            if self.publishes.len() >= PIPELINE {
                tokio::select! {
                    Some(done) = self.publishes.next() => self.published(done)?,
                    // The broker may block publishers (resource alarm);
                    // stopping must not wait for that.
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    }

    /// Account for a publish whose frames have been written.
    fn published(&mut self, done: lapin::Result<Published>) -> Result<()> {
        let (confirm, sent_at, permit) = done.map_err(|e| {
            anyhow!(e).context(format!("{}: publishing to {:?}", self.name, self.queue))
        })?;
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        if let (Some(pending), Some(permit)) = (&self.pending, permit) {
            // The tracker only ends early on error, which `finish` reports.
            let _ = pending.send((confirm, sent_at, permit));
        }
        Ok(())
    }

    /// After the publish loop: let started publishes and outstanding confirms
    /// complete, for at most [`DRAIN`] in total.
    async fn finish(&mut self, tracker: Option<tokio::task::JoinHandle<Result<()>>>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DRAIN;
        loop {
            match tokio::time::timeout_at(deadline, self.publishes.next()).await {
                Ok(Some(done)) => self.published(done)?,
                Ok(None) => break,
                Err(_) => {
                    eprintln!(
                        "warning: {}: {} publish(es) still unwritten after {DRAIN:?}",
                        self.name,
                        self.publishes.len()
                    );
                    break;
                }
            }
        }
        // Closing the sender lets the tracker end once it has seen every
        // confirm.
        self.pending = None;
        let Some(mut tracker) = tracker else {
            return Ok(());
        };
        match tokio::time::timeout_at(deadline, &mut tracker).await {
            Ok(Ok(result)) => result.with_context(|| self.name.clone()),
            Ok(Err(e)) => Err(anyhow!("{}: confirm tracker failed: {e}", self.name)),
            Err(_) => {
                tracker.abort();
                let outstanding = self.args.confirm - self.slots.available_permits();
                eprintln!(
                    "warning: {}: {outstanding} confirm(s) still outstanding after {DRAIN:?}",
                    self.name
                );
                Ok(())
            }
        }
    }
}

/// Await confirms in publish order, recording their latency and freeing
/// window slots. One channel's confirms come back in order, so waiting on the
/// oldest first costs nothing.
async fn track_confirms(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    stats: Arc<Stats>,
) -> Result<()> {
    while let Some((confirm, sent_at, permit)) = pending.recv().await {
        let confirmation = confirm.await.context("waiting for publisher confirm")?;
        let micros = stats.now_ns().saturating_sub(sent_at) / 1000;
        match confirmation {
            Confirmation::Ack(_) => stats.confirmed.fetch_add(1, Ordering::Relaxed),
            Confirmation::Nack(_) => stats.nacked.fetch_add(1, Ordering::Relaxed),
            Confirmation::NotRequested => 0,
        };
        lock(&stats.confirm_latency).saturating_record(micros);
        drop(permit);
    }
    Ok(())
}

fn rate(count: u64, over: Duration) -> f64 {
    let secs = over.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

fn print_tick(
    args: &PerfArgs,
    elapsed: Duration,
    interval: Duration,
    before: &Counts,
    now: &Counts,
    latency: &Histogram<u64>,
    warmup: bool,
) {
    let mut line = format!(
        "time {:.3}s, sent {:.0} msg/s",
        elapsed.as_secs_f64(),
        rate(now.sent - before.sent, interval)
    );
    if args.confirm > 0 {
        line += &format!(
            ", confirmed {:.0} msg/s, nacked {:.0} msg/s",
            rate(now.confirmed - before.confirmed, interval),
            rate(now.nacked - before.nacked, interval)
        );
    }
    line += &format!(
        ", received {:.0} msg/s",
        rate(now.received - before.received, interval)
    );
    if latency.is_empty() {
        line += ", latency n/a";
    } else {
        line += &format!(
            ", latency min/median/75th/95th/99th {}/{}/{}/{}/{} µs",
            latency.min(),
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.75),
            latency.value_at_quantile(0.95),
            latency.value_at_quantile(0.99)
        );
    }
    if warmup {
        line += " (warmup)";
    }
    println!("{line}");
}

/// Percentiles of a histogram, or `None` when it has no samples.
struct Percentiles {
    min: u64,
    p50: u64,
    p75: u64,
    p95: u64,
    p99: u64,
    max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Self {
            min: h.min(),
            p50: h.value_at_quantile(0.5),
            p75: h.value_at_quantile(0.75),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        })
    }

    fn text(p: &Option<Self>) -> String {
        match p {
            Some(p) => format!(
                "{}/{}/{}/{}/{}/{} µs",
                p.min, p.p50, p.p75, p.p95, p.p99, p.max
            ),
            None => "n/a".to_owned(),
        }
    }

    fn json(p: &Option<Self>) -> serde_json::Value {
        match p {
            Some(p) => serde_json::json!({
                "min": p.min, "p50": p.p50, "p75": p.p75, "p95": p.p95, "p99": p.p99, "max": p.max,
            }),
            None => serde_json::Value::Null,
        }
    }
}

fn print_summary(args: &PerfArgs, stats: &Stats, m: &Measured) {
    let totals = stats.counts();
    let send_rate = rate(m.delta.sent, m.window);
    let receive_rate = rate(m.delta.received, m.window);
    let confirm_rate = rate(m.delta.confirmed, m.window);
    let latency = Percentiles::of(&m.latency);
    let confirm_latency = Percentiles::of(&m.confirm_latency);

    println!("summary:");
    if m.warmup_incomplete && args.warmup > 0 {
        println!(
            "  (run ended before the {} s warmup did: nothing excluded)",
            args.warmup
        );
    }
    println!("  measured window:  {:.3} s", m.window.as_secs_f64());
    println!("  sending rate avg:   {send_rate:.0} msg/s");
    if args.confirm > 0 {
        println!("  confirm rate avg:   {confirm_rate:.0} msg/s");
    }
    println!("  receiving rate avg: {receive_rate:.0} msg/s");
    println!(
        "  consume latency min/median/75th/95th/99th/max: {}",
        Percentiles::text(&latency)
    );
    if args.confirm > 0 {
        println!(
            "  confirm latency min/median/75th/95th/99th/max: {}",
            Percentiles::text(&confirm_latency)
        );
    }
    println!(
        "  totals: sent {}, confirmed {}, nacked {}, received {}",
        totals.sent, totals.confirmed, totals.nacked, totals.received
    );
    if args.json {
        let json = serde_json::json!({
            "sent": totals.sent,
            "confirmed": totals.confirmed,
            "nacked": totals.nacked,
            "received": totals.received,
            "send_rate": (send_rate * 10.0).round() / 10.0,
            "receive_rate": (receive_rate * 10.0).round() / 10.0,
            "confirm_rate": (confirm_rate * 10.0).round() / 10.0,
            "duration_s": m.window.as_secs_f64(),
            "latency_us": Percentiles::json(&latency),
            "confirm_latency_us": Percentiles::json(&confirm_latency),
            "producers": args.producers,
            "consumers": args.consumers,
            "queues": args.queues,
            "queue_type": args.queue_type,
            "size": args.size,
            "confirm_window": args.confirm,
            "qos": args.qos,
        });
        println!("{json}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://user@host/v"), "amqp://user@host/v");
    }

    #[test]
    fn queue_names_are_numbered_from_one() {
        let args = PerfArgs {
            uri: String::new(),
            producers: 1,
            consumers: 1,
            size: 1024,
            rate: 0.0,
            time: 1,
            pmessages: 0,
            confirm: 0,
            qos: 0,
            multi_ack_every: 1,
            autoack: false,
            queues: 3,
            queue_pattern: "q-%d".into(),
            queue_type: "quorum".into(),
            no_declare: false,
            json: false,
            warmup: 0,
        };
        assert_eq!(queue_names(&args), ["q-1", "q-2", "q-3"]);
        assert!(validate(&args).is_ok());
        assert!(
            validate(&PerfArgs {
                size: 4,
                ..args.clone()
            })
            .is_err()
        );
        assert!(
            validate(&PerfArgs {
                qos: 10,
                multi_ack_every: 20,
                ..args.clone()
            })
            .is_err()
        );
        assert!(validate(&PerfArgs { time: 0, ..args }).is_err());
    }
}
