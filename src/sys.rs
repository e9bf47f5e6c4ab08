//! What the operating system says about memory: the system's total and available memory
//! (`/proc/meminfo`, for the default KV pool size and the health check) and this process's
//! resident and peak resident set (`/proc/self/status`). Every reader answers `None` where the
//! file or the field is absent (not Linux, a restricted sandbox) instead of failing.

/// The system's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: Option<u64>,
    /// Memory available for new allocations without swapping (`MemAvailable`).
    pub available_bytes: Option<u64>,
}

impl MemInfo {
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            total_bytes: kib_field(&text, "MemTotal:"),
            available_bytes: kib_field(&text, "MemAvailable:"),
        }
    }
}

/// This process's resident set (`VmRSS`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    self_status("VmRSS:")
}

/// This process's largest resident set so far (`VmHWM`), in bytes.
pub fn peak_resident_bytes() -> Option<u64> {
    self_status("VmHWM:")
}

fn self_status(field: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// The value of a `Name:   1234 kB` line, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_in_bytes() {
        let text = "MemTotal:       24591172 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(kib_field(text, "MemTotal:"), Some(24591172 * 1024));
        assert_eq!(kib_field(text, "MemAvailable:"), Some(20000000 * 1024));
        assert_eq!(kib_field(text, "SwapTotal:"), None);
        if cfg!(target_os = "linux") {
            let m = MemInfo::read();
            assert!(m.total_bytes.unwrap() >= m.available_bytes.unwrap());
            assert!(peak_resident_bytes().unwrap() >= resident_bytes().unwrap() / 2);
        }
    }
}
