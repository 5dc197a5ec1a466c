//! Weights in and out: HF checkpoint key names, streaming safetensors loading (single file or
//! sharded index, f32/f16/bf16, memory-mapped), random initialisation, and export as a HF folder.
//!
//! Owns: the safetensors byte format, the sources that build a model from a checkpoint or from
//! random values, and the export that walks a built model. The key-rename table between HF
//! names and our modules ([`WeightKey`], used by loading and export alike) is in
//! [`crate::weight_key`], below both this module and [`crate::t5`]. Must not know about
//! training.
//!
//! Memory: a checkpoint is memory-mapped and converted one tensor at a time, so loading holds the
//! model plus at most one tensor in f32, never two copies of the model.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::T5Config;
use crate::error::ModelError;
use crate::t5::{Attention, FeedForward, RmsNorm, T5, T5Stack};
pub use crate::weight_key::{WeightKey, WeightSource};

/// Random initialisation with HF's per-layer standard deviations (no download needed).
///
/// Values come from a generator owned by this source (seeded ChaCha, Box-Muller normals on
/// the host), not from the backend's global one: the same seed gives the same model on every
/// backend (a CPU node and a CUDA node of one mesh start from identical weights) and
/// regardless of what other threads draw meanwhile.
pub struct RandomInit<'a, B: Backend> {
    config: &'a T5Config,
    device: B::Device,
    rng: rand::rngs::StdRng,
}

impl<'a, B: Backend> RandomInit<'a, B> {
    pub fn new(config: &'a T5Config, device: &B::Device, seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            config,
            device: device.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    fn normal(&mut self, count: usize, std: f64) -> Vec<f32> {
        use rand::Rng;
        let mut out = Vec::with_capacity(count + 1);
        while out.len() < count {
            // Box-Muller: two independent standard normals from two uniforms in (0, 1].
            let u1: f64 = 1.0 - self.rng.random::<f64>();
            let u2: f64 = self.rng.random::<f64>();
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f64::consts::TAU * u2;
            out.push((std * radius * angle.cos()) as f32);
            out.push((std * radius * angle.sin()) as f32);
        }
        out.truncate(count);
        out
    }

    fn tensor<const D: usize>(&mut self, key: &WeightKey, shape: [usize; D]) -> Tensor<B, D> {
        match key.init_std(self.config) {
            Some(std) => {
                let values = self.normal(shape.iter().product(), std);
                Tensor::from_data(TensorData::new(values, shape), &self.device)
            }
            None => Tensor::ones(shape, &self.device),
        }
    }
}

impl<B: Backend> WeightSource<B> for RandomInit<'_, B> {
    fn param2(
        &mut self,
        key: &WeightKey,
        shape: [usize; 2],
    ) -> Result<Param<Tensor<B, 2>>, ModelError> {
        Ok(Param::from_tensor(self.tensor(key, shape)))
    }

    fn param1(&mut self, key: &WeightKey, len: usize) -> Result<Param<Tensor<B, 1>>, ModelError> {
        Ok(Param::from_tensor(self.tensor(key, [len])))
    }

    fn contains(&self, key: &WeightKey) -> bool {
        !(matches!(key, WeightKey::LmHead) && self.config.tie_word_embeddings)
    }
}

/// One memory-mapped safetensors file and its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only and not modified by us while mapped; a
        // concurrent writer could change bytes under us, which at worst yields wrong values
        // that the shape/hash checks of higher layers report, never memory unsafety in Rust
        // code reading a `&[u8]` of fixed length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|err| ModelError::Weights {
                path: path.to_path_buf(),
                reason: format!("not a valid safetensors file: {err}"),
            })?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            let end = data_start + info.data_offsets.1;
            if end > mmap.len() {
                return Err(ModelError::Weights {
                    path: path.to_path_buf(),
                    reason: format!(
                        "truncated: tensor `{name}` ends at byte {end} but the file has {} bytes",
                        mmap.len()
                    ),
                });
            }
            tensors.insert(name, info.clone());
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
        })
    }
}

/// Streams tensors out of `model.safetensors` or a sharded `model.safetensors.index.json`.
pub struct SafetensorsSource<B: Backend> {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// tensor name -> index in `files`
    location: HashMap<String, usize>,
    used: HashSet<String>,
    device: B::Device,
}

/// Checkpoint keys that duplicate `shared.weight` in real FLAN-T5 files.
const TIED_ALIASES: [&str; 2] = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"];

