//! The static side of the kernels' performance: what ptxas reports per kernel (registers,
//! stack, spills, static shared memory; build.rs keeps the report) and the theoretical
//! occupancy on sm_90 (H100/H200) those imply at the block size and dynamic shared memory
//! the backend launches each kernel with. No GPU needed: `tests/cuda.rs` prints the table.

use crate::backend::kernels::anchor_launches;

/// The ptxas report of the embedded kernels (`nvcc -Xptxas -v`, every architecture).
pub static PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas-report.txt"));

/// One kernel's resources on one architecture, as ptxas reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelResources {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub static_smem: u32,
}

/// The number before `unit` in `line` (e.g. "253" in "Used 253 registers").
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses a `-Xptxas -v` report: one entry per kernel and architecture.
pub fn parse_ptxas(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in report.lines() {
        // "... Compiling entry function 'NAME' for 'ARCH'"
        if line.contains("Compiling entry function '") {
            let quoted: Vec<&str> = line.split('\'').collect();
            out.push(KernelResources {
                name: quoted.get(1).copied().unwrap_or_default().to_string(),
                arch: quoted.get(3).copied().unwrap_or_default().to_string(),
                ..Default::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.static_smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// sm_90's limits per multiprocessor (CUDA C++ Programming Guide, compute capability 9.0).
const SM90_REGISTERS: u32 = 65536;
const SM90_MAX_WARPS: u32 = 64;
const SM90_MAX_BLOCKS: u32 = 32;
const SM90_SMEM: u32 = 228 * 1024;
/// Shared memory the runtime reserves per block.
const SM90_SMEM_RESERVED: u32 = 1024;
/// Registers are allocated per warp in units of 256.
const REG_ALLOC_UNIT: u32 = 256;

/// Resident blocks per multiprocessor and the theoretical occupancy (resident warps over 64)
/// of `k` launched with `threads` per block and `dyn_smem` bytes of dynamic shared memory,
/// and what limits it.
pub fn occupancy_sm90(k: &KernelResources, threads: u32, dyn_smem: u32) -> (u32, f32, &str) {
    let warps = threads.div_ceil(32);
    let regs_per_warp = (k.registers.max(1) * 32).next_multiple_of(REG_ALLOC_UNIT);
    let by_regs = SM90_REGISTERS / (regs_per_warp * warps);
    let smem = k.static_smem + dyn_smem + SM90_SMEM_RESERVED;
    let by_smem = SM90_SMEM / smem;
    let by_warps = SM90_MAX_WARPS / warps;
    let limits = [
        (by_regs, "registers"),
        (by_smem, "shared memory"),
        (by_warps, "threads"),
        (SM90_MAX_BLOCKS, "blocks"),
    ];
    let (blocks, why) = limits.into_iter().min_by_key(|l| l.0).expect("four limits");
    (blocks, (blocks * warps) as f32 / SM90_MAX_WARPS as f32, why)
}

/// How the backend launches each kernel: threads per block and dynamic shared memory at the
/// anchor shape (`kernels::anchor_launches`: Llama-3-8B; the specialised attention kernels at
/// their own shapes).
pub fn launch_geometry(kernel: &str) -> Option<(u32, u32)> {
    anchor_launches()
        .into_iter()
        .find(|l| l.kernel == kernel)
        .map(|l| (l.block, l.shared))
}

/// The table for sm_90a: per kernel, ptxas's figures and the occupancy they imply.
pub fn sm90_table() -> String {
    let mut s = format!(
        "{:<20} {:>7} {:>5} {:>6} {:>6} {:>8} {:>8} {:>6} {:>9}  {}\n",
        "kernel (sm_90a)",
        "threads",
        "regs",
        "stack",
        "spills",
        "smem",
        "dyn smem",
        "blocks",
        "occupancy",
        "limited by"
    );
    for k in parse_ptxas(PTXAS_REPORT)
        .iter()
        .filter(|k| k.arch == "sm_90a")
    {
        let Some((threads, dyn_smem)) = launch_geometry(&k.name) else {
            continue;
        };
        let (blocks, occ, why) = occupancy_sm90(k, threads, dyn_smem);
        s += &format!(
            "{:<20} {:>7} {:>5} {:>6} {:>6} {:>8} {:>8} {:>6} {:>8.0}%  {why}\n",
            k.name,
            threads,
            k.registers,
            k.stack_bytes,
            k.spill_stores + k.spill_loads,
            k.static_smem,
            dyn_smem,
            blocks,
            occ * 100.0
        );
    }
    s
}
