//! Sparse gossip averaging (`topology = "gossip:K[:STEP]"`): each round a node mixes with at
//! most K neighbours (connected mesh peers, kept while they stay connected, new ones picked
//! by a hash of the pair) instead of the whole mesh, so the bytes a node
//! sends and receives per round stay flat as the mesh grows. Models are no longer identical;
//! their spread shrinks geometrically at a rate set by the overlay's spectral gap.
//!
//! The algorithm is compressed gossip with error feedback per link, after CHOCO-gossip
//! (Koloskova, Stich and Jaggi, ICML 2019), which keeps compression (top-k, int8) safe
//! without a shared base:
//!
//! - node i keeps, for each neighbour j it pulls from, a *copy* of j's model that j keeps
//!   too, bit for bit (j keeps one per distinct copy its pullers hold, by hash);
//! - after local training, j encodes q = Q(x_j − copy) with the delta codec for each copy its
//!   pullers hold, and both ends add the decoded q to that copy; what the codec drops stays in
//!   x_j − copy and is sent later (the error feedback is built in);
//! - i then mixes: x_i += STEP / (k + 1) · Σ_j (copy_j − x_i) over the k neighbours heard.
//!
//! A puller names the hash of its copy when it asks ([`ChunkRequest::LinkDelta`]); a copy the
//! sender no longer knows (a new link, a restart, a copy that missed rounds the sender has
//! moved past) gets the q from the *anchor*, the model every node started from, which both
//! ends hold. So a new neighbour costs one q, never a whole model, and a copy that missed
//! rounds catches up with one q. Pullers that got the same q hold the same copy, so a node
//! encodes one q per distinct copy (its pullers mostly share a few), not one per puller.
//! Manifests are not gossiped: a node asks each neighbour, so no traffic grows with the mesh.
//!

//! A node dials discovered peers only below L = max(3K, 12) links and walks Kademlia at a quarter
//! of the rate once it has them (links its lookups open stay: gossipsub keeps every connection
//! alive). Its lookups end on 8 peers, not 20; it runs no periodic Kademlia bootstrap and cuts the
//! one libp2p-kad starts by itself on a new node after its first step (Kademlia was most of the
//! bytes beyond the deltas at 200 nodes). Memory: model + anchor + K neighbour copies + one copy
//! of its own model per distinct copy its pullers hold (and the copies the round's q's leave).
//! Models differ; their spread shrinks geometrically (rate in docs/BENCHMARKS.md). Not in this
//! mode: base majorities, final-state agreement, robust aggregation across neighbours (a
//! neighbour's q enters with weight STEP/(k+1); `max_delta_norm` and finiteness are checked).
//!
//! [`GossipMachine`] is the round as a pure state machine, in the shape of the all-to-all
//! [`RoundMachine`](super::round::RoundMachine): [`GossipMachine::handle`] takes an input and
//! the time, returns actions, and holds the neighbours and their copies. One round `r`:
//! 1. [`GossipAction::Train`]; the shell trains and reports [`GossipInput::Trained`] with the
//!    connected mesh peers;
//! 2. [`GossipAction::Publish`]: the shell encodes this node's q's for the copies its pullers
//!    hold and reports [`GossipInput::Published`];
//! 3. the machine picks the neighbours and asks each whose copy is behind for its q
//!    ([`GossipAction::Hear`], all with one deadline); [`GossipInput::Heard`] updates the
//!    copy (from the anchor when the neighbour did not know ours);
//! 4. when every neighbour was heard, or at the deadline ([`GossipInput::Tick`]),
//!    [`GossipAction::Mix`] names the neighbours heard (in neighbour order); the shell mixes
//!    with [`GossipMachine::mix`], records and checkpoints, and reports
//!    [`GossipInput::Mixed`]; round `r + 1` starts, or [`GossipAction::Finish`].
//!
//! Owns: the neighbour set and the copies of the neighbours' models. Must not touch: I/O,
//! clocks (time is passed in) or this node's own model (the shell holds it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meshtune_protocol::{ModelHash, TensorSet};

use super::PeerKey;

/// How a node averages with the mesh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Topology {
    /// Every node combines every node's delta each round: one model everywhere.
    All,
    /// CHOCO-gossip with at most `degree` neighbours, mixing step `step` in (0, 1].
    Gossip { degree: usize, step: f32 },
}

