//! Private mesh over loopback TCP: a bootstrap node started from a PSK file accepts a
//! peer with the same key and refuses peers with another key or none.

mod support;

use std::time::Duration;

use futures::StreamExt;
use meshtune_bootstrap::{
    BootstrapBehaviour, BootstrapConfig, Event, PeerAddr,
    behaviour::{BehaviourConfig, BootstrapBehaviourEvent},
    libp2p::{
        Multiaddr, Swarm, identify, identity::Keypair, pnet::PreSharedKey, swarm::SwarmEvent,
    },
};
use meshtune_net::transport::{self, TransportConfig};
use support::within;

/// With another key (or none) both sides read noise: multistream-select may wait for a
/// length prefix that never completes, so the refusal can surface as the upgrade
/// timeout (go-libp2p pnet behaves the same). A short one keeps those cases fast.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

fn swarm_with(psk: Option<PreSharedKey>, upgrade_timeout: Duration) -> Swarm<BootstrapBehaviour> {
    let keypair = Keypair::generate_ed25519();
    let config = TransportConfig {
        psk,
        upgrade_timeout,
        ..TransportConfig::default()
    };
    let transport = transport::network_transport(&keypair, &config).expect("transport");
    let behaviour = BootstrapBehaviour::new(&keypair, &BehaviourConfig::default());
    transport::build_swarm(&keypair, transport, behaviour, Duration::from_secs(60))
}

/// `Ok(())` once identify completed over the connection, `Err` with the dial error.
async fn try_connect(
    psk: Option<PreSharedKey>,
    upgrade_timeout: Duration,
    addr: &Multiaddr,
) -> Result<(), String> {
    let target = PeerAddr::from_multiaddr(addr.clone())
        .expect("ends in /p2p")
        .peer_id;
    let mut swarm = swarm_with(psk, upgrade_timeout);
    swarm.dial(addr.clone()).expect("dial starts");
    within("dial outcome", async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(BootstrapBehaviourEvent::Identify(
                    identify::Event::Received { peer_id, .. },
                )) if peer_id == target => return Ok(()),
                SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error.to_string()),
                _ => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn only_peers_with_the_same_psk_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = PreSharedKey::new([0x5a; 32]);
    let psk_file = dir.path().join("swarm.key");
    std::fs::write(&psk_file, key.to_key_file()).expect("write psk");

    let mut config = BootstrapConfig::new(dir.path().join("bootstrap.key"));
    config.listen = vec![
        "/ip4/127.0.0.1/tcp/0".parse().expect("tcp"),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("quic"),
    ];
    config.psk_file = Some(psk_file);
    let mut node = meshtune_bootstrap::start(&config).await.expect("start");
    let addr = within("listening", async {
        loop {
            match node.next_event().await {
                Some(Event::Listening { address }) => return address,
                Some(_) => {}
                None => panic!("stopped"),
            }
        }
    })
    .await;
    // The QUIC listen address was skipped: a PSK mesh is TCP only.
    let listening = node.client().listen_addrs().await.expect("listen addrs");
    assert_eq!(listening.len(), 1, "{listening:?}");
    assert!(!transport::is_quic(&listening[0]));

    let wrong = try_connect(Some(PreSharedKey::new([0xa5; 32])), REFUSAL_TIMEOUT, &addr)
        .await
        .expect_err("a peer with another key connected");
    eprintln!("another key: {wrong}");
    let none = try_connect(None, REFUSAL_TIMEOUT, &addr)
        .await
        .expect_err("a peer without a key connected");
    eprintln!("no key: {none}");
    try_connect(Some(key), transport::DEFAULT_UPGRADE_TIMEOUT, &addr)
        .await
        .expect("a peer with the same key connects");

    node.shutdown(support::DEADLINE).await.expect("stops");
}
