//! Energy: power readers behind one trait, and a meter that turns them into joules.
//!
//! Readers, tried in this order by [`detect`] (or chosen with `--power`):
//! - `jetson`: the INA3221 power monitors of Jetson modules in sysfs (the source `tegrastats`
//!   reads): hwmon `in{N}_label` / `in{N}_input` (mV) / `curr{N}_input` (mA) on JetPack 5/6,
//!   iio `rail_name_{N}` / `in_power{N}_input` (mW) on JetPack 4. The module's input rail
//!   (`VDD_IN`, `VIN_SYS_5V0`) when present, else the sum of all rails.
//! - `nvml`: NVIDIA GPUs through `libnvidia-ml.so.1` (loaded at run time, so the binary needs no
//!   NVIDIA library to start): total energy counter (Volta and newer), else power usage.
//! - `rapl`: Linux CPU packages, `/sys/class/powercap/intel-rapl:N/energy_uj` (also AMD), when
//!   readable (often root only); counter wraparound at `max_energy_range_uj` handled.
//! - `unavailable`: no reading; reported as such, never invented.
//!
//! Readers measure the whole device (package, GPU, module), not one process: several nodes on
//! one machine share (and each report) the same energy.
//!
//! Owns: sysfs parsing, the NVML calls, integration of power into energy. Must not touch:
//! rounds or training (the coordinator reads the meter around phases).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One reading of a source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// Cumulative energy in joules since an arbitrary origin.
    Energy(f64),
    /// Instantaneous power in watts.
    Power(f64),
}