/// A topology that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    #[error("unknown topology `{0}`: use all or gossip:K[:STEP]")]
    Unknown(String),
    #[error("topology `{0}`: K must be at least 1")]
    ZeroDegree(String),
    #[error("topology `{0}`: STEP must be in (0, 1]")]
    Step(String),
}

impl Topology {
    /// How many connections a node dials discovered peers up to: all-to-all averaging pulls
    /// from every node, gossip from K neighbours chosen among the connected peers, so a few
    /// times K links (the neighbours, spares for churn, the gossipsub mesh) are enough.
    pub fn dial_discovered_below(&self) -> Option<usize> {
        match self {
            Topology::All => None,
            Topology::Gossip { degree, .. } => Some((3 * degree).max(12)),
        }
    }
}

impl std::str::FromStr for Topology {
    type Err = TopologyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "all" {
            return Ok(Topology::All);
        }
        let usage = || TopologyError::Unknown(text.to_owned());
        let rest = text.strip_prefix("gossip:").ok_or_else(usage)?;
        let (degree, step) = match rest.split_once(':') {
            Some((k, s)) => (k, s.parse::<f32>().map_err(|_| usage())?),
            None => (rest, 0.5),
        };
        let degree: usize = degree.parse().map_err(|_| usage())?;
        if degree == 0 {
            return Err(TopologyError::ZeroDegree(text.to_owned()));
        }
        if !(step > 0.0 && step <= 1.0) {
            return Err(TopologyError::Step(text.to_owned()));
        }
        Ok(Topology::Gossip { degree, step })
    }
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topology::All => write!(f, "all"),
            Topology::Gossip { degree, step } => write!(f, "gossip:{degree}:{step}"),
        }
    }
}

/// Two tensor sets that should share a layout do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tensor layouts differ")]
pub struct LayoutMismatch;

/// `target += scale * source`, tensor by tensor (same layout).
pub fn add_scaled(
    target: &mut TensorSet,
    source: &TensorSet,
    scale: f32,
) -> Result<(), LayoutMismatch> {
    if target.layout() != source.layout() {
        return Err(LayoutMismatch);
    }
    for ((_, t), s) in target.values_mut().zip(source.tensors()) {
        for (x, y) in t.iter_mut().zip(&s.values) {
            *x += scale * y;
        }
    }
    Ok(())
}

/// The mixing step: `model += step / (k + 1) * Σ_j (copy_j − model)` over the k copies.
pub fn mix(model: &mut TensorSet, copies: &[&TensorSet], step: f32) -> Result<(), LayoutMismatch> {
    if copies.iter().any(|copy| copy.layout() != model.layout()) {
        return Err(LayoutMismatch);
    }
    let weight = step / (copies.len() as f32 + 1.0);
    for (index, (_, values)) in model.values_mut().enumerate() {
        let sources: Vec<&[f32]> = copies
            .iter()
            .map(|c| c.tensors()[index].values.as_slice())
            .collect();
        for (i, x) in values.iter_mut().enumerate() {
            let pull: f32 = sources.iter().map(|c| c[i] - *x).sum();
            *x += weight * pull;
        }
    }
    Ok(())
}

/// A peer id's bytes, for ranking links by a hash both ends compute alike.
pub trait PeerBytes {
    fn peer_bytes(&self) -> Vec<u8>;
}

/// Up to `degree` neighbours among `candidates` (the connected peers of the mesh). Sticky:
/// the `current` neighbours that are still candidates stay (a new neighbour's first q comes
/// from the anchor, coarser than one for a copy kept round after round); free places go to
/// the candidates ranked first by a hash of the unordered pair, so both ends of a link tend
/// to pick each other and the overlay is random.
pub fn choose_neighbours<P: PeerKey + PeerBytes>(
    me: P,
    current: &[P],
    candidates: &[P],
    degree: usize,
) -> Vec<P> {
    let mut chosen: Vec<P> = current
        .iter()
        .filter(|p| **p != me && candidates.contains(p))
        .take(degree)
        .copied()
        .collect();
    let mine = me.peer_bytes();
    let mut ranked: Vec<([u8; 32], P)> = candidates
        .iter()
        .filter(|p| **p != me && !chosen.contains(p))
        .map(|p| {
            let theirs = p.peer_bytes();
            let (a, b) = if mine < theirs {
                (&mine, &theirs)
            } else {
                (&theirs, &mine)
            };
            let mut hasher = blake3::Hasher::new();
            hasher.update(a);
            hasher.update(b);
            (*hasher.finalize().as_bytes(), *p)
        })
        .collect();
    ranked.sort();
    ranked.dedup_by(|a, b| a.1 == b.1);
    let free = degree.saturating_sub(chosen.len());
    chosen.extend(ranked.into_iter().take(free).map(|(_, p)| p));
    chosen
}

