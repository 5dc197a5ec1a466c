//! Generation with a KV cache: greedy search and beam search with HF's semantics
//! (transformers 5.x `GenerationMixin._beam_search`: `num_beams`, `length_penalty`,
//! `early_stopping` = false / true / "never", `max_new_tokens`), batched with padding.
//!
//! Owns: the decoding loops. The network runs on the backend; the (tiny) search bookkeeping
//! runs on the host with the same float32 arithmetic HF uses, so ids match exactly.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::T5Config;
use crate::error::ModelError;
use crate::t5::{EncoderOutput, T5, reorder_caches};
use crate::tokenizer::pad_batch;

/// HF `early_stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False` (HF default): stop when the best running beam, scored at the current length,
    /// cannot beat the worst finished one.
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Stop,
    /// `"never"`: the canonical criterion (uses `max_length` when `length_penalty > 0`).
    Never,
}

/// Decoding settings. Nothing is taken from hidden defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub decoder_start_token_id: u32,
}

impl GenerationConfig {
    /// HF defaults for `config`'s special tokens: length penalty 1, `early_stopping=False`.
    pub fn for_model(config: &T5Config, max_new_tokens: usize, num_beams: usize) -> Self {
        Self {
            max_new_tokens,
            num_beams,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            eos_token_id: config.eos_token_id,
            pad_token_id: config.pad_token_id,
            decoder_start_token_id: config.decoder_start_id(),
        }
    }
}

/// One generated sequence: ids without the start token and without the final `</s>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub token_ids: Vec<u32>,
    /// Whether `</s>` was produced (false: cut by `max_new_tokens`).
    pub finished: bool,
}

/// Generates for every row of `sources` (token ids, unpadded) in one padded batch.
pub fn generate<B: Backend>(
    model: &T5<B>,
    sources: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Vec<Generated>, ModelError> {
    if sources.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = sources.iter().position(Vec::is_empty) {
        return Err(ModelError::Input(format!("source {i} has no tokens")));
    }
    if config.num_beams == 0 {
        return Err(ModelError::Input("num_beams must be >= 1".into()));
    }
    let vocab = model.vocab_size();
    if let Some(bad) = sources.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the model vocabulary of {vocab}"
        )));
    }
    let device = model.device();
    let (ids, mask, len) = pad_batch(sources, config.pad_token_id);
    let batch = sources.len();
    let input_ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, len]), &device);
    let attention_mask =
        Tensor::<B, 2, Int>::from_data(TensorData::new(mask, [batch, len]), &device);
    let encoded = model.encode(input_ids, attention_mask);
    if config.max_new_tokens == 0 {
        return Ok(vec![
            Generated {
                token_ids: Vec::new(),
                finished: false,
            };
            batch
        ]);
    }
    if config.num_beams == 1 {
        Ok(greedy(model, &encoded, batch, config))
    } else {
        Ok(beam_search(model, &encoded, batch, config))
    }
}

fn host_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

fn token_tensor<B: Backend>(tokens: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let values: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(values, [tokens.len(), 1]), device)
}

/// First index of the maximum, like `torch.argmax`.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn greedy<B: Backend>(
    model: &T5<B>,
    encoded: &EncoderOutput<B>,
    batch: usize,
    config: &GenerationConfig,
) -> Vec<Generated> {
    let device = model.device();
    let vocab = model.vocab_size();
    let mut caches = model.init_caches(encoded);
    let mut outputs: Vec<Generated> = vec![
        Generated {
            token_ids: Vec::new(),
            finished: false,
        };
        batch
    ];
    let mut tokens = vec![config.decoder_start_token_id; batch];
    for step in 0..config.max_new_tokens {
        let logits = model.decode_step(
            token_tensor::<B>(&tokens, &device),
            step,
            &mut caches,
            &encoded.mask_bias,
        );
        let values = host_values(logits);
        for (row, out) in outputs.iter_mut().enumerate() {
            if out.finished {
                tokens[row] = config.pad_token_id;
                continue;
            }
            let next = argmax(&values[row * vocab..(row + 1) * vocab]) as u32;
            tokens[row] = next;
            if next == config.eos_token_id {
                out.finished = true;
            } else {
                out.token_ids.push(next);
            }
        }
        if outputs.iter().all(|o| o.finished) {
            break;
        }
    }
    outputs
}

const NEG_LARGE: f32 = -1.0e9;

#[derive(Debug, Clone)]
struct Candidate {
    score: f32,
    beam: usize,
    token: u32,
}

/// Per-example beam state, mirroring HF's tensors of shape `[num_beams]`.
#[derive(Debug, Clone)]
struct BeamState {
    running_tokens: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    finished_tokens: Vec<Vec<u32>>,
    finished_scores: Vec<f32>,
    is_finished: Vec<bool>,
    improvement_possible: bool,
}