/// Why a power reader could not be set up or a reading failed.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a number: {text:?}", path.display())]
    NotANumber { path: PathBuf, text: String },
    #[error("{call} returned NVML status {status}")]
    Nvml { call: &'static str, status: i32 },
    #[error("no power reader on this machine")]
    Unavailable,
    #[error("unknown power source `{0}`: use auto, jetson, nvml, rapl or none")]
    UnknownSource(String),
    #[error("--power {what}: no readable {what} source ({})", place.display())]
    Missing { what: &'static str, place: PathBuf },
}

/// A source of power or energy readings.
pub trait PowerReader: Send {
    /// Logged at start and shown in reports (e.g. `rapl (2 packages)`).
    fn name(&self) -> String;
    fn read(&mut self) -> Result<Reading, PowerError>;
}

fn read_number(path: &Path) -> Result<f64, PowerError> {
    let text = std::fs::read_to_string(path).map_err(|source| PowerError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim()
        .parse::<f64>()
        .map_err(|_| PowerError::NotANumber {
            path: path.to_path_buf(),
            text: text.trim().to_owned(),
        })
}

/// Linux powercap RAPL package domains.
pub struct Rapl {
    domains: Vec<RaplDomain>,
}

struct RaplDomain {
    energy: PathBuf,
    max_range_uj: f64,
    last_uj: Option<f64>,
    total_uj: f64,
}

impl Rapl {
    /// The package domains under `root` (normally `/sys/class/powercap`) whose counters can
    /// be read; `None` when there are none.
    pub fn discover(root: &Path) -> Option<Self> {
        let mut names: Vec<String> = std::fs::read_dir(root)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            // Packages are `intel-rapl:N`; `intel-rapl:N:M` are their sub-zones (core, dram),
            // already contained in the package counter.
            .filter(|n| {
                n.strip_prefix("intel-rapl:")
                    .is_some_and(|i| !i.contains(':'))
            })
            .collect();
        names.sort();
        let domains: Vec<RaplDomain> = names
            .iter()
            .filter_map(|name| {
                let dir = root.join(name);
                let energy = dir.join("energy_uj");
                read_number(&energy).ok()?;
                Some(RaplDomain {
                    energy,
                    max_range_uj: read_number(&dir.join("max_energy_range_uj")).unwrap_or(0.0),
                    last_uj: None,
                    total_uj: 0.0,
                })
            })
            .collect();
        (!domains.is_empty()).then_some(Self { domains })
    }
}

impl PowerReader for Rapl {
    fn name(&self) -> String {
        format!("rapl ({} package domains)", self.domains.len())
    }

    fn read(&mut self) -> Result<Reading, PowerError> {
        let mut joules = 0.0;
        for domain in &mut self.domains {
            let now = read_number(&domain.energy)?;
            if let Some(last) = domain.last_uj {
                domain.total_uj += if now >= last {
                    now - last
                } else {
                    // The counter wrapped at max_energy_range_uj.
                    domain.max_range_uj - last + now
                };
            }
            domain.last_uj = Some(now);
            joules += domain.total_uj / 1e6;
        }
        Ok(Reading::Energy(joules))
    }
}

/// Jetson INA3221 rails.
pub struct JetsonIna3221 {
    rails: Vec<Rail>,
}

enum Rail {
    /// hwmon (JetPack 5/6): millivolts and milliamps.
    VoltsAmps {
        name: String,
        millivolts: PathBuf,
        milliamps: PathBuf,
    },
    /// iio (JetPack 4): milliwatts.
    Milliwatts { name: String, path: PathBuf },
}

impl Rail {
    fn name(&self) -> &str {
        match self {
            Rail::VoltsAmps { name, .. } | Rail::Milliwatts { name, .. } => name,
        }
    }

    fn watts(&self) -> Result<f64, PowerError> {
        match self {
            Rail::VoltsAmps {
                millivolts,
                milliamps,
                ..
            } => Ok(read_number(millivolts)? * read_number(milliamps)? / 1e6),
            Rail::Milliwatts { path, .. } => Ok(read_number(path)? / 1e3),
        }
    }
}

/// Rails that measure the whole module's input.
const INPUT_RAILS: [&str; 3] = ["VDD_IN", "VIN_SYS_5V0", "POM_5V_IN"];

fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

impl JetsonIna3221 {
    /// The INA3221 rails under `root` (normally `/sys/bus/i2c/drivers`); `None` on a machine
    /// without them.
    pub fn discover(root: &Path) -> Option<Self> {
        let mut rails = Vec::new();
        // JetPack 5/6: ina3221/<bus-addr>/hwmon/hwmonN/in{N}_label.
        for device in dir_entries(&root.join("ina3221")) {
            for hwmon in dir_entries(&device.join("hwmon")) {
                for channel in 1..=8 {
                    let Ok(label) =
                        std::fs::read_to_string(hwmon.join(format!("in{channel}_label")))
                    else {
                        continue;
                    };
                    let rail = Rail::VoltsAmps {
                        name: label.trim().to_owned(),
                        millivolts: hwmon.join(format!("in{channel}_input")),
                        milliamps: hwmon.join(format!("curr{channel}_input")),
                    };
                    if rail.watts().is_ok() {
                        rails.push(rail);
                    }
                }
            }
        }
        // JetPack 4: ina3221x/<bus-addr>/iio:deviceN/rail_name_{N}.
        for device in dir_entries(&root.join("ina3221x")) {
            for iio in dir_entries(&device) {
                for channel in 0..8 {
                    let Ok(label) =
                        std::fs::read_to_string(iio.join(format!("rail_name_{channel}")))
                    else {
                        continue;
                    };
                    let rail = Rail::Milliwatts {
                        name: label.trim().to_owned(),
                        path: iio.join(format!("in_power{channel}_input")),
                    };
                    if rail.watts().is_ok() {
                        rails.push(rail);
                    }
                }
            }
        }
        if let Some(i) = rails.iter().position(|r| INPUT_RAILS.contains(&r.name())) {
            rails = vec![rails.swap_remove(i)];
        }
        (!rails.is_empty()).then_some(Self { rails })
    }
}

impl PowerReader for JetsonIna3221 {
    fn name(&self) -> String {
        let names: Vec<&str> = self.rails.iter().map(Rail::name).collect();
        format!("jetson ina3221 ({})", names.join(" + "))
    }

    fn read(&mut self) -> Result<Reading, PowerError> {
        let mut watts = 0.0;
        for rail in &self.rails {
            watts += rail.watts()?;
        }
        Ok(Reading::Power(watts))
    }
}

/// NVIDIA GPUs through NVML ([`crate::nvml`]).
pub struct Nvml(crate::nvml::Nvml);

impl Nvml {
    /// Every GPU NVML reports; `None` without the library, a driver or a GPU.
    pub fn discover() -> Option<Self> {
        crate::nvml::Nvml::load().map(Self)
    }
}

impl PowerReader for Nvml {
    fn name(&self) -> String {
        let count = self.0.device_count();
        format!(
            "nvml ({count} GPU{}, {})",
            if count == 1 { "" } else { "s" },
            if self.0.has_energy_counter() {
                "energy counter"
            } else {
                "power usage"
            }
        )
    }

    fn read(&mut self) -> Result<Reading, PowerError> {
        match self.0.total_energy_j() {
            Some(joules) => joules.map(Reading::Energy),
            None => self.0.power_w().map(Reading::Power),
        }
    }
}

/// No source: every reading is an error, and the meter reports `None`.
pub struct Unavailable;

impl PowerReader for Unavailable {
    fn name(&self) -> String {
        "unavailable".into()
    }

    fn read(&mut self) -> Result<Reading, PowerError> {
        Err(PowerError::Unavailable)
    }
}

/// `--power`: which reader to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PowerSource {
    /// Jetson, then NVML, then RAPL, else unavailable.
    #[default]
    Auto,
    Jetson,
    Nvml,
    Rapl,
    None,
}

impl std::str::FromStr for PowerSource {
    type Err = PowerError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(PowerSource::Auto),
            "jetson" => Ok(PowerSource::Jetson),
            "nvml" => Ok(PowerSource::Nvml),
            "rapl" => Ok(PowerSource::Rapl),
            "none" => Ok(PowerSource::None),
            other => Err(PowerError::UnknownSource(other.to_owned())),
        }
    }
}

