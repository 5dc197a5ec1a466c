//! Choosing the compute device. Every command is written once, generic over the burn
//! backend; [`dispatch!`](crate::dispatch) instantiates it for the backend the user picked.

use std::path::Path;
use std::str::FromStr;

use meshtune_model::precision::DeviceInfo;

/// `--device cpu` or `--device cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(DeviceChoice::Cuda(index)),
                _ => Err(format!(
                    "unknown device {other:?}: expected cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Runs `$func::<Backend>(device, args...)` on the chosen device.
#[macro_export]
macro_rules! dispatch {
    ($choice:expr, $func:ident ( $($arg:expr),* )) => {{
        match $choice {
            $crate::device::DeviceChoice::Cpu => {
                $func::<meshtune_model::backend::Cpu>(Default::default() $(, $arg)*)
            }
            #[cfg(feature = "cuda")]
            $crate::device::DeviceChoice::Cuda(index) => {
                $func::<meshtune_model::backend::Cuda>(
                    burn::backend::cuda::CudaDevice::new(index) $(, $arg)*)
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::DeviceChoice::Cuda(_) => Err(anyhow::anyhow!(
                "this meshtune was built without CUDA: rebuild with `cargo build --release --features cuda`"
            )),
        }
    }};
}

/// What the precision rule needs to know about `choice`: a Jetson's module (from the device
/// tree), else the GPU's compute capability from NVML (loaded at run time), else unknown.
pub fn device_info(choice: DeviceChoice) -> DeviceInfo {
    match choice {
        DeviceChoice::Cpu => DeviceInfo::Cpu,
        DeviceChoice::Cuda(index) => {
            if let Some(model) = read_device_tree_model(Path::new("/proc/device-tree/model"))
                && let Some(cc) = jetson_compute_capability(&model)
            {
                return DeviceInfo::Cuda {
                    name: model,
                    compute_capability: Some(cc),
                };
            }
            match nvml_compute_capability(index) {
                Some((name, cc)) => DeviceInfo::Cuda {
                    name,
                    compute_capability: Some(cc),
                },
                None => DeviceInfo::Cuda {
                    name: format!("cuda:{index}"),
                    compute_capability: None,
                },
            }
        }
    }
}

/// The device tree's model string (NUL-terminated on disk), if there is one.
pub fn read_device_tree_model(path: &Path) -> Option<String> {
    let raw = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&raw)
        .trim_end_matches('\0')
        .trim()
        .to_owned();
    (!text.is_empty()).then_some(text)
}

/// The CUDA compute capability of a Jetson module from its device-tree model string
/// (e.g. "NVIDIA Jetson AGX Orin Developer Kit"); `None` when it is not a Jetson.
pub fn jetson_compute_capability(model: &str) -> Option<(u32, u32)> {
    let model = model.to_ascii_lowercase();
    if !model.contains("jetson") {
        return None;
    }
    if model.contains("orin") {
        Some((8, 7))
    } else if model.contains("xavier") {
        Some((7, 2))
    } else if model.contains("tx2") {
        Some((6, 2))
    } else if model.contains("nano") || model.contains("tx1") {
        Some((5, 3))
    } else {
        None
    }
}

/// Name and compute capability of GPU `index` through NVML; `None` without the library, a
/// driver or the GPU.
fn nvml_compute_capability(index: usize) -> Option<(String, (u32, u32))> {
    let nvml = crate::nvml::Nvml::load()?;
    let capability = nvml.compute_capability(index)?;
    let name = nvml.name(index).unwrap_or_else(|| format!("cuda:{index}"));
    Some((name, capability))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetson_modules_map_to_their_compute_capability() {
        let cases = [
            ("NVIDIA Jetson AGX Orin Developer Kit", Some((8, 7))),
            (
                "NVIDIA Orin NX Developer Kit / Jetson Orin NX",
                Some((8, 7)),
            ),
            ("NVIDIA Jetson AGX Xavier [16GB]", Some((7, 2))),
            ("NVIDIA Jetson Xavier NX Developer Kit", Some((7, 2))),
            ("quill / NVIDIA Jetson TX2", Some((6, 2))),
            ("NVIDIA Jetson Nano Developer Kit", Some((5, 3))),
            ("Raspberry Pi 4 Model B Rev 1.4", None),
        ];
        for (model, want) in cases {
            assert_eq!(jetson_compute_capability(model), want, "{model}");
        }
    }

    #[test]
    fn the_device_tree_model_is_read_without_its_terminator() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("model");
        std::fs::write(&path, b"NVIDIA Jetson AGX Xavier [16GB]\0").expect("write");
        assert_eq!(
            read_device_tree_model(&path).as_deref(),
            Some("NVIDIA Jetson AGX Xavier [16GB]")
        );
        assert_eq!(read_device_tree_model(&dir.path().join("missing")), None);
        assert_eq!(device_info(DeviceChoice::Cpu), DeviceInfo::Cpu);
    }
}