/// A neighbour's model as this node keeps it: the copy its q's build, bit for bit the one the
/// neighbour keeps for this link.
#[derive(Debug, Clone)]
pub struct NeighbourCopy {
    pub model: TensorSet,
    pub hash: ModelHash,
    /// The neighbour's round the copy is of.
    pub round: u64,
}

/// What one neighbour sent for a round.
#[derive(Debug, Clone)]
pub enum Heard {
    /// Its q for this link, decoded: the copy it applies to (ours, or the anchor when we
    /// named none it knows), its round, and the payload bytes fetched.
    Delta {
        base: ModelHash,
        round: u64,
        q: Box<TensorSet>,
        payload: u64,
    },
    /// Nothing usable, and why.
    Nothing(NotHeard),
}

/// Why a neighbour's q for a round is not usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotHeard {
    #[error("no q for the round before the deadline")]
    Deadline,
    #[error("the neighbour left")]
    Left,
    /// Its manifest failed the checks every manifest passes (mesh, sender, layout).
    #[error("{0}")]
    BadManifest(&'static str),
    #[error(
        "its q applies to copy {copy}, neither ours nor the anchor {anchor} (did it start from \
         another model?)"
    )]
    OtherModel { copy: ModelHash, anchor: ModelHash },
    /// The q could not be fetched, did not decode, or was out of bounds (the fetch's error).
    #[error("its q is unusable: {0}")]
    Unusable(String),
}