impl<B: Backend> SafetensorsSource<B> {
    pub fn open(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_paths(dir, &index)?
        } else {
            return Err(ModelError::Weights {
                path: dir.to_path_buf(),
                reason: "no model.safetensors or model.safetensors.index.json in this folder"
                    .into(),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for path in paths {
            let file = MappedFile::open(&path)?;
            for name in file.tensors.keys() {
                location.insert(name.clone(), files.len());
            }
            files.push(file);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            location,
            used: HashSet::new(),
            device: device.clone(),
        })
    }

    /// Reads one tensor as f32 in our layout, checking its shape.
    fn read(&mut self, key: &WeightKey, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let name = key.hf_name();
        let hf_shape: Vec<usize> = if key.transposed() {
            shape.iter().rev().copied().collect()
        } else {
            shape.to_vec()
        };
        let index = match self.location.get(&name) {
            Some(&index) => index,
            None => {
                return Err(ModelError::MissingTensor {
                    path: self.dir.clone(),
                    key: name,
                });
            }
        };
        let file = &self.files[index];
        let info = &file.tensors[&name];
        if info.shape != hf_shape {
            return Err(ModelError::ShapeMismatch {
                path: file.path.clone(),
                key: name,
                expected: hf_shape,
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let values =
            decode_floats(bytes, info.dtype).map_err(|dtype| ModelError::UnsupportedDtype {
                path: file.path.clone(),
                key: name.clone(),
                dtype,
            })?;
        let expected_len: usize = hf_shape.iter().product();
        if values.len() != expected_len {
            return Err(ModelError::Weights {
                path: file.path.clone(),
                reason: format!(
                    "tensor `{name}` holds {} values but its shape {:?} needs {expected_len}",
                    values.len(),
                    info.shape
                ),
            });
        }
        self.used.insert(name);
        Ok(if key.transposed() {
            transpose(&values, hf_shape[0], hf_shape[1])
        } else {
            values
        })
    }
}

fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| ModelError::Weights {
            path: index.to_path_buf(),
            reason: format!("invalid JSON: {err}"),
        })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Weights {
            path: index.to_path_buf(),
            reason: "missing object `weight_map`".into(),
        })?;
    let mut shards: Vec<String> = Vec::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::Weights {
            path: index.to_path_buf(),
            reason: format!("`weight_map.{key}` is not a file name"),
        })?;
        // A shard name is a plain file name in the same folder, never a path.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(ModelError::Weights {
                path: index.to_path_buf(),
                reason: format!("shard name {file:?} must be a file name in the same folder"),
            });
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    shards.sort();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// Converts little-endian f32/f16/bf16 bytes to f32; `Err(dtype)` for other dtypes.
pub(crate) fn decode_floats(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>, String> {
    match dtype {
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(format!("{other:?}")),
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

impl<B: Backend> WeightSource<B> for SafetensorsSource<B> {
    fn param2(
        &mut self,
        key: &WeightKey,
        shape: [usize; 2],
    ) -> Result<Param<Tensor<B, 2>>, ModelError> {
        let values = self.read(key, &shape)?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        )))
    }

    fn param1(&mut self, key: &WeightKey, len: usize) -> Result<Param<Tensor<B, 1>>, ModelError> {
        let values = self.read(key, &[len])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(values, [len]),
            &self.device,
        )))
    }

    fn contains(&self, key: &WeightKey) -> bool {
        self.location.contains_key(&key.hf_name())
    }

    fn finish(&mut self) -> Result<(), ModelError> {
        let mut unused: Vec<&String> = self
            .location
            .keys()
            .filter(|k| !self.used.contains(*k) && !TIED_ALIASES.contains(&k.as_str()))
            .collect();
        unused.sort();
        if !unused.is_empty() {
            tracing::warn!(
                dir = %self.dir.display(),
                count = unused.len(),
                first = %unused[0],
                "checkpoint tensors not used by the model"
            );
        }
        Ok(())
    }
}

/// Loads `dir/config.json` and the weights next to it onto `device`.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(T5Config, T5<B>), ModelError> {
    let config = T5Config::from_file(&dir.join("config.json"))?;
    let mut source = SafetensorsSource::<B>::open(dir, device)?;
    let model = T5::from_source(&config, &mut source)?;
    Ok((config, model))
}

