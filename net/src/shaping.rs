//! Link shaping inside the transport: bandwidth, one-way delay and loss applied to every TCP
//! connection of a node, so the testnet can reproduce edge networks (LTE, WiFi, a 1 Mbit/s
//! link) in any mode. This kernel has `tc tbf` but no `netem`, and containers and plain
//! processes have no qdisc of their own, so the shaping lives here.
//!
//! The model, per node and direction (every connection of a node goes through its one
//! [`SharedLink`], so three peers pulling from a node share its upload rate, as on a real
//! uplink):
//! - **upload** (what this node writes, on any connection): bytes are serialized at `up`
//!   bits/s one after the other, then delivered `delay` later (the one-way latency of this
//!   node's link), in order per connection. A writer is held back once more than [`BACKLOG`]
//!   of serialization is queued on the link, as a full socket buffer would.
//! - **download** (what this node reads, on any connection): bytes are released to the
//!   readers at `down` bits/s in all.
//! - **loss**: each 1448-byte segment is lost with probability `loss`; as with TCP's fast
//!   retransmit, a loss stalls that connection's stream for one round trip (`2 * delay`, at
//!   least 1 ms) and the segment is sent again; the other connections keep the link busy
//!   meanwhile. Congestion-window reduction is not modelled.
//!
//! Two shaped nodes therefore see a round trip of `2 * delay`, a shaped node and an unshaped
//! one `delay`. [`LinkProfile::expected_transfer`] says how long a transfer should take;
//! `meshtune bench link` measures it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use tokio::time::{Instant, Sleep};

/// Serialization queued ahead of the link before a writer is held back.
pub const BACKLOG: Duration = Duration::from_millis(5);
/// tokio's timers round deadlines up to 1 ms ticks and fire when the tick is processed (about
/// 1 ms late on average, measured with `meshtune bench link`): a run is delivered when its
/// time is less than this away, so deliveries are on time on average. Delays below it cannot
/// be modelled: a delay is 0 or at least this (the parser refuses the rest).
pub const TIMER_SLACK: Duration = Duration::from_millis(1);
/// The segment size loss is drawn for (a TCP payload in a 1500-byte frame).
pub const SEGMENT: usize = 1448;

/// A link's bandwidth (bits/s, `None` = unlimited), one-way delay and segment loss rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    pub up_bps: Option<u64>,
    pub down_bps: Option<u64>,
    pub delay: Duration,
    pub loss: f64,
}

impl LinkProfile {
    /// No shaping at all.
    pub const UNLIMITED: LinkProfile = LinkProfile {
        up_bps: None,
        down_bps: None,
        delay: Duration::ZERO,
        loss: 0.0,
    };

