//! Plain f32 tensors as the protocol sees them: a name, a shape and row-major values.
//!
//! Owns: [`Tensor`], [`TensorSet`] (tensors sorted by name, the order used everywhere on the
//! wire), [`TensorSpec`] and [`ModelLayout`] (the names and shapes a receiver expects).
//! Must not touch: any ML framework; the node converts to and from its own tensors.

use std::fmt;

/// A tensor set or layout that breaks its invariants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorSetError {
    /// Two tensors with the same name.
    #[error("tensor {name:?} appears twice")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A tensor with an empty name.
    #[error("a tensor has an empty name")]
    EmptyName,
    /// The number of values is not the product of the shape.
    #[error("tensor {name:?} has shape {shape:?} but {values} values")]
    ValuesDoNotMatchShape {
        /// The name.
        name: String,
        /// The shape.
        shape: Vec<usize>,
        /// Number of values given.
        values: usize,
    },
    /// The product of the shape overflows.
    #[error("tensor {name:?}: the element count of shape {shape:?} overflows")]
    ElementCountOverflow {
        /// The name.
        name: String,
        /// The shape.
        shape: Vec<usize>,
    },
}

/// Number of elements of `shape`, `None` on overflow. A shape `[]` is a scalar (1 element).
#[must_use]
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
}

/// One named f32 tensor, row-major.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    /// Name, e.g. `encoder.block.0.layer.0.SelfAttention.q.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub values: Vec<f32>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("values", &format_args!("[{} f32]", self.values.len()))
            .finish()
    }
}

impl Tensor {
    /// A tensor whose value count matches its shape.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: Vec<f32>,
    ) -> Result<Self, TensorSetError> {
        let tensor = Self {
            name: name.into(),
            shape,
            values,
        };
        tensor.check()?;
        Ok(tensor)
    }

    /// The name and shape of this tensor.
    #[must_use]
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            shape: self.shape.clone(),
        }
    }

    fn check(&self) -> Result<(), TensorSetError> {
        if self.name.is_empty() {
            return Err(TensorSetError::EmptyName);
        }
        let count =
            element_count(&self.shape).ok_or_else(|| TensorSetError::ElementCountOverflow {
                name: self.name.clone(),
                shape: self.shape.clone(),
            })?;
        if count != self.values.len() {
            return Err(TensorSetError::ValuesDoNotMatchShape {
                name: self.name.clone(),
                shape: self.shape.clone(),
                values: self.values.len(),
            });
        }
        Ok(())
    }
}

/// Tensors with unique names, sorted by name (byte order). A model delta, a model, or an
/// optimizer state.
#[derive(Clone, PartialEq, Default)]
pub struct TensorSet {
    tensors: Vec<Tensor>,
}

impl fmt::Debug for TensorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorSet")
            .field("tensors", &self.tensors.len())
            .field("elements", &self.total_elements())
            .finish()
    }
}

impl TensorSet {
    /// Sorts `tensors` by name and checks names are unique and non-empty and value counts
    /// match shapes.
    pub fn new(mut tensors: Vec<Tensor>) -> Result<Self, TensorSetError> {
        for tensor in &tensors {
            tensor.check()?;
        }
        tensors.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = tensors.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(TensorSetError::DuplicateName {
                name: pair[0].name.clone(),
            });
        }
        Ok(Self { tensors })
    }

    /// Builds a set whose invariants the caller has already established.
    pub(crate) fn from_sorted_unchecked(tensors: Vec<Tensor>) -> Self {
        debug_assert!(tensors.windows(2).all(|pair| pair[0].name < pair[1].name));
        Self { tensors }
    }

    /// The tensors, sorted by name.
    #[must_use]
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The tensors, sorted by name.
    #[must_use]
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }

    /// Names and values, mutable (names and shapes are not, to keep the invariants).
    pub fn values_mut(&mut self) -> impl Iterator<Item = (&str, &mut [f32])> {
        self.tensors
            .iter_mut()
            .map(|tensor| (tensor.name.as_str(), tensor.values.as_mut_slice()))
    }

    /// The tensor called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors
            .binary_search_by(|tensor| tensor.name.as_str().cmp(name))
            .ok()
            .map(|index| &self.tensors[index])
    }

    /// Number of tensors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Number of f32 values over all tensors.
    #[must_use]
    pub fn total_elements(&self) -> u64 {
        self.tensors
            .iter()
            .map(|tensor| tensor.values.len() as u64)
            .sum()
    }

    /// The names and shapes of these tensors.
    #[must_use]
    pub fn layout(&self) -> ModelLayout {
        ModelLayout {
            specs: self.tensors.iter().map(Tensor::spec).collect(),
        }
    }
}

/// The name and shape of one expected tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: impl Into<String>, shape: Vec<usize>) -> Self {
        Self {
            name: name.into(),
            shape,
        }
    }

    /// Number of elements, `None` on overflow.
    #[must_use]
    pub fn element_count(&self) -> Option<usize> {
        element_count(&self.shape)
    }
}

/// The tensors (names and shapes, sorted by name) a receiver expects: a decoded delta or
/// state must match it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelLayout {
    specs: Vec<TensorSpec>,
}

impl ModelLayout {
    /// Sorts the specs by name and checks names are unique and non-empty and element counts
    /// do not overflow.
    pub fn new(mut specs: Vec<TensorSpec>) -> Result<Self, TensorSetError> {
        for spec in &specs {
            if spec.name.is_empty() {
                return Err(TensorSetError::EmptyName);
            }
            if spec.element_count().is_none() {
                return Err(TensorSetError::ElementCountOverflow {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                });
            }
        }
        specs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = specs.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(TensorSetError::DuplicateName {
                name: pair[0].name.clone(),
            });
        }
        Ok(Self { specs })
    }

    /// Builds a layout whose invariants the caller has already established.
    pub(crate) fn from_sorted_unchecked(specs: Vec<TensorSpec>) -> Self {
        debug_assert!(specs.windows(2).all(|pair| pair[0].name < pair[1].name));
        Self { specs }
    }

    /// The specs, sorted by name.
    #[must_use]
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Number of tensors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether there are no tensors.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Number of f32 values over all tensors.
    #[must_use]
    pub fn total_elements(&self) -> u64 {
        self.specs
            .iter()
            .map(|spec| spec.element_count().unwrap_or(0) as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_set_sorts_and_refuses_duplicates() {
        let a = Tensor::new("b", vec![2], vec![1.0, 2.0]).expect("tensor");
        let b = Tensor::new("a", vec![], vec![3.0]).expect("tensor");
        let set = TensorSet::new(vec![a.clone(), b]).expect("set");
        assert_eq!(set.tensors()[0].name, "a");
        assert_eq!(set.get("b"), Some(&a));
        assert_eq!(set.total_elements(), 3);
        assert!(matches!(
            TensorSet::new(vec![a.clone(), a]),
            Err(TensorSetError::DuplicateName { .. })
        ));
        assert!(matches!(
            Tensor::new("c", vec![3], vec![1.0]),
            Err(TensorSetError::ValuesDoNotMatchShape { .. })
        ));
        assert!(matches!(
            Tensor::new("c", vec![usize::MAX, 2], vec![]),
            Err(TensorSetError::ElementCountOverflow { .. })
        ));
    }
}
