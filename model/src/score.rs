//! Teacher-forced scoring: the per-example mean token cross-entropy HF reports as `loss`
//! for `model(input_ids, labels=...)`.
//!
//! Owns: building decoder inputs from labels (HF `_shift_right`) and the masked loss. Must
//! not batch or tokenize data: callers hand it tensors.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::ModelError;
use crate::t5::T5;
use crate::tokenizer::pad_batch;

/// Loss of one example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExampleLoss {
    /// Mean cross-entropy over the target tokens (including `</s>`).
    pub loss: f64,
    /// Number of target tokens.
    pub tokens: usize,
}

/// A padded teacher-forcing batch on the host.
#[derive(Debug, Clone)]
pub struct Seq2SeqBatch {
    pub batch: usize,
    pub source_len: usize,
    pub target_len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    /// `labels` shifted right with the decoder start token; padding is `pad_id`.
    pub decoder_input_ids: Vec<i64>,
    /// Target ids; padding positions are -100 (ignored), as in HF.
    pub labels: Vec<i64>,
}

impl Seq2SeqBatch {
    pub fn new(
        sources: &[Vec<u32>],
        targets: &[Vec<u32>],
        pad_id: u32,
        decoder_start_id: u32,
    ) -> Result<Self, ModelError> {
        if sources.is_empty() || sources.len() != targets.len() {
            return Err(ModelError::Input(format!(
                "need as many targets as sources (got {} and {})",
                sources.len(),
                targets.len()
            )));
        }
        if let Some(i) = sources.iter().position(Vec::is_empty) {
            return Err(ModelError::Input(format!("source {i} has no tokens")));
        }
        if let Some(i) = targets.iter().position(Vec::is_empty) {
            return Err(ModelError::Input(format!("target {i} has no tokens")));
        }
        let (input_ids, attention_mask, source_len) = pad_batch(sources, pad_id);
        let target_len = targets.iter().map(Vec::len).max().unwrap_or(0);
        let mut labels = Vec::with_capacity(targets.len() * target_len);
        let mut decoder_input_ids = Vec::with_capacity(targets.len() * target_len);
        for target in targets {
            for i in 0..target_len {
                labels.push(target.get(i).map_or(-100, |&t| t as i64));
                // HF _shift_right: [start, labels[:-1]] with -100 replaced by pad.
                let shifted = if i == 0 {
                    decoder_start_id as i64
                } else {
                    target.get(i - 1).map_or(pad_id as i64, |&t| t as i64)
                };
                decoder_input_ids.push(shifted);
            }
        }
        Ok(Self {
            batch: sources.len(),
            source_len,
            target_len,
            input_ids,
            attention_mask,
            decoder_input_ids,
            labels,
        })
    }

    pub fn tensors<B: Backend>(&self, device: &B::Device) -> Seq2SeqTensors<B> {
        let int2 = |values: &Vec<i64>, len: usize| {
            Tensor::<B, 2, Int>::from_data(
                TensorData::new(values.clone(), [self.batch, len]),
                device,
            )
        };
        Seq2SeqTensors {
            input_ids: int2(&self.input_ids, self.source_len),
            attention_mask: int2(&self.attention_mask, self.source_len),
            decoder_input_ids: int2(&self.decoder_input_ids, self.target_len),
            labels: int2(&self.labels, self.target_len),
        }
    }

    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }
}

/// [`Seq2SeqBatch`] on a device.
#[derive(Debug, Clone)]
pub struct Seq2SeqTensors<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2, Int>,
    pub decoder_input_ids: Tensor<B, 2, Int>,
    pub labels: Tensor<B, 2, Int>,
}

/// Per-token negative log-likelihood `[B, T]` (0 at ignored positions) and the mask `[B, T]`.
pub fn token_nll<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [batch, len, _] = logits.dims();
    let valid = labels.clone().greater_equal_elem(0);
    if let Some(nll) = crate::kernels::token_nll(&logits, &labels) {
        return (nll, valid.float());
    }
    let safe_labels = labels.clamp_min(0).reshape([batch, len, 1]);
    let log_probs = log_softmax(logits, 2);
    let picked = log_probs.gather(2, safe_labels).reshape([batch, len]);
    let mask = valid.float();
    (picked.neg() * mask.clone(), mask)
}

/// Mean cross-entropy over all non-ignored tokens of the batch (HF's `loss`).
pub fn batch_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let (nll, mask) = token_nll(logits, labels);
    nll.sum() / mask.sum().clamp_min(1.0)
}

/// Per-example losses for a batch (each the mean over that example's target tokens).
pub fn score_batch<B: Backend>(
    model: &T5<B>,
    batch: &Seq2SeqBatch,
) -> Result<Vec<ExampleLoss>, ModelError> {
    let vocab = model.vocab_size();
    if let Some(bad) = batch
        .input_ids
        .iter()
        .chain(batch.labels.iter())
        .find(|&&id| id >= vocab as i64)
    {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the model vocabulary of {vocab}"
        )));
    }
    let device = model.device();
    let t = batch.tensors::<B>(&device);
    let (_, logits) = model.forward(t.input_ids, t.attention_mask, t.decoder_input_ids);
    let (nll, mask) = token_nll(logits, t.labels);
    let sums = nll.sum_dim(1).into_data().convert::<f64>();
    let counts = mask.sum_dim(1).into_data().convert::<f64>();
    let sums = sums
        .into_vec::<f64>()
        .map_err(|e| ModelError::Input(format!("{e:?}")))?;
    let counts = counts
        .into_vec::<f64>()
        .map_err(|e| ModelError::Input(format!("{e:?}")))?;
    Ok(sums
        .into_iter()
        .zip(counts)
        .map(|(sum, count)| ExampleLoss {
            loss: sum / count.max(1.0),
            tokens: count as usize,
        })
        .collect())
}
