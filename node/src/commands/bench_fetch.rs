//! `meshtune bench fetch`: how close a blob pull runs to its link. One node serves a blob of
//! random bytes; `--pullers` nodes, each on its own shaped loopback TCP connection (the
//! node's real transport: shaping, noise, yamux, request-response), fetch it at once with the
//! node's own fetch code. The time is set against what the profile allows: the serving node
//! uploads the blob once per puller at its upload rate (or each puller downloads it at its
//! download rate, whichever is slower), plus the two round trips of a fetch (the chunk list,
//! then the chunks). With `--both-ways` the server pulls a blob from every puller at the same
//! time, as in a round of all-to-all averaging. Printed, never asserted in tests (issue 24:
//! <= 1.3x).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshtune_net::PeerAddr;
use meshtune_net::shaping::LinkProfile;
use meshtune_net::transport::{TransportConfig, network_transport};
use meshtune_protocol::{Limits, ModelLayout, TensorSpec, chunk_blob};
use rand::{RngCore, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::network::fetch::{FetchConfig, fetch_blob};
use crate::network::store::BlobStore;
use crate::network::{self, Client, NetworkConfig, NetworkEvent};

#[derive(Debug, Args)]
pub struct FetchBenchArgs {
    /// Link profiles (presets or KEY=VALUE settings, see `meshtune node --link`), the same on
    /// every node.
    #[arg(long = "profile", default_values_t = ["lte".to_owned(), "slow".to_owned()])]
    pub profiles: Vec<String>,
    /// Blob size in bytes (2.7 MB: a flan-t5-small delta at top-2%).
    #[arg(long, default_value_t = 2_700_000)]
    pub bytes: u64,
    /// Nodes pulling the blob at the same time.
    #[arg(long, default_value_t = 1)]
    pub pullers: usize,
    /// Chunk size in bytes.
    #[arg(long, default_value_t = meshtune_protocol::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u32,
    /// Chunk requests in flight to one peer.
    #[arg(long, default_value_t = FetchConfig::default().per_peer_concurrency)]
    pub concurrency: usize,
    /// Pulls per profile (each of a fresh blob; the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// The server also pulls a blob of the same size from every puller at the same time, as
    /// in a round of all-to-all averaging (each link then carries data both ways).
    #[arg(long)]
    pub both_ways: bool,
}

/// One profile's result.
struct Pulls {
    expected: Duration,
    measured: Vec<Duration>,
}

pub fn fetch(args: FetchBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.pullers >= 1, "--pullers must be at least 1");
    anyhow::ensure!(args.repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.bytes >= 1, "--bytes must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "blob pull over shaped loopback TCP: {} bytes, {} puller(s), chunks of {} bytes, {} in flight per peer; loadavg {}",
        args.bytes,
        args.pullers,
        args.chunk_size,
        args.concurrency,
        loadavg.trim()
    );
    println!(
        "{:<20} | {:>10} | {:>10} {:>10} {:>10} | {:>6}",
        "profile", "expected", "median", "min", "max", "ratio"
    );
    for text in &args.profiles {
        let profile: LinkProfile = text.parse()?;
        let pulls = runtime.block_on(measure(profile, &args))?;
        let mut sorted = pulls.measured.clone();
        sorted.sort();
        let median = sorted[sorted.len() / 2];
        let s = |d: Duration| format!("{:.2}s", d.as_secs_f64());
        println!(
            "{:<20} | {:>10} | {:>10} {:>10} {:>10} | {:>6.2}",
            text,
            s(pulls.expected),
            s(median),
            s(sorted[0]),
            s(sorted[sorted.len() - 1]),
            median.as_secs_f64() / pulls.expected.as_secs_f64()
        );
    }
    Ok(())
}

/// What the profile allows for `pullers` pulls of `bytes` from one node: the server's upload
/// carries every copy, each puller's download one; plus two round trips (each of a one-way
/// delay per shaped side).
pub fn expected_pull(profile: &LinkProfile, bytes: u64, pullers: usize) -> Duration {
    let total = bytes * pullers as u64;
    let up = profile.expected_transfer(total, true);
    let down = profile.expected_transfer(bytes, false);
    up.max(down) + profile.delay * 4
}

