//! The parameters a node exchanges with its peers, as a [`TensorSet`] named by module path
//! (`encoder.blocks.0.attention.q`, `…lora_q.a`), and their write-back into a module.
//!
//! Owns: the mapping between a burn module and the protocol's host tensors. Must not touch:
//! encoding, hashing or networking (the protocol crate and the node do that).
//!
//! Module paths rather than HF names, so that LoRA adapters (which have no HF name) travel
//! the same way as base weights. Every node of a mesh builds the same module from the same
//! config, so the paths and shapes agree; receivers check them with
//! [`meshtune_protocol::DeltaManifest::check_layout`] before decoding.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use meshtune_protocol::{Tensor as HostTensor, TensorSet};

use crate::checkpoint::collect_params;
use crate::error::ModelError;

/// Which parameters are exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExchangeScope {
    /// Every parameter (full fine-tuning).
    All,
    /// Only LoRA adapter matrices (paths containing `lora_`); the frozen base never changes.
    LoraAdapters,
}

impl ExchangeScope {
    pub fn includes(self, path: &str) -> bool {
        match self {
            ExchangeScope::All => true,
            ExchangeScope::LoraAdapters => path.contains("lora_"),
        }
    }
}

/// The exchanged parameters of `module` on the host (a [`TensorSet`] is sorted by name).
pub fn module_tensors<B: Backend, M: Module<B>>(
    module: &M,
    scope: ExchangeScope,
) -> Result<TensorSet, ModelError> {
    let tensors = collect_params(module)?
        .into_iter()
        .filter(|(path, _, _)| scope.includes(path))
        .map(|(path, shape, values)| {
            HostTensor::new(path, shape, values).map_err(|err| ModelError::Input(err.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if tensors.is_empty() {
        return Err(ModelError::Input(format!(
            "the model has no parameters in exchange scope {scope:?} (LoRA scope without adapters?)"
        )));
    }
    TensorSet::new(tensors).map_err(|err| ModelError::Input(err.to_string()))
}

/// Replaces every parameter named in `tensors` with its values, keeping parameter ids (so
/// optimizer moments stay attached) and `require_grad`. Every tensor of the set must name a
/// parameter of the module with the same shape; parameters not in the set are unchanged.
/// The module is consumed: a caller that must keep it on error passes a clone (cheap: burn
/// tensors are reference-counted).
pub fn assign_tensors<B: Backend, M: Module<B>>(
    module: M,
    tensors: &TensorSet,
) -> Result<M, ModelError> {
    let wanted: HashMap<&str, &HostTensor> = tensors
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut mapper = Assign {
        stack: Vec::new(),
        wanted,
        used: 0,
        error: None,
    };
    let module = module.map(&mut mapper);
    if let Some(err) = mapper.error {
        return Err(err);
    }
    if mapper.used != tensors.len() {
        let known: std::collections::HashSet<String> = crate::checkpoint::param_paths(&module)
            .into_iter()
            .map(|(_, path, _)| path)
            .collect();
        let unknown: Vec<&str> = tensors
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .filter(|name| !known.contains(*name))
            .take(3)
            .collect();
        return Err(ModelError::Input(format!(
            "{} tensor(s) name no parameter of the model, e.g. {unknown:?}",
            tensors.len() - mapper.used
        )));
    }
    Ok(module)
}

struct Assign<'a> {
    stack: Vec<String>,
    wanted: HashMap<&'a str, &'a HostTensor>,
    used: usize,
    error: Option<ModelError>,
}

impl<B: Backend> ModuleMapper<B> for Assign<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.stack.join(".");
        let Some(host) = self.wanted.get(path.as_str()) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.dims().to_vec();
        if host.shape != shape {
            self.error.get_or_insert(ModelError::Input(format!(
                "tensor `{path}` has shape {:?}, the model's parameter has {shape:?}",
                host.shape
            )));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        self.used += 1;
        let device = tensor.device();
        let require_grad = tensor.is_require_grad();
        let t = Tensor::<B, D>::from_data(TensorData::new(host.values.clone(), shape), &device);
        let t = if require_grad { t.require_grad() } else { t };
        Param::from_mapped_value(id, t, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::config::T5Config;
    use crate::lora::{LoraConfig, PeftInit, attach_lora};
    use crate::t5::T5;
    use crate::weights::RandomInit;

    fn tiny() -> (T5Config, T5<Cpu>) {
        let config: T5Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 1,
            "num_heads": 4, "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 16, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "decoder_start_token_id": 0, "pad_token_id": 0,
            "eos_token_id": 1
        }))
        .expect("config");
        let device = Default::default();
        let model = T5::from_source(&config, &mut RandomInit::<Cpu>::new(&config, &device, 3))
            .expect("model");
        (config, model)
    }

    #[test]
    fn round_trip_keeps_values_and_ids() {
        let (_, model) = tiny();
        let ids_before: Vec<_> = crate::checkpoint::param_paths(&model)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        let mut set = module_tensors(&model, ExchangeScope::All).expect("tensors");
        for (_, values) in set.values_mut() {
            for v in values.iter_mut() {
                *v += 1.0;
            }
        }
        let model = assign_tensors(model, &set).expect("assign");
        let again = module_tensors(&model, ExchangeScope::All).expect("tensors");
        assert_eq!(again, set);
        let ids_after: Vec<_> = crate::checkpoint::param_paths(&model)
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(ids_before, ids_after);
    }

    #[test]
    fn assignment_sticks_on_the_autodiff_backend() {
        use crate::backend::CpuTrain;
        let (config, _) = tiny();
        let device = Default::default();
        let model = T5::<CpuTrain>::from_source(
            &config,
            &mut RandomInit::<CpuTrain>::new(&config, &device, 3),
        )
        .expect("model");
        let mut set = module_tensors(&model, ExchangeScope::All).expect("tensors");
        for (_, values) in set.values_mut() {
            for v in values.iter_mut() {
                *v = 0.25;
            }
        }
        let model = assign_tensors(model, &set).expect("assign");
        assert_eq!(
            module_tensors(&model, ExchangeScope::All).expect("again"),
            set
        );
    }

    #[test]
    fn random_init_ignores_other_draws_from_the_backend_generator() {
        let (config, first) = tiny();
        let device = Default::default();
        // Another thread (or test) drawing from the global generator in between changes nothing.
        let _noise = burn::tensor::Tensor::<Cpu, 1>::random(
            [100],
            burn::tensor::Distribution::Default,
            &device,
        );
        let second =
            T5::<Cpu>::from_source(&config, &mut RandomInit::<Cpu>::new(&config, &device, 3))
                .expect("model");
        assert_eq!(
            module_tensors(&first, ExchangeScope::All).expect("a"),
            module_tensors(&second, ExchangeScope::All).expect("b")
        );
        let other =
            T5::<Cpu>::from_source(&config, &mut RandomInit::<Cpu>::new(&config, &device, 4))
                .expect("model");
        assert_ne!(
            module_tensors(&first, ExchangeScope::All).expect("a"),
            module_tensors(&other, ExchangeScope::All).expect("c")
        );
    }

    #[test]
    fn lora_scope_holds_only_adapters() {
        let (_, model) = tiny();
        let device = Default::default();
        let model = attach_lora(
            model,
            &LoraConfig::default(),
            &mut PeftInit::<Cpu> { device },
        )
        .expect("lora");
        let set = module_tensors(&model, ExchangeScope::LoraAdapters).expect("tensors");
        assert!(!set.is_empty());
        assert!(set.tensors().iter().all(|t| t.name.contains("lora_")));
        let all = module_tensors(&model, ExchangeScope::All).expect("all");
        assert!(all.len() > set.len());
    }

    #[test]
    fn wrong_shape_and_unknown_names_are_refused() {
        let (_, model) = tiny();
        let set = module_tensors(&model, ExchangeScope::All).expect("tensors");
        let first = &set.tensors()[0];
        let wrong = TensorSet::new(vec![
            HostTensor::new(
                first.name.clone(),
                vec![first.values.len()],
                first.values.clone(),
            )
            .expect("tensor"),
        ])
        .expect("set");
        let err = assign_tensors(model.clone(), &wrong).expect_err("shape");
        assert!(err.to_string().contains("shape"), "{err}");
        let unknown = TensorSet::new(vec![
            HostTensor::new("nope.weight", vec![2], vec![0.0, 1.0]).expect("tensor"),
        ])
        .expect("set");
        let err = assign_tensors(model, &unknown).expect_err("unknown");
        assert!(err.to_string().contains("nope.weight"), "{err}");
    }
}