    /// The named presets: typical figures for each kind of link (one-way delay from this
    /// node; two shaped nodes see twice that as round trip).
    pub const PRESETS: [(&'static str, LinkProfile); 5] = [
        (
            "lan",
            LinkProfile {
                up_bps: Some(1_000_000_000),
                down_bps: Some(1_000_000_000),
                // A LAN's ~0.25 ms is below the shaper's 1 ms timer: bandwidth only.
                delay: Duration::ZERO,
                loss: 0.0,
            },
        ),
        (
            "wifi",
            LinkProfile {
                up_bps: Some(100_000_000),
                down_bps: Some(200_000_000),
                delay: Duration::from_millis(4),
                loss: 0.001,
            },
        ),
        (
            "lte",
            LinkProfile {
                up_bps: Some(10_000_000),
                down_bps: Some(30_000_000),
                delay: Duration::from_millis(25),
                loss: 0.001,
            },
        ),
        (
            "5g",
            LinkProfile {
                up_bps: Some(50_000_000),
                down_bps: Some(300_000_000),
                delay: Duration::from_millis(12),
                loss: 0.0005,
            },
        ),
        (
            "slow",
            LinkProfile {
                up_bps: Some(1_000_000),
                down_bps: Some(1_000_000),
                delay: Duration::from_millis(20),
                loss: 0.0,
            },
        ),
    ];

    /// Whether this profile changes anything.
    pub fn is_unlimited(&self) -> bool {
        self.up_bps.is_none() && self.down_bps.is_none() && self.delay.is_zero() && self.loss == 0.0
    }

    /// Expected seconds to move `bytes` in one direction through a link that is `up` on the
    /// sending side (serialization, one-way delay, loss stalls), for checking measurements.
    pub fn expected_transfer(&self, bytes: u64, upload: bool) -> Duration {
        let rate = if upload { self.up_bps } else { self.down_bps };
        let serialize = rate.map_or(0.0, |r| bytes as f64 * 8.0 / r as f64);
        let (delay, stalls) = if upload {
            let segments = bytes as f64 / SEGMENT as f64;
            (
                self.delay.as_secs_f64(),
                segments * self.loss * self.stall().as_secs_f64(),
            )
        } else {
            (0.0, 0.0)
        };
        Duration::from_secs_f64(serialize + delay + stalls)
    }

    fn stall(&self) -> Duration {
        (self.delay * 2).max(Duration::from_millis(1))
    }
}

impl Default for LinkProfile {
    fn default() -> Self {
        Self::UNLIMITED
    }
}

/// Errors of [`LinkProfile::from_str`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkProfileError {
    #[error(
        "unknown link profile or setting `{0}`: use lan, wifi, lte, 5g, slow or KEY=VALUE \
         settings (rate=, up=, down= like 10mbit; delay= like 25ms; loss= like 0.1%)"
    )]
    Unknown(String),
    #[error("invalid {key} `{value}`: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn parse_rate(key: &'static str, value: &str) -> Result<Option<u64>, LinkProfileError> {
    let invalid = |reason| LinkProfileError::Invalid {
        key,
        value: value.to_owned(),
        reason,
    };
    let lower = value.to_ascii_lowercase();
    if lower == "unlimited" {
        return Ok(None);
    }
    let (number, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(suffix, scale)| lower.strip_suffix(suffix).map(|n| (n, *scale)))
        .ok_or_else(|| invalid("give a rate with a unit: bit, kbit, mbit or gbit (per second)"))?;
    let number: f64 = number.trim().parse().map_err(|_| invalid("not a number"))?;
    let bps = number * scale;
    if !bps.is_finite() || bps < 8.0 {
        return Err(invalid("must be at least 8 bit/s"));
    }
    Ok(Some(bps.round() as u64))
}

fn parse_delay(value: &str) -> Result<Duration, LinkProfileError> {
    let invalid = |reason| LinkProfileError::Invalid {
        key: "delay",
        value: value.to_owned(),
        reason,
    };
    let lower = value.to_ascii_lowercase();
    let (number, scale) = [("us", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(suffix, scale)| lower.strip_suffix(suffix).map(|n| (n, *scale)))
        .ok_or_else(|| invalid("give a duration with a unit: us, ms or s"))?;
    let number: f64 = number.trim().parse().map_err(|_| invalid("not a number"))?;
    let seconds = number * scale;
    if !seconds.is_finite() || !(0.0..=10.0).contains(&seconds) {
        return Err(invalid("must be between 0 and 10 s"));
    }
    let delay = Duration::from_secs_f64(seconds);
    if !delay.is_zero() && delay < TIMER_SLACK {
        return Err(invalid(
            "must be 0 or at least 1ms (shorter delays are below the shaper's timer granularity)",
        ));
    }
    Ok(delay)
}

fn parse_loss(value: &str) -> Result<f64, LinkProfileError> {
    let invalid = |reason| LinkProfileError::Invalid {
        key: "loss",
        value: value.to_owned(),
        reason,
    };
    let (number, scale) = match value.strip_suffix('%') {
        Some(n) => (n, 0.01),
        None => (value, 1.0),
    };
    let loss = number
        .trim()
        .parse::<f64>()
        .map_err(|_| invalid("not a number"))?
        * scale;
    if !loss.is_finite() || !(0.0..0.5).contains(&loss) {
        return Err(invalid("must be at least 0 and below 50%"));
    }
    Ok(loss)
}

impl FromStr for LinkProfile {
    type Err = LinkProfileError;

    /// A preset name, `KEY=VALUE` settings, or a preset followed by overrides, separated by
    /// commas: `lte`, `rate=1mbit,delay=20ms`, `lte,loss=0`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut profile = LinkProfile::UNLIMITED;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => {
                    let lower = part.to_ascii_lowercase();
                    profile = match lower.as_str() {
                        "none" | "unlimited" => LinkProfile::UNLIMITED,
                        name => LinkProfile::PRESETS
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map(|(_, p)| *p)
                            .ok_or_else(|| LinkProfileError::Unknown(part.to_owned()))?,
                    };
                }
                Some((key, value)) => match key.trim().to_ascii_lowercase().as_str() {
                    "rate" => {
                        let rate = parse_rate("rate", value.trim())?;
                        profile.up_bps = rate;
                        profile.down_bps = rate;
                    }
                    "up" => profile.up_bps = parse_rate("up", value.trim())?,
                    "down" => profile.down_bps = parse_rate("down", value.trim())?,
                    "delay" => profile.delay = parse_delay(value.trim())?,
                    "loss" => profile.loss = parse_loss(value.trim())?,
                    _ => return Err(LinkProfileError::Unknown(part.to_owned())),
                },
            }
        }
        Ok(profile)
    }
}