/// How a gossip node mixes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GossipConfig {
    pub degree: usize,
    pub step: f32,
    /// How long a round waits for its neighbours' q's.
    pub hear_timeout: Duration,
    /// Stop after this many rounds (counted from round 0); `None` runs until stopped.
    pub rounds: Option<u64>,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum GossipInput<P> {
    /// Local training of `round` finished; `candidates` are the connected mesh peers now.
    Trained { round: u64, candidates: Vec<P> },
    /// This node's q's of `round` are served.
    Published { round: u64 },
    /// A neighbour's answer for `round`.
    Heard { peer: P, round: u64, heard: Heard },
    /// The shell mixed, recorded and checkpointed `round`.
    Mixed { round: u64 },
    /// Time passed.
    Tick,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum GossipAction<P> {
    /// Train round `round` locally.
    Train { round: u64 },
    /// Encode and serve this round's q's; pullers outside `candidates` are forgotten.
    Publish { round: u64, candidates: Vec<P> },
    /// Ask `peer` for its q of `round` (or later) for our copy `copy`, until `deadline`.
    Hear {
        peer: P,
        round: u64,
        copy: Option<ModelHash>,
        deadline: Instant,
    },
    /// Mix with the copies of `heard` ([`GossipMachine::mix`]); `fresh` of them started from
    /// the anchor this round; `payload` bytes were fetched.
    Mix {
        round: u64,
        heard: Vec<P>,
        fresh: usize,
        payload: u64,
    },
    /// Every configured round is done.
    Finish,
}

/// Where a round is.
#[derive(Debug, Clone, PartialEq)]
enum Phase<P> {
    Training,
    Publishing,
    Hearing {
        deadline: Instant,
        pending: BTreeSet<P>,
        heard: BTreeSet<P>,
        fresh: usize,
        payload: u64,
    },
    Mixing,
    Finished,
}

/// The sparse gossip round of one node (see the module docs).
#[derive(Debug)]
pub struct GossipMachine<P> {
    me: P,
    config: GossipConfig,
    round: u64,
    anchor: TensorSet,
    anchor_hash: ModelHash,
    neighbours: Vec<P>,
    candidates: Vec<P>,
    copies: BTreeMap<P, NeighbourCopy>,
    phase: Phase<P>,
}

impl<P: PeerKey + PeerBytes> GossipMachine<P> {
    /// A node at the start of `round`; `anchor` is the model every node of the mesh started
    /// from (a q for a copy the sender no longer knows is taken from it).
    pub fn new(me: P, round: u64, config: GossipConfig, anchor: TensorSet) -> Self {
        Self {
            me,
            config,
            round,
            anchor_hash: ModelHash::of_tensors(&anchor),
            anchor,
            neighbours: Vec::new(),
            candidates: Vec::new(),
            copies: BTreeMap::new(),
            phase: Phase::Training,
        }
    }

    /// A fresh node joined a running mesh from `peer`'s model of `peer_round` (its q from the
    /// anchor): that peer is the first neighbour, with its copy already here, and this node
    /// continues at the next round.
    pub fn joined(&mut self, peer: P, peer_round: u64, model: TensorSet) {
        self.copies.insert(
            peer,
            NeighbourCopy {
                hash: ModelHash::of_tensors(&model),
                model,
                round: peer_round,
            },
        );
        self.neighbours = vec![peer];
        self.round = peer_round + 1;
    }

    /// The first actions: train the current round, or finish when every round is done.
    pub fn start(&mut self) -> Vec<GossipAction<P>> {
        self.next_round_actions()
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn anchor_hash(&self) -> ModelHash {
        self.anchor_hash
    }

    pub fn neighbours(&self) -> &[P] {
        &self.neighbours
    }

    /// When the machine next needs a [`GossipInput::Tick`] (the hearing deadline), if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Hearing { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// Processes one input.
    pub fn handle(
        &mut self,
        now: Instant,
        input: GossipInput<P>,
    ) -> Result<Vec<GossipAction<P>>, LayoutMismatch> {
        Ok(match input {
            GossipInput::Trained { round, candidates } if self.is(round, &Phase::Training) => {
                self.phase = Phase::Publishing;
                self.candidates.clone_from(&candidates);
                vec![GossipAction::Publish { round, candidates }]
            }
            GossipInput::Published { round } if self.is(round, &Phase::Publishing) => {
                self.start_hearing(now)
            }
            GossipInput::Heard { peer, round, heard } if round == self.round => {
                self.on_heard(peer, heard)?;
                self.close_hearing_if(|pending, _| pending.is_empty())
            }
            GossipInput::Tick => self.close_hearing_if(|_, deadline| now >= deadline),
            GossipInput::Mixed { round } if self.is(round, &Phase::Mixing) => {
                self.round += 1;
                self.next_round_actions()
            }
            // Late or out-of-turn inputs (a q after the deadline, a repeated report): nothing.
            _ => Vec::new(),
        })
    }

    /// `model += step / (k + 1) * Σ (copy − model)` over the copies of `heard`.
    pub fn mix(&self, model: &mut TensorSet, heard: &[P]) -> Result<(), LayoutMismatch> {
        let copies: Vec<&TensorSet> = heard
            .iter()
            .filter_map(|p| self.copies.get(p).map(|c| &c.model))
            .collect();
        mix(model, &copies, self.config.step)
    }

    fn is(&self, round: u64, phase: &Phase<P>) -> bool {
        round == self.round && self.phase == *phase
    }

    fn next_round_actions(&mut self) -> Vec<GossipAction<P>> {
        if self.config.rounds.is_some_and(|n| self.round >= n) {
            self.phase = Phase::Finished;
            return vec![GossipAction::Finish];
        }
        self.phase = Phase::Training;
        vec![GossipAction::Train { round: self.round }]
    }

    /// Picks the neighbours and asks every one whose copy is behind this round for its q.
    fn start_hearing(&mut self, now: Instant) -> Vec<GossipAction<P>> {
        self.neighbours = choose_neighbours(
            self.me,
            &self.neighbours,
            &self.candidates,
            self.config.degree,
        );
        let deadline = now + self.config.hear_timeout;
        let (mut pending, mut heard) = (BTreeSet::new(), BTreeSet::new());
        let mut actions = Vec::new();
        for &peer in &self.neighbours {
            let held = self.copies.get(&peer);
            // A copy already of this round or later (the neighbour was ahead when we last
            // asked) needs nothing new.
            if held.is_some_and(|c| c.round >= self.round) {
                heard.insert(peer);
                continue;
            }
            pending.insert(peer);
            actions.push(GossipAction::Hear {
                peer,
                round: self.round,
                copy: held.map(|c| c.hash),
                deadline,
            });
        }
        self.phase = Phase::Hearing {
            deadline,
            pending,
            heard,
            fresh: 0,
            payload: 0,
        };
        actions.extend(self.close_hearing_if(|pending, _| pending.is_empty()));
        actions
    }

    /// Applies a neighbour's q to its copy (a new copy from the anchor when the q is not
    /// for the one we hold).
    fn on_heard(&mut self, peer: P, answer: Heard) -> Result<(), LayoutMismatch> {
        let Phase::Hearing {
            pending,
            heard,
            fresh,
            payload,
            ..
        } = &mut self.phase
        else {
            return Ok(());
        };
        if !pending.remove(&peer) {
            return Ok(());
        }
        let Heard::Delta {
            base,
            round,
            q,
            payload: bytes,
        } = answer
        else {
            return Ok(());
        };
        if self.copies.get(&peer).is_none_or(|c| c.hash != base) {
            // The neighbour did not know our copy (or we had none): its q starts from the
            // anchor.
            *fresh += 1;
            let anchor = NeighbourCopy {
                model: self.anchor.clone(),
                hash: self.anchor_hash,
                round: 0,
            };
            self.copies.insert(peer, anchor);
        }
        let Some(copy) = self.copies.get_mut(&peer) else {
            return Ok(());
        };
        add_scaled(&mut copy.model, &q, 1.0)?;
        copy.hash = ModelHash::of_tensors(&copy.model);
        copy.round = round;
        *payload += bytes;
        heard.insert(peer);
        Ok(())
    }

    /// Ends the hearing when `done(pending, deadline)`: copies of peers that are no longer
    /// neighbours are dropped, and the neighbours heard are mixed with.
    fn close_hearing_if(
        &mut self,
        done: impl FnOnce(&BTreeSet<P>, Instant) -> bool,
    ) -> Vec<GossipAction<P>> {
        let Phase::Hearing {
            deadline,
            pending,
            heard,
            fresh,
            payload,
        } = &self.phase
        else {
            return Vec::new();
        };
        if !done(pending, *deadline) {
            return Vec::new();
        }
        let heard: Vec<P> = self
            .neighbours
            .iter()
            .filter(|p| heard.contains(p))
            .copied()
            .collect();
        let action = GossipAction::Mix {
            round: self.round,
            heard,
            fresh: *fresh,
            payload: *payload,
        };
        let neighbours = &self.neighbours;
        self.copies.retain(|p, _| neighbours.contains(p));
        self.phase = Phase::Mixing;
        vec![action]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtune_protocol::Tensor;

    use crate::averaging::test_peer::PeerId;

    impl PeerBytes for PeerId {
        fn peer_bytes(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }
    }

    type Machine = GossipMachine<PeerId>;
    type Action = GossipAction<PeerId>;
    type Input = GossipInput<PeerId>;

    fn set(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![
            Tensor::new("w", vec![values.len()], values.to_vec()).expect("tensor"),
        ])
        .expect("set")
    }

    #[test]
    fn topology_parses_and_names_bad_values() {
        assert_eq!("all".parse::<Topology>(), Ok(Topology::All));
        assert_eq!(
            "gossip:4".parse::<Topology>(),
            Ok(Topology::Gossip {
                degree: 4,
                step: 0.5
            })
        );
        assert_eq!(
            "gossip:2:1".parse::<Topology>(),
            Ok(Topology::Gossip {
                degree: 2,
                step: 1.0
            })
        );
        for bad in [
            "gossip",
            "gossip:0",
            "gossip:4:0",
            "gossip:4:1.5",
            "ring:4",
            "gossip:x",
        ] {
            let err = bad.parse::<Topology>().expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
        let t: Topology = "gossip:3:0.25".parse().expect("parse");
        assert_eq!(t.to_string().parse::<Topology>(), Ok(t));
    }

    #[test]
    fn mixing_moves_toward_the_neighbours_and_keeps_the_mean_of_a_symmetric_pair() {
        // Two nodes, exact copies, full step: both land on the mean.
        let (a, b) = (set(&[0.0, 2.0]), set(&[4.0, -2.0]));
        let mut xa = a.clone();
        mix(&mut xa, &[&b], 1.0).expect("mix");
        let mut xb = b.clone();
        mix(&mut xb, &[&a], 1.0).expect("mix");
        assert_eq!(xa.get("w").expect("w").values, vec![2.0, 0.0]);
        assert_eq!(xb.get("w").expect("w").values, vec![2.0, 0.0]);
        // Half a step with two neighbours: x + 0.5/3 * ((c1 - x) + (c2 - x)).
        let mut x = set(&[0.0]);
        mix(&mut x, &[&set(&[3.0]), &set(&[6.0])], 0.5).expect("mix");
        assert!((x.get("w").expect("w").values[0] - 1.5).abs() < 1e-6);
        // Different layouts are refused.
        let mut x = set(&[0.0]);
        assert!(mix(&mut x, &[&set(&[1.0, 2.0])], 0.5).is_err());
        // No neighbour heard: unchanged.
        let mut x = set(&[1.5]);
        mix(&mut x, &[], 0.5).expect("mix");
        assert_eq!(x.get("w").expect("w").values, vec![1.5]);
    }

    #[test]
    fn neighbours_are_bounded_exclude_me_and_agree_on_both_ends() {
        let peers: Vec<PeerId> = (0..12).map(|_| PeerId::random()).collect();
        let me = peers[0];
        let chosen = choose_neighbours(me, &[], &peers, 4);
        assert_eq!(chosen.len(), 4);
        assert!(!chosen.contains(&me));
        // Fewer candidates than the degree: all of them.
        assert_eq!(choose_neighbours(me, &[], &peers[..3], 4).len(), 2);
        // The ranking of a link is the same seen from either end.
        let other = chosen[0];
        assert_eq!(choose_neighbours(other, &[], &[me, other], 1), vec![me]);
        // Sticky: current neighbours stay while connected, even when a new peer ranks first;
        // one that left is replaced.
        let newcomer = PeerId::random();
        let mut more = peers.clone();
        more.push(newcomer);
        assert_eq!(choose_neighbours(me, &chosen, &more, 4), chosen);
        let without: Vec<PeerId> = more.iter().filter(|p| **p != chosen[1]).copied().collect();
        let again = choose_neighbours(me, &chosen, &without, 4);
        assert_eq!(again.len(), 4);
        assert_eq!(&again[..3], &[chosen[0], chosen[2], chosen[3]]);
        assert!(!again.contains(&chosen[1]));
    }

    fn config(rounds: u64) -> GossipConfig {
        GossipConfig {
            degree: 2,
            step: 0.5,
            hear_timeout: Duration::from_secs(10),
            rounds: Some(rounds),
        }
    }

    fn q(base: ModelHash, round: u64, value: f32) -> Heard {
        Heard::Delta {
            base,
            round,
            q: Box::new(set(&[value, value])),
            payload: 100,
        }
    }

    /// Trains and publishes `round` with `peers` connected; returns the Hear actions.
    fn train_and_publish(m: &mut Machine, t: Instant, round: u64, peers: &[PeerId]) -> Vec<Action> {
        let trained = Input::Trained {
            round,
            candidates: peers.to_vec(),
        };
        let publish = m.handle(t, trained).expect("trained");
        assert_eq!(
            publish,
            [Action::Publish {
                round,
                candidates: peers.to_vec()
            }]
        );
        m.handle(t, Input::Published { round }).expect("published")
    }

    fn hears(actions: &[Action]) -> Vec<(PeerId, Option<ModelHash>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Hear { peer, copy, .. } => Some((*peer, *copy)),
                _ => None,
            })
            .collect()
    }

    /// A whole round: every neighbour is asked (from the anchor: no copy yet), mixed with in
    /// neighbour order once all answered, and the next round trains; after the last round the
    /// machine finishes.
    #[test]
    fn a_round_hears_every_neighbour_then_mixes_then_trains_the_next() {
        let (me, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let anchor = set(&[0.0, 0.0]);
        let mut m = Machine::new(me, 0, config(2), anchor.clone());
        assert_eq!(m.start(), [Action::Train { round: 0 }]);
        let t0 = Instant::now();
        let asked = train_and_publish(&mut m, t0, 0, &[me, a, b]);
        let mut expected = vec![(a, None), (b, None)];
        expected.sort();
        let mut got = hears(&asked);
        got.sort();
        assert_eq!(got, expected);
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(10)));
        let first = m.neighbours()[0];
        let second = m.neighbours()[1];
        let none = m.handle(
            t0,
            Input::Heard {
                peer: second,
                round: 0,
                heard: q(m.anchor_hash(), 0, 2.0),
            },
        );
        assert!(none.expect("heard").is_empty(), "one neighbour still out");
        let mixed = m.handle(
            t0,
            Input::Heard {
                peer: first,
                round: 0,
                heard: q(m.anchor_hash(), 0, 4.0),
            },
        );
        assert_eq!(
            mixed.expect("heard"),
            [Action::Mix {
                round: 0,
                heard: vec![first, second],
                fresh: 2,
                payload: 200
            }]
        );
        // x = 0 + 0.5 / 3 * ((4 - 0) + (2 - 0)) = 1 (first copy 4, second 2).
        let mut model = anchor.clone();
        m.mix(&mut model, &[first, second]).expect("mix");
        assert_eq!(model.get("w").expect("w").values, vec![1.0, 1.0]);
        assert_eq!(
            m.handle(t0, Input::Mixed { round: 0 }).expect("mixed"),
            [Action::Train { round: 1 }]
        );
        // Round 1: the copies are known, so each neighbour is asked for its q for our copy.
        let asked = train_and_publish(&mut m, t0, 1, &[a, b]);
        assert!(
            hears(&asked).iter().all(|(_, copy)| copy.is_some()),
            "{asked:?}"
        );
        let later = t0 + Duration::from_secs(11);
        assert!(matches!(
            m.handle(later, Input::Tick).expect("tick")[..],
            [Action::Mix { round: 1, .. }]
        ));
        assert_eq!(
            m.handle(later, Input::Mixed { round: 1 }).expect("mixed"),
            [Action::Finish]
        );
    }

    /// A neighbour that does not answer costs the deadline, not the round: a tick before it
    /// does nothing, a tick after it mixes with who answered, and the late answer is dropped.
    #[test]
    fn a_silent_neighbour_is_left_out_at_the_deadline_and_its_late_q_dropped() {
        let (me, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut m = Machine::new(me, 0, config(5), set(&[0.0, 0.0]));
        m.start();
        let t0 = Instant::now();
        train_and_publish(&mut m, t0, 0, &[a, b]);
        let anchor = m.anchor_hash();
        assert!(
            m.handle(
                t0,
                Input::Heard {
                    peer: a,
                    round: 0,
                    heard: q(anchor, 0, 1.0)
                }
            )
            .expect("a")
            .is_empty()
        );
        assert!(
            m.handle(t0 + Duration::from_secs(5), Input::Tick)
                .expect("early")
                .is_empty()
        );
        let mix = m
            .handle(t0 + Duration::from_secs(10), Input::Tick)
            .expect("deadline");
        assert_eq!(
            mix,
            [Action::Mix {
                round: 0,
                heard: vec![a],
                fresh: 1,
                payload: 100
            }]
        );
        let late = Input::Heard {
            peer: b,
            round: 0,
            heard: q(anchor, 0, 9.0),
        };
        assert!(
            m.handle(t0 + Duration::from_secs(11), late)
                .expect("late")
                .is_empty()
        );
        // b never got a copy, so it is asked from the anchor again next round.
        m.handle(t0, Input::Mixed { round: 0 }).expect("mixed");
        let asked = hears(&train_and_publish(&mut m, t0, 1, &[a, b]));
        assert!(asked.contains(&(b, None)), "{asked:?}");
        // An answer of Nothing counts as heard-from for the round's end, but not as mixed.
        for (peer, _) in &asked {
            m.handle(
                t0,
                Input::Heard {
                    peer: *peer,
                    round: 1,
                    heard: Heard::Nothing(NotHeard::Left),
                },
            )
            .expect("nothing");
        }
        assert_eq!(
            m.deadline(),
            None,
            "the round closed without waiting for the deadline"
        );
    }

    /// A q for a copy we do not hold (the neighbour restarted or forgot it) starts a fresh
    /// copy from the anchor; a copy already of this round (the neighbour was ahead) needs no
    /// request; a peer that is no longer a candidate loses its copy.
    #[test]
    fn copies_restart_from_the_anchor_skip_current_ones_and_leave_with_their_peer() {
        let (me, a) = (PeerId::random(), PeerId::random());
        let anchor = set(&[1.0, 1.0]);
        let mut m = Machine::new(me, 0, config(9), anchor.clone());
        m.start();
        let t0 = Instant::now();
        train_and_publish(&mut m, t0, 0, &[a]);
        let anchor_hash = m.anchor_hash();
        // a's round-0 q arrives from round 2 (a was ahead): our copy is of round 2.
        m.handle(
            t0,
            Input::Heard {
                peer: a,
                round: 0,
                heard: q(anchor_hash, 2, 1.0),
            },
        )
        .expect("q");
        m.handle(t0, Input::Mixed { round: 0 }).expect("mixed");
        let round1 = train_and_publish(&mut m, t0, 1, &[a]);
        assert_eq!(
            round1,
            [Action::Mix {
                round: 1,
                heard: vec![a],
                fresh: 0,
                payload: 0
            }],
            "copy already current"
        );
        m.handle(t0, Input::Mixed { round: 1 }).expect("mixed");
        m.handle(t0, Input::Mixed { round: 2 })
            .expect("out of turn: ignored");
        assert_eq!(m.round(), 2);
        let round2 = train_and_publish(&mut m, t0, 2, &[a]);
        assert_eq!(
            round2,
            [Action::Mix {
                round: 2,
                heard: vec![a],
                fresh: 0,
                payload: 0
            }]
        );
        m.handle(t0, Input::Mixed { round: 2 }).expect("mixed");
        let asked = train_and_publish(&mut m, t0, 3, &[a]);
        let copy = hears(&asked)[0].1.expect("our copy is named");
        assert_eq!(
            copy,
            ModelHash::of_tensors(&set(&[2.0, 2.0])),
            "anchor + round-0 q"
        );
        // a does not know our copy: its q comes from the anchor, a fresh copy.
        let mix = m
            .handle(
                t0,
                Input::Heard {
                    peer: a,
                    round: 3,
                    heard: q(anchor_hash, 3, 0.5),
                },
            )
            .expect("q");
        assert_eq!(
            mix,
            [Action::Mix {
                round: 3,
                heard: vec![a],
                fresh: 1,
                payload: 100
            }]
        );
        let mut model = set(&[1.5, 1.5]);
        m.mix(&mut model, &[a]).expect("mix");
        // The fresh copy is anchor + 0.5 = 1.5, where the model already is: nothing moves.
        assert_eq!(model.get("w").expect("w").values, vec![1.5, 1.5]);
        m.handle(t0, Input::Mixed { round: 3 }).expect("mixed");
        // a left: no neighbour, nothing to hear, the round mixes alone.
        let alone = train_and_publish(&mut m, t0, 4, &[]);
        assert_eq!(
            alone,
            [Action::Mix {
                round: 4,
                heard: vec![],
                fresh: 0,
                payload: 0
            }]
        );
    }

    /// A node that joined from a peer's model continues at the peer's next round, with that
    /// peer as its first neighbour and its copy current.
    #[test]
    fn a_joiner_continues_after_its_peers_round_with_the_copy_in_hand() {
        let (me, peer, other) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut m = Machine::new(me, 0, config(10), set(&[0.0, 0.0]));
        m.joined(peer, 6, set(&[3.0, 3.0]));
        assert_eq!(m.round(), 7);
        assert_eq!(m.start(), [Action::Train { round: 7 }]);
        let asked = train_and_publish(&mut m, Instant::now(), 7, &[peer, other]);
        let asked = hears(&asked);
        assert!(
            asked
                .iter()
                .any(|(p, copy)| *p == peer
                    && *copy == Some(ModelHash::of_tensors(&set(&[3.0, 3.0]))))
        );
        assert!(asked.contains(&(other, None)));
        // A joiner past the configured rounds only finishes.
        let mut done = Machine::new(me, 0, config(3), set(&[0.0]));
        done.joined(peer, 4, set(&[1.0]));
        assert_eq!(done.start(), [Action::Finish]);
    }

    /// Inputs for another round or phase change nothing.
    #[test]
    fn out_of_turn_inputs_are_ignored() {
        let (me, a) = (PeerId::random(), PeerId::random());
        let mut m = Machine::new(me, 3, config(9), set(&[0.0]));
        m.start();
        let t0 = Instant::now();
        assert!(
            m.handle(t0, Input::Published { round: 3 })
                .expect("early")
                .is_empty()
        );
        assert!(
            m.handle(
                t0,
                Input::Trained {
                    round: 2,
                    candidates: vec![a]
                }
            )
            .expect("old")
            .is_empty()
        );
        assert!(m.handle(t0, Input::Tick).expect("tick").is_empty());
        assert!(
            m.handle(t0, Input::Mixed { round: 3 })
                .expect("mixed early")
                .is_empty()
        );
        assert_eq!(m.round(), 3);
        // A q of the wrong layout is an error, not a silent mix.
        train_and_publish(&mut m, t0, 3, &[a]);
        let wrong = Heard::Delta {
            base: m.anchor_hash(),
            round: 3,
            q: Box::new(set(&[1.0, 2.0])),
            payload: 1,
        };
        assert_eq!(
            m.handle(
                t0,
                Input::Heard {
                    peer: a,
                    round: 3,
                    heard: wrong
                }
            )
            .map(|_| ()),
            Err(LayoutMismatch)
        );
    }
}
