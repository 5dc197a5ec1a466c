//! Training checkpoints: every parameter (base and adapters) and the AdamW moments by module
//! path, plus a JSON state, written atomically so that a kill -9 at any moment leaves either the
//! previous or the new checkpoint, never a broken one.
//!
//! Layout of `DIR/checkpoint-<step>/`: `params.safetensors`, `optimizer.safetensors`,
//! `state.json`; `DIR/latest` names the newest complete one. A checkpoint directory is built
//! under a temporary name, every file fsynced, then renamed into place, then `latest` is
//! replaced by rename.
//!
//! Owns: the checkpoint layout and its atomic writes and reads. Must not decide when to
//! checkpoint or what the optimizer does with its moments: the training loops do.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use crate::error::ModelError;
use crate::optim::{AdamW, Moments};

/// `(id, dotted module path, shape)` of every float parameter, in visit order.
pub fn param_paths<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamId, String, Vec<usize>)> {
    struct PathVisitor {
        stack: Vec<String>,
        out: Vec<(ParamId, String, Vec<usize>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for PathVisitor {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out
                .push((param.id, self.stack.join("."), param.val().dims().to_vec()));
        }
    }
    let mut visitor = PathVisitor {
        stack: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

fn host_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Result<Vec<f32>, ModelError> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| ModelError::Input(format!("cannot read tensor: {e:?}")))
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A parameter on the host: dotted path, shape, f32 values.
pub type HostParam = (String, Vec<usize>, Vec<f32>);

/// Every float parameter as `(path, shape, f32 values)`.
pub(crate) fn collect_params<B: Backend, M: Module<B>>(
    module: &M,
) -> Result<Vec<HostParam>, ModelError> {
    type Pending = (String, Vec<usize>, Result<Vec<f32>, ModelError>);
    struct Collect {
        stack: Vec<String>,
        out: Vec<Pending>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let tensor = param.val();
            let shape = tensor.dims().to_vec();
            self.out
                .push((self.stack.join("."), shape, host_f32(tensor)));
        }
    }
    let mut collect = Collect {
        stack: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut collect);
    collect
        .out
        .into_iter()
        .map(|(path, shape, values)| values.map(|v| (path, shape, v)))
        .collect()
}

fn write_safetensors_file(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<(), ModelError> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|err| ModelError::Weights {
                    path: path.to_path_buf(),
                    reason: format!("tensor `{name}`: {err}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|err| ModelError::Weights {
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    write_synced(path, &bytes)
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

fn sync_dir(dir: &Path) -> Result<(), ModelError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Writes a checkpoint of `module` and `optimizer` with `state` (any JSON) under `root`,
/// atomically, and points `root/latest` at it. Keeps the newest `keep` checkpoints.
pub fn save_checkpoint<B: Backend, OB: Backend, M: Module<B>>(
    root: &Path,
    step: usize,
    module: &M,
    optimizer: &AdamW<OB>,
    state: &serde_json::Value,
    keep: usize,
) -> Result<PathBuf, ModelError> {
    save_checkpoint_with_extras(root, step, module, optimizer, state, keep, &[])
}

/// [`save_checkpoint`] plus `extras.safetensors`: any named f32 tensors the caller wants to
/// commit atomically with the model (a node's outer momentum, error-feedback residuals).
pub fn save_checkpoint_with_extras<B: Backend, OB: Backend, M: Module<B>>(
    root: &Path,
    step: usize,
    module: &M,
    optimizer: &AdamW<OB>,
    state: &serde_json::Value,
    keep: usize,
    extras: &[HostParam],
) -> Result<PathBuf, ModelError> {
    snapshot_checkpoint(step, module, optimizer, state, keep, extras)?.write(root)
}

/// A checkpoint copied to host memory, not yet written: [`snapshot_checkpoint`] takes it
/// where the model lives (a training thread), [`CheckpointSnapshot::write`] puts it on disk
/// anywhere else, so training does not wait for the disk.
pub struct CheckpointSnapshot {
    step: usize,
    keep: usize,
    params: Vec<(String, Vec<usize>, Vec<u8>)>,
    moments: Vec<(String, Vec<usize>, Vec<u8>)>,
    extras: Vec<(String, Vec<usize>, Vec<u8>)>,
    state: serde_json::Value,
}

/// The checkpoint [`save_checkpoint_with_extras`] would write, in memory.
pub fn snapshot_checkpoint<B: Backend, OB: Backend, M: Module<B>>(
    step: usize,
    module: &M,
    optimizer: &AdamW<OB>,
    state: &serde_json::Value,
    keep: usize,
    extras: &[HostParam],
) -> Result<CheckpointSnapshot, ModelError> {
    let params = collect_params(module)?;
    let by_id: HashMap<ParamId, String> = param_paths(module)
        .into_iter()
        .map(|(id, path, _)| (id, path))
        .collect();
    // Each tensor's f32 copy is dropped once it is bytes: the snapshot holds one copy.
    let params = params
        .into_iter()
        .map(|(path, shape, values)| {
            let bytes = to_bytes(&values);
            (path, shape, bytes)
        })
        .collect();
    let mut moments = Vec::new();
    let mut steps = serde_json::Map::new();
    for (id, m) in &optimizer.state {
        let Some(path) = by_id.get(id) else { continue };
        moments.push((
            format!("{path}.exp_avg"),
            vec![m.exp_avg.dims()[0]],
            to_bytes(&host_f32(m.exp_avg.clone())?),
        ));
        moments.push((
            format!("{path}.exp_avg_sq"),
            vec![m.exp_avg_sq.dims()[0]],
            to_bytes(&host_f32(m.exp_avg_sq.clone())?),
        ));
        steps.insert(path.clone(), m.step.into());
    }
    let extras = extras
        .iter()
        .map(|(name, shape, values)| (name.clone(), shape.clone(), to_bytes(values)))
        .collect();
    let mut state = state.clone();
    state["step"] = step.into();
    state["optimizer_steps"] = serde_json::Value::Object(steps);
    state["adamw"] = serde_json::to_value(optimizer.config).unwrap_or_default();
    if let Some(adafactor) = optimizer.adafactor {
        state["adafactor"] = serde_json::to_value(adafactor).unwrap_or_default();
    }
    Ok(CheckpointSnapshot {
        step,
        keep,
        params,
        moments,
        extras,
        state,
    })
}

impl CheckpointSnapshot {
    /// Writes the checkpoint under `root` atomically (a temporary folder, fsynced, renamed),
    /// points `root/latest` at it and keeps the newest `keep`.
    pub fn write(self, root: &Path) -> Result<PathBuf, ModelError> {
        std::fs::create_dir_all(root).map_err(io_error(root))?;
        let name = format!("checkpoint-{:08}", self.step);
        let final_dir = root.join(&name);
        let tmp_dir = root.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(io_error(&tmp_dir))?;
        }
        std::fs::create_dir_all(&tmp_dir).map_err(io_error(&tmp_dir))?;
        write_safetensors_file(&tmp_dir.join("params.safetensors"), &self.params)?;
        write_safetensors_file(&tmp_dir.join("optimizer.safetensors"), &self.moments)?;
        write_safetensors_file(&tmp_dir.join("extras.safetensors"), &self.extras)?;
        let text =
            serde_json::to_vec_pretty(&self.state).map_err(|e| ModelError::Input(e.to_string()))?;
        write_synced(&tmp_dir.join("state.json"), &text)?;
        sync_dir(&tmp_dir)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io_error(&final_dir))?;
        }
        std::fs::rename(&tmp_dir, &final_dir).map_err(io_error(&final_dir))?;
        let latest_tmp = root.join(format!(".latest.tmp-{}", std::process::id()));
        write_synced(&latest_tmp, name.as_bytes())?;
        std::fs::rename(&latest_tmp, root.join("latest")).map_err(io_error(root))?;
        sync_dir(root)?;
        prune(root, self.keep)?;
        Ok(final_dir)
    }
}

fn prune(root: &Path, keep: usize) -> Result<(), ModelError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_error(root))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-"))
        })
        .collect();
    found.sort();
    let excess = found.len().saturating_sub(keep.max(1));
    for old in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&old).map_err(io_error(&old))?;
    }
    Ok(())
}

