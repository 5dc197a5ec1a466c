//! Choosing the compute device. Every command is written once, generic over the burn
//! backend; [`dispatch!`](crate::dispatch) instantiates it for the backend the user picked.

use std::str::FromStr;

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
