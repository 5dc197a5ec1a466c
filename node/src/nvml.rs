//! NVIDIA's management library, loaded at run time (`libnvidia-ml.so.1`) so the binary starts
//! on machines without an NVIDIA driver. The one NVML loader of the node: the precision rule
//! ([`crate::device`]: a GPU's name and compute capability) and the energy reader
//! ([`crate::energy`]: its energy counter or power draw) both go through [`Nvml`].
//!
//! Owns: the library handle and the symbols, looked up with the signatures of NVML's public
//! header (nvml.h). Must not touch: anything but NVML.

use std::ffi::{CStr, c_char, c_void};

type Device = *mut c_void;
type Return = i32;
type NameFn = unsafe extern "C" fn(Device, *mut c_char, u32) -> Return;
type CapabilityFn = unsafe extern "C" fn(Device, *mut i32, *mut i32) -> Return;
type PowerUsageFn = unsafe extern "C" fn(Device, *mut u32) -> Return;
type TotalEnergyFn = unsafe extern "C" fn(Device, *mut u64) -> Return;

/// Every GPU NVML reports, and the calls the node makes on them.
pub struct Nvml {
    // Kept alive: the function pointers below point into it.
    _library: libloading::Library,
    devices: Vec<Device>,
    name: NameFn,
    capability: CapabilityFn,
    power_usage: PowerUsageFn,
    /// Volta and newer; `None` where a device does not count energy.
    total_energy: Option<TotalEnergyFn>,
}

// SAFETY: NVML is thread-safe (documented), and the device handles are plain identifiers.
unsafe impl Send for Nvml {}

impl Nvml {
    /// The library with its GPUs; `None` without the library, a driver or a GPU.
    pub fn load() -> Option<Self> {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions; every
        // symbol is looked up with the signature of nvml.h, and the out-pointers are valid.
        unsafe {
            let library = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init: libloading::Symbol<unsafe extern "C" fn() -> Return> =
                library.get(b"nvmlInit_v2").ok()?;
            if init() != 0 {
                return None;
            }
            let count_fn: libloading::Symbol<unsafe extern "C" fn(*mut u32) -> Return> =
                library.get(b"nvmlDeviceGetCount_v2").ok()?;
            let handle_fn: libloading::Symbol<unsafe extern "C" fn(u32, *mut Device) -> Return> =
                library.get(b"nvmlDeviceGetHandleByIndex_v2").ok()?;
            let mut count = 0u32;
            if count_fn(&mut count) != 0 || count == 0 {
                return None;
            }
            let mut devices = Vec::new();
            for index in 0..count {
                let mut device = std::ptr::null_mut();
                if handle_fn(index, &mut device) == 0 {
                    devices.push(device);
                }
            }
            let total_energy = library
                .get::<TotalEnergyFn>(b"nvmlDeviceGetTotalEnergyConsumption")
                .ok()
                .map(|s| *s)
                .filter(|f| {
                    let mut mj = 0u64;
                    devices.iter().all(|d| f(*d, &mut mj) == 0)
                });
            let nvml = Self {
                name: *library.get(b"nvmlDeviceGetName").ok()?,
                capability: *library.get(b"nvmlDeviceGetCudaComputeCapability").ok()?,
                power_usage: *library.get(b"nvmlDeviceGetPowerUsage").ok()?,
                total_energy,
                devices,
                _library: library,
            };
            (!nvml.devices.is_empty()).then_some(nvml)
        }
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// The marketing name of GPU `index` ("NVIDIA H100 80GB HBM3").
    pub fn name(&self, index: usize) -> Option<String> {
        let device = *self.devices.get(index)?;
        let mut buffer = [0 as c_char; 96];
        // SAFETY: a handle from `load` and a buffer as long as we say it is; NVML writes a
        // NUL-terminated string into it on success.
        unsafe {
            ((self.name)(device, buffer.as_mut_ptr(), buffer.len() as u32) == 0).then(|| {
                CStr::from_ptr(buffer.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            })
        }
    }

    /// The CUDA compute capability of GPU `index` (major, minor).
    pub fn compute_capability(&self, index: usize) -> Option<(u32, u32)> {
        let device = *self.devices.get(index)?;
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: a handle from `load` and two valid out-pointers.
        if unsafe { (self.capability)(device, &mut major, &mut minor) } != 0 {
            return None;
        }
        Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?))
    }

    /// Whether every GPU counts its energy (else only its power draw can be read).
    pub fn has_energy_counter(&self) -> bool {
        self.total_energy.is_some()
    }

    /// Joules every GPU consumed since the driver loaded, summed; `None` without counters.
    pub fn total_energy_j(&self) -> Option<Result<f64, crate::energy::PowerError>> {
        let total = self.total_energy?;
        let mut joules = 0.0;
        for device in &self.devices {
            let mut mj = 0u64;
            // SAFETY: a handle from `load` and an out-pointer to a u64.
            let status = unsafe { total(*device, &mut mj) };
            if status != 0 {
                return Some(Err(crate::energy::PowerError::Nvml {
                    call: "nvmlDeviceGetTotalEnergyConsumption",
                    status,
                }));
            }
            joules += mj as f64 / 1e3;
        }
        Some(Ok(joules))
    }

    /// Watts every GPU draws now, summed.
    pub fn power_w(&self) -> Result<f64, crate::energy::PowerError> {
        let mut watts = 0.0;
        for device in &self.devices {
            let mut mw = 0u32;
            // SAFETY: a handle from `load` and an out-pointer to a u32.
            let status = unsafe { (self.power_usage)(*device, &mut mw) };
            if status != 0 {
                return Err(crate::energy::PowerError::Nvml {
                    call: "nvmlDeviceGetPowerUsage",
                    status,
                });
            }
            watts += f64::from(mw) / 1e3;
        }
        Ok(watts)
    }
}