/// The checkpoint `root/latest` points to, if any.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>, ModelError> {
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(io_error(&pointer))?;
    let name = name.trim();
    if !name.starts_with("checkpoint-") || name.contains('/') {
        return Err(ModelError::Weights {
            path: pointer,
            reason: format!("does not name a checkpoint: {name:?}"),
        });
    }
    Ok(Some(root.join(name)))
}

struct ParamLoader<'a> {
    stack: Vec<String>,
    file: &'a SafeTensors<'a>,
    path: &'a Path,
    error: Option<ModelError>,
}

impl<B: Backend> ModuleMapper<B> for ParamLoader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let key = self.stack.join(".");
        let shape = tensor.dims().to_vec();
        let loaded = match self.file.tensor(&key) {
            Ok(view) if view.shape() == shape.as_slice() => {
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let device = tensor.device();
                let require_grad = tensor.is_require_grad();
                let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), &device);
                Some(if require_grad { t.require_grad() } else { t })
            }
            Ok(view) => {
                self.error.get_or_insert(ModelError::ShapeMismatch {
                    path: self.path.to_path_buf(),
                    key: key.clone(),
                    expected: shape,
                    found: view.shape().to_vec(),
                });
                None
            }
            Err(_) => {
                self.error.get_or_insert(ModelError::MissingTensor {
                    path: self.path.to_path_buf(),
                    key,
                });
                None
            }
        };
        Param::from_mapped_value(id, loaded.unwrap_or(tensor), mapper)
    }
}