fn format_rate(bps: Option<u64>) -> String {
    match bps {
        None => "unlimited".into(),
        Some(b) if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        Some(b) if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        Some(b) if b % 1_000 == 0 => format!("{}kbit", b / 1_000),
        Some(b) => format!("{b}bit"),
    }
}

impl fmt::Display for LinkProfile {
    /// The canonical `KEY=VALUE` form, which parses back to the same profile.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "up={},down={},delay={}us,loss={}%",
            format_rate(self.up_bps),
            format_rate(self.down_bps),
            self.delay.as_micros(),
            self.loss * 100.0
        )
    }
}

/// When a node's link is free again in each direction: shared by every connection through it.
#[derive(Debug)]
struct LinkClocks {
    /// When the upload finishes serializing what was accepted so far.
    tx_free: Instant,
    /// When the download has released what was read so far.
    rx_free: Instant,
}

/// One node's link: a [`LinkProfile`] and the clocks that every connection shaped through it
/// shares (see the module docs). Cheap to clone; clones are the same link.
#[derive(Debug, Clone)]
pub struct SharedLink {
    profile: LinkProfile,
    clocks: Arc<Mutex<LinkClocks>>,
}

impl SharedLink {
    pub fn new(profile: LinkProfile) -> Self {
        let now = Instant::now();
        Self {
            profile,
            clocks: Arc::new(Mutex::new(LinkClocks {
                tx_free: now,
                rx_free: now,
            })),
        }
    }

    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    /// `inner` shaped through this link; `seed` makes its loss draws reproducible.
    pub fn shape<S>(&self, inner: S, seed: u64) -> Shaped<S> {
        let now = Instant::now();
        Shaped {
            inner,
            profile: self.profile,
            link: Arc::clone(&self.clocks),
            tx_free: now,
            last_delivery: now,
            in_flight: VecDeque::new(),
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            rx_free: now,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            received: Vec::new(),
            handed_out: 0,
            rng: SplitMix64::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// The clocks, also after a panic elsewhere (they hold two instants, always valid).
    fn clocks(link: &Mutex<LinkClocks>) -> std::sync::MutexGuard<'_, LinkClocks> {
        link.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A byte run waiting for its delivery time.
struct InFlight {
    at: Instant,
    bytes: Vec<u8>,
    written: usize,
}

/// A stream shaped by a [`LinkProfile`]: wrap a transport's raw connections with it
/// (before encryption, so every byte on the wire is shaped).
pub struct Shaped<S> {
    inner: S,
    profile: LinkProfile,
    /// The node's link, shared with its other connections.
    link: Arc<Mutex<LinkClocks>>,
    /// When this connection's stream may send again: the link's clock for what this
    /// connection wrote, plus its loss stalls.
    tx_free: Instant,
    /// Delivery time of the newest run (deliveries stay in order).
    last_delivery: Instant,
    in_flight: VecDeque<InFlight>,
    write_timer: Pin<Box<Sleep>>,
    /// When the download pacing releases the bytes read last.
    rx_free: Instant,
    read_timer: Pin<Box<Sleep>>,
    /// Bytes read from the socket that the download rate has not released yet.
    received: Vec<u8>,
    handed_out: usize,
    /// The loss draws: `rand_xoshiro`'s splitmix64, the workspace's one seeded stream.
    rng: SplitMix64,
}

impl<S> Shaped<S> {
    /// Shapes `inner` through a link of its own; `seed` makes the loss draws reproducible.
    pub fn new(inner: S, profile: LinkProfile, seed: u64) -> Self {
        SharedLink::new(profile).shape(inner, seed)
    }

    /// The profile in force.
    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    /// Uniform in [0, 1), from the top 53 bits of the next draw.
    fn next_random(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Bytes accepted per write: about [`BACKLOG`] worth of the upload rate, at least a
    /// segment, at most 64 KiB.
    fn write_chunk(&self) -> usize {
        self.profile.up_bps.map_or(64 * 1024, |bps| {
            ((bps as f64 / 8.0 * BACKLOG.as_secs_f64()) as usize).clamp(SEGMENT, 64 * 1024)
        })
    }

    fn read_chunk(&self) -> usize {
        self.profile.down_bps.map_or(64 * 1024, |bps| {
            ((bps as f64 / 8.0 * BACKLOG.as_secs_f64()) as usize).clamp(SEGMENT, 256 * 1024)
        })
    }
}

fn serialize_time(bytes: usize, bps: Option<u64>) -> Duration {
    bps.map_or(Duration::ZERO, |r| {
        Duration::from_secs_f64(bytes as f64 * 8.0 / r as f64)
    })
}

impl<S: AsyncWrite + Unpin> Shaped<S> {
    /// Writes every run whose delivery time has come; `Ready` once nothing is in flight.
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let now = Instant::now();
            let Some(front) = self.in_flight.front_mut() else {
                return Poll::Ready(Ok(()));
            };
            if front.at > now + TIMER_SLACK {
                self.write_timer.as_mut().reset(front.at - TIMER_SLACK);
                if self.write_timer.as_mut().poll(cx).is_ready() {
                    continue;
                }
                return Poll::Pending;
            }
            while front.written < front.bytes.len() {
                match Pin::new(&mut self.inner).poll_write(cx, &front.bytes[front.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => front.written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            self.in_flight.pop_front();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shaped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.profile.is_unlimited() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if let Poll::Ready(Err(e)) = this.pump(cx) {
            return Poll::Ready(Err(e));
        }
        let now = Instant::now();
        let busy_until = this.tx_free.max(SharedLink::clocks(&this.link).tx_free);
        if busy_until.saturating_duration_since(now) > BACKLOG {
            // The link (or this stream, stalled) is busy: wait until the backlog drains to
            // the threshold.
            this.write_timer.as_mut().reset(busy_until - BACKLOG);
            if this.write_timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let n = buf.len().min(this.write_chunk());
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let segments = n.div_ceil(SEGMENT);
        let mut lost = 0u32;
        if this.profile.loss > 0.0 {
            for _ in 0..segments {
                if this.next_random() < this.profile.loss {
                    lost += 1;
                }
            }
        }
        // The link serializes the run (and the lost segments again) after whatever any
        // connection queued before; the stalls hold back this stream only.
        let sent = {
            let mut link = SharedLink::clocks(&this.link);
            let start = link.tx_free.max(this.tx_free).max(now);
            link.tx_free = start
                + serialize_time(n, this.profile.up_bps)
                + serialize_time(SEGMENT, this.profile.up_bps) * lost;
            link.tx_free
        };
        this.tx_free = sent + this.profile.stall() * lost;
        let at = (this.tx_free + this.profile.delay).max(this.last_delivery);
        this.last_delivery = at;
        this.in_flight.push_back(InFlight {
            at,
            bytes: buf[..n].to_vec(),
            written: 0,
        });
        // Start delivering (and arm the timer that wakes this task for the rest).
        if let Poll::Ready(Err(e)) = this.pump(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.pump(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.pump(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Shaped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.profile.down_bps.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.received.is_empty() {
            // Take what the socket has (up to a chunk); it is handed out once the download
            // rate would have delivered it.
            let mut chunk = vec![0u8; this.read_chunk()];
            let n = match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            chunk.truncate(n);
            // A late timer leaves up to BACKLOG of credit, so lateness does not add up. The
            // link releases this run after what every connection read before.
            let now = Instant::now();
            let mut link = SharedLink::clocks(&this.link);
            link.rx_free = link.rx_free.max(now.checked_sub(BACKLOG).unwrap_or(now))
                + serialize_time(n, this.profile.down_bps);
            this.rx_free = link.rx_free;
            this.received = chunk;
            this.handed_out = 0;
        }
        if this.rx_free > Instant::now() + TIMER_SLACK {
            this.read_timer.as_mut().reset(this.rx_free - TIMER_SLACK);
            if this.read_timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let left = &this.received[this.handed_out..];
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        this.handed_out += n;
        if this.handed_out == this.received.len() {
            this.received.clear();
            this.handed_out = 0;
        }
        Poll::Ready(Ok(n))
    }
}

/// What [`measure`] saw against what the profile predicts.
#[derive(Debug, Clone, Copy)]
pub struct LinkMeasurement {
    pub bytes: u64,
    pub upload_expected: Duration,
    pub upload_measured: Duration,
    pub download_expected: Duration,
    pub download_measured: Duration,
    /// Median round trip of 1-byte pings to an unshaped echo (this node's delay one way).
    pub rtt_expected: Duration,
    pub rtt_measured: Duration,
}

impl LinkMeasurement {
    /// measured / expected, for upload time, download time and round trip.
    pub fn ratios(&self) -> (f64, f64, f64) {
        let ratio = |m: Duration, e: Duration| {
            if e.is_zero() {
                f64::NAN
            } else {
                m.as_secs_f64() / e.as_secs_f64()
            }
        };
        (
            ratio(self.upload_measured, self.upload_expected),
            ratio(self.download_measured, self.download_expected),
            ratio(self.rtt_measured, self.rtt_expected),
        )
    }
}

/// Sends `len` bytes from `writer` while `reader` takes them; the time from the first write to
/// the last byte read.
async fn timed_transfer<W, R>(writer: &mut W, reader: &mut R, len: usize) -> io::Result<Duration>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    use futures::{AsyncReadExt, AsyncWriteExt};
    let block = vec![0x5a_u8; 64 * 1024];
    let started = Instant::now();
    let send = async {
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len());
            writer.write_all(&block[..n]).await?;
            left -= n;
        }
        writer.flush().await
    };
    let receive = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < len {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        io::Result::Ok(Instant::now())
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    Ok(received? - started)
}

/// Measures a shaped loopback TCP connection: `bytes` uploaded through the shaped side,
/// `bytes` downloaded into it, and `pings` 1-byte round trips to an unshaped echo.
pub async fn measure(
    profile: LinkProfile,
    bytes: u64,
    pings: usize,
) -> io::Result<LinkMeasurement> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let connect = tokio::net::TcpStream::connect(addr);
    let (client, accepted) = tokio::join!(connect, listener.accept());
    let client = client?;
    let (server, _) = accepted?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let mut shaped = Shaped::new(client.compat(), profile, 1);
    let mut plain = server.compat();
    let len = usize::try_from(bytes).map_err(|_| io::Error::other("transfer too large"))?;
    // Upload: from the first byte written to the last byte read at the far end; download:
    // the unshaped side writes, the shaped side reads at its download rate.
    let upload_measured = timed_transfer(&mut shaped, &mut plain, len).await?;
    let download_measured = timed_transfer(&mut plain, &mut shaped, len).await?;

    // Round trips: shaped side sends one byte, the far end echoes it.
    let mut rtts = Vec::with_capacity(pings);
    for _ in 0..pings.max(1) {
        let started = Instant::now();
        let ping = async {
            shaped.write_all(&[1]).await?;
            shaped.flush().await?;
            let mut b = [0u8; 1];
            shaped.read_exact(&mut b).await?;
            io::Result::Ok(())
        };
        let echo = async {
            let mut b = [0u8; 1];
            plain.read_exact(&mut b).await?;
            plain.write_all(&b).await?;
            plain.flush().await?;
            io::Result::Ok(())
        };
        let (a, b) = tokio::join!(ping, echo);
        a?;
        b?;
        rtts.push(started.elapsed());
    }
    rtts.sort();
    Ok(LinkMeasurement {
        bytes,
        upload_expected: profile.expected_transfer(bytes, true),
        upload_measured,
        download_expected: profile.expected_transfer(bytes, false),
        download_measured,
        rtt_expected: profile.delay
            + serialize_time(1, profile.up_bps)
            + serialize_time(1, profile.down_bps),
        rtt_measured: rtts[rtts.len() / 2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_from_presets_and_settings_and_print_back() {
        let lte: LinkProfile = "lte".parse().expect("preset");
        assert_eq!(lte.up_bps, Some(10_000_000));
        assert_eq!(lte.delay, Duration::from_millis(25));
        let custom: LinkProfile = "rate=1mbit,delay=20ms,loss=0.5%".parse().expect("custom");
        assert_eq!(custom.up_bps, Some(1_000_000));
        assert_eq!(custom.down_bps, Some(1_000_000));
        assert!((custom.loss - 0.005).abs() < 1e-12);
        let overridden: LinkProfile = "lte, loss=0, down=unlimited".parse().expect("override");
        assert_eq!(overridden.loss, 0.0);
        assert_eq!(overridden.down_bps, None);
        assert_eq!(overridden.up_bps, Some(10_000_000));
        for (name, profile) in LinkProfile::PRESETS {
            let back: LinkProfile = profile.to_string().parse().expect(name);
            assert_eq!(back, profile, "{name} round-trips through its text form");
        }
        assert!("none".parse::<LinkProfile>().expect("none").is_unlimited());
    }

    #[test]
    fn bad_profiles_are_refused_with_the_setting_named() {
        for (text, needle) in [
            ("lte2", "unknown link profile"),
            ("rate=fast", "invalid rate"),
            ("rate=10", "with a unit"),
            ("delay=5", "invalid delay"),
            ("delay=-5ms", "between 0 and 10 s"),
            ("delay=250us", "0 or at least 1ms"),
            ("loss=60%", "below 50%"),
            ("loss=NaN", "invalid loss"),
            (
                "colour=blue",
                "unknown link profile or setting `colour=blue`",
            ),
        ] {
            let err = text.parse::<LinkProfile>().expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn expected_transfer_adds_serialization_delay_and_loss_stalls() {
        let profile: LinkProfile = "rate=8mbit,delay=10ms,loss=1%".parse().expect("profile");
        // 1 MB at 1 MB/s = 1 s, + 10 ms delay, + 1000000/1448 * 1% * 20 ms.
        let t = profile.expected_transfer(1_000_000, true).as_secs_f64();
        let want = 1.0 + 0.010 + 1_000_000.0 / 1448.0 * 0.01 * 0.020;
        assert!((t - want).abs() < 1e-9, "{t} vs {want}");
        assert!((profile.expected_transfer(1_000_000, false).as_secs_f64() - 1.0).abs() < 1e-9);
    }

    /// Shaping can make a link slower than the profile only through machine load, never
    /// faster: measured times are at least the profile's (the upper bound, within 10%, is
    /// checked by `meshtune bench link`, since tests do not assert on time under load).
    #[tokio::test]
    async fn a_shaped_link_is_never_faster_than_its_profile() {
        let profile: LinkProfile = "rate=4mbit,delay=30ms".parse().expect("profile");
        let m = measure(profile, 200_000, 5).await.expect("measure");
        let (up, down, rtt) = m.ratios();
        assert!(up >= 0.97, "upload {m:?}");
        assert!(down >= 0.97, "download {m:?}");
        assert!(rtt >= 0.97, "round trip {m:?}");
        // An unshaped link is not slowed down.
        let plain = measure(LinkProfile::UNLIMITED, 200_000, 5)
            .await
            .expect("measure");
        assert!(plain.rtt_measured < Duration::from_millis(30), "{plain:?}");
    }

    /// Bytes arrive whole and in order through delay, pacing and loss stalls.
    #[tokio::test]
    async fn shaping_keeps_every_byte_in_order() {
        use futures::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (a, b) = tokio::io::duplex(8 * 1024);
        let profile: LinkProfile = "rate=50mbit,delay=2ms,loss=5%".parse().expect("profile");
        let mut writer = Shaped::new(a.compat(), profile, 7);
        let mut reader = Shaped::new(b.compat(), profile, 8);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let send = async {
            writer.write_all(&data).await.expect("write");
            writer.close().await.expect("close");
        };
        let receive = async {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.expect("read");
            got
        };
        let ((), got) = tokio::join!(send, receive);
        assert_eq!(got, data);
    }

    /// Two connections through one node's link share its upload rate: moving a blob on each
    /// at once takes at least as long as both blobs one after the other (a link per
    /// connection, as before, took half that).
    #[tokio::test]
    async fn connections_through_one_link_share_its_rate() {
        use futures::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let profile: LinkProfile = "up=4mbit,down=unlimited".parse().expect("profile");
        let link = SharedLink::new(profile);
        let bytes = 100_000usize;
        let data = vec![7u8; bytes];
        let one = |seed: u64| {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let (mut writer, mut reader) = (link.shape(a.compat(), seed), b.compat());
            let data = &data;
            async move {
                let send = async {
                    writer.write_all(data).await.expect("write");
                    writer.close().await.expect("close");
                };
                let receive = async {
                    let mut got = Vec::new();
                    reader.read_to_end(&mut got).await.expect("read");
                    got.len()
                };
                tokio::join!(send, receive).1
            }
        };
        let started = Instant::now();
        let (a, b) = tokio::join!(one(1), one(2));
        let took = started.elapsed();
        assert_eq!((a, b), (bytes, bytes));
        let both = profile.expected_transfer(2 * bytes as u64, true);
        assert!(
            took.as_secs_f64() >= 0.97 * both.as_secs_f64(),
            "two connections moved {} bytes in {took:?}; the link needs {both:?}",
            2 * bytes
        );
    }
}