/// Indices of the `k` largest values, sorted descending; ties keep the lower index first.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

fn length_divisor(length: usize, penalty: f32) -> f32 {
    (length as f64).powf(penalty as f64) as f32
}

/// The settings of one beam-search step shared by every example of the batch.
struct BeamStep<'a> {
    config: &'a GenerationConfig,
    beams: usize,
    /// Candidates kept per example: `max(2, 1 + n_eos) * num_beams` with one eos id.
    keep: usize,
    vocab: usize,
    /// Length so far, counting the start token (as HF's `cur_len`).
    cur_len: usize,
    hits_max_length: bool,
}

impl BeamState {
    fn new(beams: usize) -> Self {
        Self {
            running_tokens: vec![Vec::new(); beams],
            running_scores: (0..beams)
                .map(|j| if j == 0 { 0.0 } else { NEG_LARGE })
                .collect(),
            finished_tokens: vec![Vec::new(); beams],
            finished_scores: vec![NEG_LARGE; beams],
            is_finished: vec![false; beams],
            improvement_possible: true,
        }
    }

    /// The top `keep` continuations over all beams of this example, from its rows of
    /// log-probabilities (`beams * vocab` values).
    fn candidates(&self, log_probs: &[f32], step: &BeamStep) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = Vec::with_capacity(step.beams * step.keep);
        for beam in 0..step.beams {
            let row = &log_probs[beam * step.vocab..(beam + 1) * step.vocab];
            let base = self.running_scores[beam];
            let scores: Vec<f32> = row.iter().map(|&lp| lp + base).collect();
            for token in top_k_indices(&scores, step.keep) {
                candidates.push(Candidate {
                    score: scores[token],
                    beam,
                    token: token as u32,
                });
            }
        }
        // Flattened index order (beam * vocab + token) breaks ties, as in torch.topk.
        candidates.sort_by(|x, y| {
            y.score
                .total_cmp(&x.score)
                .then(x.beam.cmp(&y.beam))
                .then(x.token.cmp(&y.token))
        });
        candidates.truncate(step.keep);
        candidates
    }

    /// One step of this example. Returns whether every candidate stopped, and for each new
    /// running beam the beam it continues and the token it appended.
    fn advance(&mut self, log_probs: &[f32], step: &BeamStep) -> (bool, Vec<(usize, u32)>) {
        let (config, beams) = (step.config, step.beams);
        let candidates = self.candidates(log_probs, step);
        let hits: Vec<bool> = candidates
            .iter()
            .map(|c| c.token == config.eos_token_id || step.hits_max_length)
            .collect();
        let all_hit = hits.iter().all(|&h| h);

        // Running beams for the next step: the best candidates that did not stop.
        let adjusted: Vec<f32> = candidates
            .iter()
            .zip(&hits)
            .map(|(c, &hit)| c.score + if hit { NEG_LARGE } else { 0.0 })
            .collect();
        let next = top_k_indices(&adjusted, beams);
        self.finish_candidates(&candidates, &hits, step);
        let mut running_tokens = Vec::with_capacity(beams);
        let mut running_scores = Vec::with_capacity(beams);
        let mut sources = Vec::with_capacity(beams);
        for &k in &next {
            let c = &candidates[k];
            let mut tokens = self.running_tokens[c.beam].clone();
            tokens.push(c.token);
            running_tokens.push(tokens);
            running_scores.push(adjusted[k]);
            sources.push((c.beam, c.token));
        }
        self.running_tokens = running_tokens;
        self.running_scores = running_scores;
        (all_hit, sources)
    }

    /// Merges the candidates that stopped into the finished hypotheses: only the top
    /// `num_beams` candidates may finish.
    fn finish_candidates(&mut self, candidates: &[Candidate], hits: &[bool], step: &BeamStep) {
        let (config, beams) = (step.config, step.beams);
        let beams_full =
            config.early_stopping == EarlyStopping::Stop && self.is_finished.iter().all(|&f| f);
        let divisor = length_divisor(step.cur_len, config.length_penalty);
        let mut merged_scores = self.finished_scores.clone();
        let mut merged_finished = self.is_finished.clone();
        for (k, c) in candidates.iter().enumerate() {
            let just_finished = hits[k] && k < beams;
            let mut score = c.score / divisor;
            score += if beams_full { NEG_LARGE } else { 0.0 };
            score += if self.improvement_possible {
                0.0
            } else {
                NEG_LARGE
            };
            score += if just_finished { 0.0 } else { NEG_LARGE };
            merged_scores.push(score);
            merged_finished.push(just_finished);
        }
        let chosen = top_k_indices(&merged_scores, beams);
        let mut finished_tokens = Vec::with_capacity(beams);
        let mut finished_scores = Vec::with_capacity(beams);
        let mut is_finished = Vec::with_capacity(beams);
        for &m in &chosen {
            finished_scores.push(merged_scores[m]);
            is_finished.push(merged_finished[m]);
            if m < beams {
                finished_tokens.push(self.finished_tokens[m].clone());
            } else {
                let c = &candidates[m - beams];
                let mut tokens = self.running_tokens[c.beam].clone();
                tokens.push(c.token);
                finished_tokens.push(tokens);
            }
        }
        self.finished_tokens = finished_tokens;
        self.finished_scores = finished_scores;
        self.is_finished = is_finished;
    }

    /// Whether a running beam can still beat the worst finished hypothesis (HF's early-stopping
    /// heuristic), after `cur_len` was advanced.
    fn update_improvement(&mut self, config: &GenerationConfig, cur_len: usize, max_length: usize) {
        let best_length =
            if config.early_stopping == EarlyStopping::Never && config.length_penalty > 0.0 {
                max_length - 1
            } else {
                cur_len - 1
            };
        let best_possible =
            self.running_scores[0] / length_divisor(best_length, config.length_penalty);
        let worst = self
            .finished_scores
            .iter()
            .copied()
            .fold(f32::INFINITY, f32::min);
        let can_improve = self
            .is_finished
            .iter()
            .any(|&f| best_possible > if f { worst } else { NEG_LARGE });
        self.improvement_possible &= can_improve;
    }

    /// The best finished hypothesis, cut at its `</s>`.
    fn into_generated(self, eos_token_id: u32) -> Generated {
        let tokens = &self.finished_tokens[0];
        match tokens.iter().position(|&t| t == eos_token_id) {
            Some(end) => Generated {
                token_ids: tokens[..end].to_vec(),
                finished: true,
            },
            None => Generated {
                token_ids: tokens.clone(),
                finished: false,
            },
        }
    }
}