/// The reader for `source` on this machine. A source asked for by name that is not there is
/// an error (the user expected numbers); `auto` falls back to `unavailable`.
pub fn detect(source: PowerSource) -> Result<Box<dyn PowerReader>, PowerError> {
    detect_in(
        source,
        Path::new("/sys/bus/i2c/drivers"),
        Path::new("/sys/class/powercap"),
    )
}

fn detect_in(
    source: PowerSource,
    i2c: &Path,
    powercap: &Path,
) -> Result<Box<dyn PowerReader>, PowerError> {
    let jetson = || JetsonIna3221::discover(i2c).map(|r| Box::new(r) as Box<dyn PowerReader>);
    let nvml = || Nvml::discover().map(|r| Box::new(r) as Box<dyn PowerReader>);
    let rapl = || Rapl::discover(powercap).map(|r| Box::new(r) as Box<dyn PowerReader>);
    let missing = |what: &'static str, place: &Path| PowerError::Missing {
        what,
        place: place.to_path_buf(),
    };
    match source {
        PowerSource::Auto => Ok(jetson()
            .or_else(nvml)
            .or_else(rapl)
            .unwrap_or_else(|| Box::new(Unavailable))),
        PowerSource::Jetson => jetson().ok_or_else(|| missing("jetson", i2c)),
        PowerSource::Nvml => {
            nvml().ok_or_else(|| missing("nvml", Path::new("libnvidia-ml.so.1 or a GPU")))
        }
        PowerSource::Rapl => rapl().ok_or_else(|| missing("rapl", powercap)),
        PowerSource::None => Ok(Box::new(Unavailable)),
    }
}

/// Cumulative joules from any reader: energy counters are read on demand, power readers are
/// sampled on a background thread (every `interval`) and integrated with the trapezoid rule.
#[derive(Clone)]
pub struct EnergyMeter {
    name: String,
    inner: Arc<Mutex<MeterState>>,
}

/// A sampler that panicked mid-sample leaves a consistent state (each field is written whole),
/// so a poisoned lock is used, not skipped.
fn lock_state(inner: &Mutex<MeterState>) -> std::sync::MutexGuard<'_, MeterState> {
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct MeterState {
    reader: Box<dyn PowerReader>,
    /// Energy counter value at start (counter readers).
    origin: Option<f64>,
    /// Integrated joules and the last power sample (power readers).
    integrated: f64,
    last: Option<(Instant, f64)>,
    failed: bool,
}

impl MeterState {
    fn sample(&mut self, now: Instant) -> Option<f64> {
        if self.failed {
            return None;
        }
        match self.reader.read() {
            Ok(Reading::Energy(joules)) => {
                let origin = *self.origin.get_or_insert(joules);
                Some(joules - origin)
            }
            Ok(Reading::Power(watts)) => {
                if let Some((at, previous)) = self.last {
                    self.integrated += (previous + watts) / 2.0 * (now - at).as_secs_f64();
                }
                self.last = Some((now, watts));
                Some(self.integrated)
            }
            Err(err) => {
                tracing::warn!(
                    reader = self.reader.name(),
                    error = %err,
                    "power reader failed; energy is unavailable from now on"
                );
                self.failed = true;
                None
            }
        }
    }
}