async fn measure(profile: LinkProfile, args: &FetchBenchArgs) -> anyhow::Result<Pulls> {
    let shutdown = CancellationToken::new();
    let result = pulls(profile, args, &shutdown).await;
    shutdown.cancel();
    result
}

async fn pulls(
    profile: LinkProfile,
    args: &FetchBenchArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Pulls> {
    let store = Arc::new(Mutex::new(BlobStore::default()));
    // The server's client is kept: its network stops once every client is dropped.
    let (server, server_client, server_addr) =
        stack(profile, Arc::clone(&store), None, shutdown).await?;
    let server_addr = PeerAddr::from_multiaddr(server_addr)?;
    let mut pullers = Vec::with_capacity(args.pullers);
    for _ in 0..args.pullers {
        let bootstrap = Some(server_addr.clone());
        let own: Arc<Mutex<BlobStore>> = Arc::default();
        let (id, client, _) = stack(profile, Arc::clone(&own), bootstrap, shutdown).await?;
        pullers.push((id, client, own));
    }
    // Let the connections settle (identify, gossipsub subscriptions) before timing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let config = FetchConfig {
        per_peer_concurrency: args.concurrency,
        ..FetchConfig::default()
    };
    let limits = Limits::default();
    let providers = [server];
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(7);
    let mut blob = |store: &Mutex<BlobStore>, round: u64| -> anyhow::Result<_> {
        let mut blob = vec![0u8; usize::try_from(args.bytes)?];
        rng.fill_bytes(&mut blob);
        let chunks = chunk_blob(&blob, args.chunk_size)?;
        let descriptor = chunks.descriptor();
        crate::network::store::lock(store)?.insert(round, Arc::new(blob), chunks);
        Ok(descriptor)
    };
    let mut measured = Vec::with_capacity(args.repeats);
    for round in 0..args.repeats as u64 {
        let descriptor = blob(&store, round)?;
        // With --both-ways, each puller's own blob, which the server pulls.
        let mut back = Vec::new();
        for (id, _, own) in pullers.iter().filter(|_| args.both_ways) {
            back.push(([*id], blob(own, round)?));
        }
        let started = Instant::now();
        let pulls = pullers
            .iter()
            .map(|(_, client, _)| fetch_blob(client, &descriptor, &providers, &limits, config));
        let backs = back.iter().map(|(holder, descriptor)| {
            fetch_blob(&server_client, descriptor, holder, &limits, config)
        });
        let (pulled, pulled_back) = futures::future::join(
            futures::future::join_all(pulls),
            futures::future::join_all(backs),
        )
        .await;
        for fetched in pulled.into_iter().chain(pulled_back) {
            fetched.context("pulling the blob")?;
        }
        measured.push(started.elapsed());
    }
    let mut expected = expected_pull(&profile, args.bytes, args.pullers);
    if args.both_ways {
        // The server's download carries one blob per puller too.
        let down = profile.expected_transfer(args.bytes * args.pullers as u64, false);
        expected = expected.max(down + profile.delay * 4);
    }
    Ok(Pulls { expected, measured })
}

/// A node's network stack on shaped loopback TCP, its events drained; its peer id, client
/// and the address it listens on.
async fn stack(
    profile: LinkProfile,
    store: Arc<Mutex<BlobStore>>,
    bootstrap: Option<PeerAddr>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(PeerId, Client, Multiaddr)> {
    let keypair = Keypair::generate_ed25519();
    let transport = network_transport(
        &keypair,
        &TransportConfig {
            quic: false,
            link: profile,
            ..TransportConfig::default()
        },
    )?;
    let mut config = NetworkConfig::new("bench".parse()?);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.bootstrap = bootstrap.into_iter().collect();
    let layout = ModelLayout::new(vec![TensorSpec {
        name: "w".into(),
        shape: vec![1],
    }])?;
    let running = network::start(
        &keypair,
        transport,
        config,
        Arc::new(layout),
        store,
        &mut prometheus_client::registry::Registry::default(),
        shutdown.child_token(),
    )?;
    let mut events = running.events;
    let listening = loop {
        match events.recv().await {
            Some(NetworkEvent::Listening(addr)) => break addr,
            Some(_) => {}
            None => anyhow::bail!("the network stopped before it listened"),
        }
    };
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Ok((running.peer_id, running.client, listening))
}