fn beam_search<B: Backend>(
    model: &T5<B>,
    encoded: &EncoderOutput<B>,
    batch: usize,
    config: &GenerationConfig,
) -> Vec<Generated> {
    let device = model.device();
    let vocab = model.vocab_size();
    let beams = config.num_beams;
    // HF: max_length = prompt (the start token) + max_new_tokens.
    let max_length = 1 + config.max_new_tokens;

    let expand: Vec<i64> = (0..batch * beams).map(|i| (i / beams) as i64).collect();
    let expand = Tensor::<B, 1, Int>::from_data(TensorData::new(expand, [batch * beams]), &device);
    let expanded = EncoderOutput {
        hidden: encoded.hidden.clone().select(0, expand.clone()),
        mask_bias: encoded.mask_bias.clone().select(0, expand),
    };
    let mut caches = model.init_caches(&expanded);

    let mut states: Vec<BeamState> = (0..batch).map(|_| BeamState::new(beams)).collect();
    let mut last_tokens = vec![config.decoder_start_token_id; batch * beams];
    // cur_len counts the start token, as HF's does.
    let mut cur_len = 1usize;
    loop {
        let logits = model.decode_step(
            token_tensor::<B>(&last_tokens, &device),
            cur_len - 1,
            &mut caches,
            &expanded.mask_bias,
        );
        let log_probs = host_values(log_softmax(logits, 1));
        let step = BeamStep {
            config,
            beams,
            keep: 2 * beams,
            vocab,
            cur_len,
            hits_max_length: cur_len + 1 >= max_length,
        };
        let mut all_hit = true;
        let mut reorder: Vec<i64> = Vec::with_capacity(batch * beams);
        for (b, state) in states.iter_mut().enumerate() {
            let rows = &log_probs[b * beams * vocab..(b + 1) * beams * vocab];
            let (hit, sources) = state.advance(rows, &step);
            all_hit &= hit;
            for (i, (beam, token)) in sources.into_iter().enumerate() {
                reorder.push((b * beams + beam) as i64);
                last_tokens[b * beams + i] = token;
            }
        }
        cur_len += 1;
        for state in &mut states {
            state.update_improvement(config, cur_len, max_length);
        }
        let any_improvable = states.iter().any(|s| s.improvement_possible);
        let all_finished = states.iter().all(|s| s.is_finished.iter().all(|&f| f));
        let stop_all_full = all_finished && config.early_stopping == EarlyStopping::Stop;
        if !any_improvable || stop_all_full || all_hit {
            break;
        }
        let order =
            Tensor::<B, 1, Int>::from_data(TensorData::new(reorder, [batch * beams]), &device);
        reorder_caches(&mut caches, order);
    }
    states
        .into_iter()
        .map(|state| state.into_generated(config.eos_token_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_stable() {
        let values = [0.5, 2.0, 2.0, -1.0, 3.0];
        assert_eq!(top_k_indices(&values, 3), vec![4, 1, 2]);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