/// Every parameter of `model` with its key, in checkpoint order.
pub fn named_weights<B: Backend>(model: &T5<B>) -> Vec<(WeightKey, NamedTensor<B>)> {
    let mut out = Vec::new();
    out.push((WeightKey::Shared, NamedTensor::Two(model.shared.val())));
    push_stack(&mut out, &model.encoder, false);
    push_stack(&mut out, &model.decoder, true);
    if let Some(head) = &model.lm_head {
        out.push((WeightKey::LmHead, NamedTensor::Two(head.val())));
    }
    out
}

/// A parameter tensor of either rank.
#[derive(Debug, Clone)]
pub enum NamedTensor<B: Backend> {
    One(Tensor<B, 1>),
    Two(Tensor<B, 2>),
}

impl<B: Backend> NamedTensor<B> {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            NamedTensor::One(t) => t.dims().to_vec(),
            NamedTensor::Two(t) => t.dims().to_vec(),
        }
    }

    /// Host f32 values in our layout.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, ModelError> {
        let data = match self {
            NamedTensor::One(t) => t.to_data(),
            NamedTensor::Two(t) => t.to_data(),
        };
        data.convert::<f32>()
            .into_vec::<f32>()
            .map_err(|err| ModelError::Input(format!("cannot read tensor values: {err:?}")))
    }
}

fn push_norm<B: Backend>(
    out: &mut Vec<(WeightKey, NamedTensor<B>)>,
    key: WeightKey,
    norm: &RmsNorm<B>,
) {
    out.push((key, NamedTensor::One(norm.weight.val())));
}

fn push_attention<B: Backend>(
    out: &mut Vec<(WeightKey, NamedTensor<B>)>,
    decoder: bool,
    block: usize,
    cross: bool,
    attention: &Attention<B>,
) {
    for (proj, param) in [
        ('q', &attention.q),
        ('k', &attention.k),
        ('v', &attention.v),
        ('o', &attention.o),
    ] {
        out.push((
            WeightKey::Attention {
                decoder,
                block,
                cross,
                proj,
            },
            NamedTensor::Two(param.val()),
        ));
    }
}

fn push_feed_forward<B: Backend>(
    out: &mut Vec<(WeightKey, NamedTensor<B>)>,
    decoder: bool,
    block: usize,
    ff: &FeedForward<B>,
) {
    let key = |name| WeightKey::FeedForward {
        decoder,
        block,
        name,
    };
    match &ff.wi_linear {
        Some(wi_linear) => {
            out.push((key("wi_0"), NamedTensor::Two(ff.wi.val())));
            out.push((key("wi_1"), NamedTensor::Two(wi_linear.val())));
        }
        None => out.push((key("wi"), NamedTensor::Two(ff.wi.val()))),
    }
    out.push((key("wo"), NamedTensor::Two(ff.wo.val())));
}

fn push_stack<B: Backend>(
    out: &mut Vec<(WeightKey, NamedTensor<B>)>,
    stack: &T5Stack<B>,
    decoder: bool,
) {
    out.push((
        WeightKey::RelativeBias { decoder },
        NamedTensor::Two(stack.relative_attention_bias.val()),
    ));
    for (block, layer) in stack.blocks.iter().enumerate() {
        push_norm(
            out,
            WeightKey::LayerNorm {
                decoder,
                block,
                sublayer: 0,
            },
            &layer.self_norm,
        );
        push_attention(out, decoder, block, false, &layer.self_attention);
        if let (Some(norm), Some(cross)) = (&layer.cross_norm, &layer.cross_attention) {
            push_norm(
                out,
                WeightKey::LayerNorm {
                    decoder,
                    block,
                    sublayer: 1,
                },
                norm,
            );
            push_attention(out, decoder, block, true, cross);
        }
        push_norm(
            out,
            WeightKey::LayerNorm {
                decoder,
                block,
                sublayer: if decoder { 2 } else { 1 },
            },
            &layer.ff_norm,
        );
        push_feed_forward(out, decoder, block, &layer.feed_forward);
    }
    push_norm(out, WeightKey::FinalNorm { decoder }, &stack.final_norm);
}

/// On-disk dtype for [`export_hf_folder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    fn name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "F32",
            ExportDtype::Bf16 => "BF16",
            ExportDtype::F16 => "F16",
        }
    }
    fn size(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 | ExportDtype::F16 => 2,
        }
    }
}