impl std::fmt::Debug for EnergyMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnergyMeter")
            .field("reader", &self.name)
            .finish()
    }
}

impl EnergyMeter {
    /// Starts metering; power readers get a sampling thread that lives as long as the meter.
    pub fn start(reader: Box<dyn PowerReader>, interval: Duration) -> Self {
        let name = reader.name();
        let inner = Arc::new(Mutex::new(MeterState {
            reader,
            origin: None,
            integrated: 0.0,
            last: None,
            failed: false,
        }));
        let first = {
            let mut state = lock_state(&inner);
            state.sample(Instant::now()).map(|_| state.last.is_some())
        };
        if first == Some(true) {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("power-sampler".into())
                .spawn(move || {
                    while let Some(inner) = weak.upgrade() {
                        if lock_state(&inner).sample(Instant::now()).is_none() {
                            break;
                        }
                        drop(inner);
                        std::thread::sleep(interval);
                    }
                })
                .ok();
        }
        Self { name, inner }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Joules since the meter started, `None` when unavailable.
    pub fn joules(&self) -> Option<f64> {
        lock_state(&self.inner).sample(Instant::now())
    }
}

/// The energy and time split of one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundEnergy {
    /// Joules while training (compute).
    pub compute_j: Option<f64>,
    /// Joules in the rest of the round but evaluation: publishing, collecting and fetching
    /// peers' deltas, aggregating, checkpointing (communication).
    pub comm_j: Option<f64>,
    /// Training tokens (source + target, no padding) per joule of compute: tokens/s/W.
    pub tokens_per_s_per_w: Option<f64>,
    /// Granularity G = T_comp / T_comm (the reference study's measure).
    pub granularity: Option<f64>,
}