/// The tensors saved by [`save_checkpoint_with_extras`] (empty for checkpoints without).
pub fn load_extras(dir: &Path) -> Result<Vec<HostParam>, ModelError> {
    let path = dir.join("extras.safetensors");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(&path).map_err(io_error(&path))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|err| ModelError::Weights {
        path: path.clone(),
        reason: format!("not a valid safetensors file: {err}"),
    })?;
    let mut out = Vec::new();
    for (name, view) in file.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(ModelError::Weights {
                path: path.clone(),
                reason: format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
            });
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name, view.shape().to_vec(), values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The parameter names saved in checkpoint `dir` (`params.safetensors`), sorted.
pub fn checkpoint_param_names(dir: &Path) -> Result<Vec<String>, ModelError> {
    let path = dir.join("params.safetensors");
    let bytes = std::fs::read(&path).map_err(io_error(&path))?;
    let params = SafeTensors::deserialize(&bytes).map_err(|err| ModelError::Weights {
        path: path.clone(),
        reason: format!("not a valid safetensors file: {err}"),
    })?;
    let mut names: Vec<String> = params.names().into_iter().map(str::to_owned).collect();
    names.sort();
    Ok(names)
}

/// Restores the parameters of checkpoint `dir` (only `params.safetensors`) into `module`,
/// which must have the same structure: every parameter present with its shape.
pub fn load_params<B: Backend, M: Module<B>>(dir: &Path, module: M) -> Result<M, ModelError> {
    let params_path = dir.join("params.safetensors");
    let params_bytes = std::fs::read(&params_path).map_err(io_error(&params_path))?;
    let params = SafeTensors::deserialize(&params_bytes).map_err(|err| ModelError::Weights {
        path: params_path.clone(),
        reason: format!("not a valid safetensors file: {err}"),
    })?;
    let mut loader = ParamLoader {
        stack: Vec::new(),
        file: &params,
        path: &params_path,
        error: None,
    };
    let module = module.map(&mut loader);
    match loader.error {
        Some(err) => Err(err),
        None => Ok(module),
    }
}

/// Restores parameters and optimizer moments from checkpoint `dir` into `module` (which must
/// have the same structure) and returns the module and its state JSON.
pub fn load_checkpoint<B: Backend, OB: Backend, M: Module<B>>(
    dir: &Path,
    module: M,
    optimizer: &mut AdamW<OB>,
    optimizer_device: &OB::Device,
) -> Result<(M, serde_json::Value), ModelError> {
    let read = |name: &str| -> Result<Vec<u8>, ModelError> {
        let path = dir.join(name);
        std::fs::read(&path).map_err(io_error(&path))
    };
    let module = load_params(dir, module)?;
    let state_path = dir.join("state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&read("state.json")?).map_err(|err| ModelError::Weights {
            path: state_path.clone(),
            reason: format!("invalid JSON: {err}"),
        })?;
    let opt_path = dir.join("optimizer.safetensors");
    let opt_bytes = read("optimizer.safetensors")?;
    let moments = SafeTensors::deserialize(&opt_bytes).map_err(|err| ModelError::Weights {
        path: opt_path.clone(),
        reason: format!("not a valid safetensors file: {err}"),
    })?;
    optimizer.state.clear();
    for (id, path, shape) in param_paths(&module) {
        let (first_len, second_len) =
            crate::optim::moment_lengths(optimizer.adafactor.as_ref(), &shape);
        let (Ok(avg), Ok(avg_sq)) = (
            moments.tensor(&format!("{path}.exp_avg")),
            moments.tensor(&format!("{path}.exp_avg_sq")),
        ) else {
            continue; // never updated (frozen)
        };
        let to_tensor =
            |view: &TensorView<'_>, numel: usize| -> Result<Tensor<OB, 1>, ModelError> {
                if view.shape() != [numel] {
                    return Err(ModelError::ShapeMismatch {
                        path: opt_path.clone(),
                        key: path.clone(),
                        expected: vec![numel],
                        found: view.shape().to_vec(),
                    });
                }
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Ok(Tensor::from_data(
                    TensorData::new(values, [numel]),
                    optimizer_device,
                ))
            };
        let step = state["optimizer_steps"][&path].as_u64().unwrap_or(0);
        optimizer.state.insert(
            id,
            Moments {
                exp_avg: to_tensor(&avg, first_len)?,
                exp_avg_sq: to_tensor(&avg_sq, second_len)?,
                step,
            },
        );
    }
    Ok((module, state))
}