/// Writes `model.safetensors` with HF key names, one tensor at a time (the header is computed
/// from shapes first, so the whole model is never copied to host memory at once).
/// The file is written to a temporary name and renamed, so a crash never leaves half a file.
pub fn write_safetensors<B: Backend>(
    model: &T5<B>,
    path: &Path,
    dtype: ExportDtype,
) -> Result<(), ModelError> {
    let weights = named_weights(model);
    let io_err = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    let mut entries = Vec::with_capacity(weights.len());
    for (key, tensor) in &weights {
        let shape = tensor.shape();
        let hf_shape: Vec<usize> = if key.transposed() {
            shape.iter().rev().copied().collect()
        } else {
            shape.clone()
        };
        let len = hf_shape.iter().product::<usize>() * dtype.size();
        header.insert(
            key.hf_name(),
            serde_json::json!({"dtype": dtype.name(), "shape": hf_shape, "data_offsets": [offset, offset + len]}),
        );
        entries.push((key.clone(), offset));
        offset += len;
    }
    let mut header_value = serde_json::Value::Object(header.into_iter().collect());
    header_value["__metadata__"] = serde_json::json!({"format": "pt"});
    let mut header_bytes =
        serde_json::to_vec(&header_value).map_err(|err| ModelError::Weights {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    // Data must be written in offset order, which is `weights` order.
    let tmp = path.with_extension("safetensors.tmp");
    let file = File::create(&tmp).map_err(io_err)?;
    let mut writer = BufWriter::new(file);
    writer
        .write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io_err)?;
    writer.write_all(&header_bytes).map_err(io_err)?;
    for (key, tensor) in &weights {
        let shape = tensor.shape();
        let values = tensor.to_f32_vec()?;
        let values = if key.transposed() {
            transpose(&values, shape[0], shape[1])
        } else {
            values
        };
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        for v in values {
            match dtype {
                ExportDtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                ExportDtype::Bf16 => {
                    bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())
                }
                ExportDtype::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            }
        }
        writer.write_all(&bytes).map_err(io_err)?;
    }
    let file = writer
        .into_inner()
        .map_err(|err| io_err(err.into_error()))?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(())
}

/// Writes a folder that `transformers` loads with `T5ForConditionalGeneration.from_pretrained`:
/// `config.json`, `model.safetensors` (HF key names) and, when given, `tokenizer.json`.
pub fn export_hf_folder<B: Backend>(
    model: &T5<B>,
    config: &T5Config,
    tokenizer_json: Option<&Path>,
    dir: &Path,
    dtype: ExportDtype,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config_path = dir.join("config.json");
    let mut config = config.clone();
    config.extra.insert(
        "torch_dtype".into(),
        match dtype {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
        .into(),
    );
    config.extra.remove("dtype");
    // Say explicitly how the head is wired, for transformers 4.x (reads `tie_word_embeddings`)
    // and 5.x (reads `scale_decoder_outputs`, ties by the weights present).
    config.tie_word_embeddings = model.tied();
    config.scale_decoder_outputs = Some(model.scale_decoder_outputs);
    std::fs::write(&config_path, config.to_hf_json()?).map_err(|source| ModelError::Io {
        path: config_path.clone(),
        source,
    })?;
    write_safetensors(model, &dir.join("model.safetensors"), dtype)?;
    if let Some(src) = tokenizer_json {
        let dst = dir.join("tokenizer.json");
        if src != dst {
            std::fs::copy(src, &dst).map_err(|source| ModelError::Io {
                path: src.to_path_buf(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_follow_checkpoint_layout() {
        assert_eq!(
            WeightKey::Attention {
                decoder: true,
                block: 3,
                cross: true,
                proj: 'k'
            }
            .hf_name(),
            "decoder.block.3.layer.1.EncDecAttention.k.weight"
        );
        assert_eq!(
            WeightKey::FeedForward {
                decoder: false,
                block: 0,
                name: "wi_1"
            }
            .hf_name(),
            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
        );
        assert_eq!(
            WeightKey::LayerNorm {
                decoder: true,
                block: 1,
                sublayer: 2
            }
            .hf_name(),
            "decoder.block.1.layer.2.layer_norm.weight"
        );
    }

    #[test]
    fn decodes_half_precisions() {
        let bf = half::bf16::from_f32(1.5).to_le_bytes();
        let f = half::f16::from_f32(-2.25).to_le_bytes();
        assert_eq!(decode_floats(&bf, Dtype::BF16).expect("bf16"), vec![1.5]);
        assert_eq!(decode_floats(&f, Dtype::F16).expect("f16"), vec![-2.25]);
        assert!(decode_floats(&[0, 0, 0, 0], Dtype::I32).is_err());
    }

    #[test]
    fn transpose_is_an_involution() {
        let values: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let t = transpose(&values, 2, 3);
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(transpose(&t, 3, 2), values);
    }
}