impl RoundEnergy {
    /// From the phase durations (seconds) and energies (joules).
    pub fn new(
        tokens: u64,
        seconds_train: f64,
        seconds_comm: f64,
        compute_j: Option<f64>,
        comm_j: Option<f64>,
    ) -> Self {
        let positive = |v: f64| (v.is_finite() && v > 0.0).then_some(v);
        Self {
            compute_j,
            comm_j,
            tokens_per_s_per_w: compute_j
                .and_then(positive)
                .filter(|_| tokens > 0)
                .map(|j| tokens as f64 / j),
            granularity: positive(seconds_comm)
                .filter(|_| seconds_train > 0.0)
                .map(|c| seconds_train / c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn rapl_sums_packages_skips_subzones_and_handles_wraparound() {
        let root = tempfile::tempdir().expect("tmp");
        let p = root.path();
        write(&p.join("intel-rapl:0/energy_uj"), "1000000\n");
        write(
            &p.join("intel-rapl:0/max_energy_range_uj"),
            "262143328850\n",
        );
        write(&p.join("intel-rapl:1/energy_uj"), "262143000000\n");
        write(
            &p.join("intel-rapl:1/max_energy_range_uj"),
            "262143328850\n",
        );
        write(&p.join("intel-rapl:0:0/energy_uj"), "999\n");
        let mut rapl = Rapl::discover(p).expect("found");
        assert_eq!(rapl.name(), "rapl (2 package domains)");
        assert_eq!(rapl.read().expect("read"), Reading::Energy(0.0));
        // Package 0 gains 2.5 J; package 1 wraps: 328850 uJ to the top, then 1_000_000.
        write(&p.join("intel-rapl:0/energy_uj"), "3500000\n");
        write(&p.join("intel-rapl:1/energy_uj"), "1000000\n");
        let Reading::Energy(j) = rapl.read().expect("read") else {
            panic!("counter")
        };
        assert!((j - (2.5 + 1.328_850)).abs() < 1e-9, "{j}");
        // Unreadable counters are not a source.
        let empty = tempfile::tempdir().expect("tmp");
        assert!(Rapl::discover(empty.path()).is_none());
    }

    #[test]
    fn jetson_hwmon_prefers_the_input_rail_and_iio_sums_rails() {
        let root = tempfile::tempdir().expect("tmp");
        let hw = root.path().join("ina3221/1-0040/hwmon/hwmon3");
        for (n, label, mv, ma) in [
            (1, "VDD_GPU_SOC", "5000", "1200"),
            (2, "VDD_CPU_CV", "5000", "800"),
            (3, "VIN_SYS_5V0", "5080", "3000"),
        ] {
            write(&hw.join(format!("in{n}_label")), &format!("{label}\n"));
            write(&hw.join(format!("in{n}_input")), mv);
            write(&hw.join(format!("curr{n}_input")), ma);
        }
        let mut jetson = JetsonIna3221::discover(root.path()).expect("found");
        assert_eq!(jetson.name(), "jetson ina3221 (VIN_SYS_5V0)");
        let Reading::Power(w) = jetson.read().expect("read") else {
            panic!("power")
        };
        assert!((w - 15.24).abs() < 1e-9, "{w}");

        let old = tempfile::tempdir().expect("tmp");
        let iio = old.path().join("ina3221x/6-0040/iio:device0");
        write(&iio.join("rail_name_0"), "GPU\n");
        write(&iio.join("in_power0_input"), "2500\n");
        write(&iio.join("rail_name_1"), "CPU\n");
        write(&iio.join("in_power1_input"), "1500\n");
        let mut jetson = JetsonIna3221::discover(old.path()).expect("found");
        assert_eq!(jetson.name(), "jetson ina3221 (GPU + CPU)");
        assert_eq!(jetson.read().expect("read"), Reading::Power(4.0));
    }

    struct Scripted(Vec<Reading>);

    impl PowerReader for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }
        fn read(&mut self) -> Result<Reading, PowerError> {
            if self.0.is_empty() {
                Err(PowerError::Unavailable)
            } else {
                Ok(self.0.remove(0))
            }
        }
    }

    #[test]
    fn power_is_integrated_by_trapezoid_and_counters_are_differenced() {
        let t0 = Instant::now();
        let mut state = MeterState {
            reader: Box::new(Scripted(vec![
                Reading::Power(10.0),
                Reading::Power(20.0),
                Reading::Power(20.0),
            ])),
            origin: None,
            integrated: 0.0,
            last: None,
            failed: false,
        };
        assert_eq!(state.sample(t0), Some(0.0));
        // 0.5 s ramping 10 -> 20 W: 7.5 J; then 1 s at 20 W: 20 J.
        assert_eq!(state.sample(t0 + Duration::from_millis(500)), Some(7.5));
        assert_eq!(state.sample(t0 + Duration::from_millis(1500)), Some(27.5));
        // A failing reader makes the meter unavailable, not zero.
        assert_eq!(state.sample(t0 + Duration::from_secs(2)), None);
        assert_eq!(state.sample(t0 + Duration::from_secs(3)), None);

        let meter = EnergyMeter::start(
            Box::new(Scripted(vec![
                Reading::Energy(100.0),
                Reading::Energy(142.5),
            ])),
            Duration::from_secs(3600),
        );
        assert_eq!(meter.name(), "scripted");
        assert_eq!(meter.joules(), Some(42.5));
        assert_eq!(meter.joules(), None);
        let none = EnergyMeter::start(Box::new(Unavailable), Duration::from_secs(1));
        assert_eq!(none.joules(), None);
    }

    #[test]
    fn round_energy_arithmetic() {
        // 4096 tokens in 2 s using 50 J: 2048 tok/s at 25 W = 81.92 tok/s/W; G = 2 / 0.5.
        let e = RoundEnergy::new(4096, 2.0, 0.5, Some(50.0), Some(5.0));
        assert_eq!(e.tokens_per_s_per_w, Some(81.92));
        assert_eq!(e.granularity, Some(4.0));
        let none = RoundEnergy::new(4096, 2.0, 0.0, None, None);
        assert_eq!(none.tokens_per_s_per_w, None);
        assert_eq!(none.granularity, None);
    }

    #[test]
    fn sources_by_name() {
        assert_eq!(
            "auto".parse::<PowerSource>().expect("auto"),
            PowerSource::Auto
        );
        let unknown = "gpu".parse::<PowerSource>().expect_err("unknown");
        assert!(
            matches!(&unknown, PowerError::UnknownSource(name) if name == "gpu"),
            "{unknown}"
        );
        assert!(unknown.to_string().contains("use auto"), "{unknown}");
        let empty = tempfile::tempdir().expect("tmp");
        let err = detect_in(PowerSource::Rapl, empty.path(), empty.path())
            .err()
            .expect("nothing there");
        assert!(
            matches!(err, PowerError::Missing { what: "rapl", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("no readable rapl source"), "{err}");
        let auto = detect_in(PowerSource::None, empty.path(), empty.path()).expect("none");
        assert_eq!(auto.name(), "unavailable");
    }
}
