//! GPU telemetry through NVML (nvml-wrapper, loaded at run time): utilisation, memory and
//! temperature of each GPU, for `/health` and `/metrics`. Where NVML is absent (no driver, or
//! a build without `cuda`) [`status`] says why instead of making numbers up.

use serde::Serialize;

/// One GPU as NVML reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GpuStatus {
    pub index: u32,
    pub name: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_celsius: u32,
}

/// Every GPU's current state, or why there is none to report.
#[cfg(feature = "cuda")]
pub fn status() -> Result<Vec<GpuStatus>, String> {
    use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
    use nvml_wrapper::Nvml;
    use std::sync::OnceLock;

    static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();
    let nvml = NVML
        .get_or_init(|| Nvml::init().map_err(|e| format!("NVML is not available: {e}")))
        .as_ref()
        .map_err(Clone::clone)?;
    let count = nvml.device_count().map_err(|e| format!("NVML: {e}"))?;
    (0..count)
        .map(|i| {
            let d = nvml
                .device_by_index(i)
                .map_err(|e| format!("NVML device {i}: {e}"))?;
            let mem = d.memory_info().map_err(|e| format!("NVML memory: {e}"))?;
            Ok(GpuStatus {
                index: i,
                name: d.name().unwrap_or_default(),
                utilization_percent: d.utilization_rates().map_or(0, |u| u.gpu),
                memory_used_bytes: mem.used,
                memory_total_bytes: mem.total,
                temperature_celsius: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            })
        })
        .collect()
}

/// Every GPU's current state, or why there is none to report.
#[cfg(not(feature = "cuda"))]
pub fn status() -> Result<Vec<GpuStatus>, String> {
    Err("this build has no CUDA support (built without the `cuda` feature)".into())
}
