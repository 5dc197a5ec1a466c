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
            $crate::device::DeviceChoice::Cuda(index) => Err($crate::device::CudaUnavailable::NotBuilt {
                device: $crate::device::DeviceChoice::Cuda(index),
            }
            .into()),
        }
    }};
}

/// Why `--device cuda:N` cannot run here. Found before any model is loaded or peer dialled,
/// so that a machine without the NVIDIA driver gets this error instead of a panic inside
/// cudarc once the first kernel launches.
#[derive(Debug, thiserror::Error)]
pub enum CudaUnavailable {
    #[error(
        "--device {device}: this meshtune was built without CUDA: rebuild with \
         `cargo build --release --features cuda`"
    )]
    NotBuilt { device: DeviceChoice },
    #[error(
        "--device {device}: the NVIDIA driver library {library} cannot be loaded ({reason}); \
         install the NVIDIA driver, or run the container with `--gpus all` \
         (Jetson: `--runtime nvidia`)"
    )]
    DriverMissing {
        device: DeviceChoice,
        library: String,
        reason: String,
    },
    #[error("--device {device}: {library} has no symbol {symbol}: it is not a CUDA driver library")]
    SymbolMissing {
        device: DeviceChoice,
        library: String,
        symbol: &'static str,
    },
    #[error(
        "--device {device}: the CUDA driver failed to start: {call} returned CUDA error {code} \
         (100 = no CUDA-capable device, 35 = driver older than the runtime, 999 = unknown)"
    )]
    DriverError {
        device: DeviceChoice,
        call: &'static str,
        code: i32,
    },
    #[error("--device {device}: no such GPU: the CUDA driver sees {count} device(s)")]
    NoSuchDevice { device: DeviceChoice, count: i32 },
    #[error(
        "--device {device}: none of the NVRTC libraries {candidates:?} can be loaded; burn \
         compiles its CUDA kernels with NVRTC at run time: install the CUDA runtime's NVRTC \
         (e.g. the cuda-nvrtc-12-6 package) or add its folder to LD_LIBRARY_PATH"
    )]
    NvrtcMissing {
        device: DeviceChoice,
        candidates: Vec<String>,
    },
}

/// The shared libraries that [`check_device`] looks for: the driver API (`libcuda`) and the
/// run-time compiler that burn's CUDA backend (cubecl, through cudarc) loads.
#[derive(Debug, Clone)]
pub struct CudaLibraries {
    pub driver: String,
    pub nvrtc: Vec<String>,
}

impl Default for CudaLibraries {
    fn default() -> Self {
        Self {
            driver: "libcuda.so.1".into(),
            nvrtc: ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// Checks that `choice` can run in this binary on this machine: always for `cpu`; for
/// `cuda:N`, that the binary has the CUDA backend, `libcuda` loads, `cuInit` succeeds, the
/// driver sees more than N devices and NVRTC loads.
pub fn check_device(choice: DeviceChoice) -> Result<(), CudaUnavailable> {
    match choice {
        DeviceChoice::Cpu => Ok(()),
        DeviceChoice::Cuda(_) if !cfg!(feature = "cuda") => {
            Err(CudaUnavailable::NotBuilt { device: choice })
        }
        DeviceChoice::Cuda(index) => check_cuda(index, &CudaLibraries::default()),
    }
}

/// The CUDA half of [`check_device`], with the library names passed in (tests use names that
/// do not exist, or a library that is not the driver).
pub fn check_cuda(index: usize, libraries: &CudaLibraries) -> Result<(), CudaUnavailable> {
    let device = DeviceChoice::Cuda(index);
    let count = cuda_device_count(device, &libraries.driver)?;
    if !usize::try_from(count).is_ok_and(|count| index < count) {
        return Err(CudaUnavailable::NoSuchDevice { device, count });
    }
    // SAFETY: loading NVRTC runs its initialisers, which have no preconditions; nothing is
    // called through it here.
    let nvrtc_loads = libraries
        .nvrtc
        .iter()
        .any(|name| unsafe { libloading::Library::new(name) }.is_ok());
    if !nvrtc_loads {
        return Err(CudaUnavailable::NvrtcMissing {
            device,
            candidates: libraries.nvrtc.clone(),
        });
    }
    tracing::info!(%device, devices = count, "CUDA driver and NVRTC found");
    Ok(())
}

/// `cuInit(0)` then `cuDeviceGetCount` through the driver library `library`.
fn cuda_device_count(device: DeviceChoice, library: &str) -> Result<i32, CudaUnavailable> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    let symbol_missing = |symbol| CudaUnavailable::SymbolMissing {
        device,
        library: library.to_owned(),
        symbol,
    };
    // SAFETY: loading the driver runs its initialisers, which have no preconditions; both
    // symbols are looked up with the signatures of the CUDA driver API (cuda.h), and the count
    // pointer is valid for the call.
    unsafe {
        let driver =
            libloading::Library::new(library).map_err(|err| CudaUnavailable::DriverMissing {
                device,
                library: library.to_owned(),
                reason: err.to_string(),
            })?;
        let init: libloading::Symbol<CuInit> = driver
            .get(b"cuInit")
            .map_err(|_| symbol_missing("cuInit"))?;
        let get_count: libloading::Symbol<CuDeviceGetCount> = driver
            .get(b"cuDeviceGetCount")
            .map_err(|_| symbol_missing("cuDeviceGetCount"))?;
        let code = init(0);
        if code != 0 {
            return Err(CudaUnavailable::DriverError {
                device,
                call: "cuInit",
                code,
            });
        }
        let mut count = 0i32;
        let code = get_count(&mut count);
        if code != 0 {
            return Err(CudaUnavailable::DriverError {
                device,
                call: "cuDeviceGetCount",
                code,
            });
        }
        Ok(count)
    }
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
    fn cuda_without_the_driver_library_names_it() {
        let libraries = CudaLibraries {
            driver: "libmeshtune-no-such-driver.so.1".into(),
            ..CudaLibraries::default()
        };
        let err = check_cuda(0, &libraries).expect_err("no such library");
        assert!(
            matches!(&err, CudaUnavailable::DriverMissing { library, .. }
                if library == "libmeshtune-no-such-driver.so.1"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("--device cuda:0"), "{text}");
        assert!(text.contains("libmeshtune-no-such-driver.so.1"), "{text}");
        assert!(text.contains("NVIDIA driver"), "{text}");
    }

    #[test]
    fn a_library_that_is_not_the_driver_is_refused_by_symbol() {
        let libraries = CudaLibraries {
            driver: "libc.so.6".into(),
            ..CudaLibraries::default()
        };
        let err = check_cuda(1, &libraries).expect_err("libc is not libcuda");
        assert!(
            matches!(
                err,
                CudaUnavailable::SymbolMissing {
                    symbol: "cuInit",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("cuda:1"), "{err}");
    }

    #[test]
    fn cpu_always_passes_the_device_check() {
        check_device(DeviceChoice::Cpu).expect("cpu");
        if !cfg!(feature = "cuda") {
            let err = check_device(DeviceChoice::Cuda(0)).expect_err("no CUDA backend");
            assert!(err.to_string().contains("--features cuda"), "{err}");
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
