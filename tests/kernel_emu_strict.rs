//! The emulator's strict rules, each shown on a kernel broken on purpose
//! (`tests/kernel_emu/broken/`) that computes the right answer under the former rules
//! (threads in ascending order, static shared memory zeroed once, shuffle masks and launch
//! limits ignored) and fails now: a race whose writer has the lower thread index, a read of
//! shared memory before any write, a shuffle outside its mask, a block above its
//! `__launch_bounds__`, shared memory above the 48 KB default without the attribute (and
//! above sm_90's 227 KB with it); and a tensor-core product in divergent code (a rule that
//! came with the first such product). Also the launch log.

use std::ffi::c_void;
use std::path::PathBuf;

mod kernel_emu;

use kernel_emu::Emulator;

fn broken(file: &str) -> Emulator {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emu/broken");
    Emulator::load(&kernel_emu::build(&[src.join(file)]))
}

fn lib() -> &'static Emulator {
    static LIB: std::sync::OnceLock<Emulator> = std::sync::OnceLock::new();
    LIB.get_or_init(|| broken("broken.cu"))
}

/// Launches `kernel` on (grid, block, dynamic shared bytes) with its arguments: `input`'s
/// address if any, `out`'s, then `extra` if any.
fn run(
    emu: &Emulator,
    kernel: &str,
    (grid, block, smem): (u32, u32, u32),
    input: Option<&[f32]>,
    out: &mut [f32],
    extra: Option<i32>,
) -> Result<(), String> {
    out.fill(f32::NAN);
    let o = out.as_mut_ptr() as u64;
    let i = input.map_or(0, |x| x.as_ptr() as u64);
    let n = extra.unwrap_or(0);
    let mut args: Vec<*mut c_void> = Vec::new();
    if input.is_some() {
        args.push(&i as *const u64 as *mut c_void);
    }
    args.push(&o as *const u64 as *mut c_void);
    if extra.is_some() {
        args.push(&n as *const i32 as *mut c_void);
    }
    // SAFETY: the argument lists match the kernels of broken.cu; `out` and `input` hold what
    // each kernel reads and writes at these shapes.
    unsafe { emu.launch(kernel, (grid, 1, 1), block, smem, &mut args) }
}

/// The reason a launch with only `out` as argument fails.
fn fails(emu: &Emulator, kernel: &str, shape: (u32, u32, u32), out: &mut [f32]) -> String {
    run(emu, kernel, shape, None, out, None).unwrap_err()
}

/// A race whose writer is thread 0: right in ascending order (seed 0, the former schedule),
/// wrong under the drawn orders.
#[test]
fn a_race_with_a_lower_index_writer_fails() {
    let emu = lib();
    let (blocks, threads) = (64u32, 64u32);
    let mut out = vec![0f32; (blocks * threads) as usize];
    let before = emu.seed();
    for seed in [0, 1, 2, 0x5eed, before.max(1)] {
        emu.set_seed(seed);
        let grid = (blocks, threads, 0);
        run(emu, "race_missing_barrier", grid, None, &mut out, None).unwrap();
        let stale = out.iter().filter(|v| v.is_nan()).count();
        if seed == 0 {
            assert_eq!(stale, 0, "ascending order: the race stays hidden");
            assert!(out
                .iter()
                .enumerate()
                .all(|(i, &v)| v == 1.0 + (i / threads as usize) as f32));
        } else {
            assert!(
                stale > 0,
                "SG_EMU_SEED={seed}: no thread read before thread 0 wrote"
            );
        }
    }
    emu.set_seed(before);
}

/// Static shared memory read before any write: zero under the former rules, NaN now.
#[test]
fn a_read_of_unwritten_shared_memory_shows() {
    let emu = lib();
    let x = [3.0f32];
    let mut out = vec![0f32; 1];
    run(
        emu,
        "reads_unwritten_shared",
        (1, 32, 0),
        Some(&x),
        &mut out,
        None,
    )
    .unwrap();
    assert!(
        out.iter().all(|v| v.is_nan()),
        "poisoned before every block: {out:?}"
    );
}

#[test]
fn a_shuffle_outside_its_mask_fails() {
    let emu = lib();
    let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let mut out = vec![0f32; 32];
    let err = run(
        emu,
        "shuffle_outside_its_mask",
        (1, 32, 0),
        Some(&x),
        &mut out,
        None,
    )
    .unwrap_err();
    assert!(err.contains("__shfl_xor_sync"), "{err}");
    assert!(err.contains("0x0000ffff"), "{err}");
    // the values themselves came out right: a check of results alone passed it
    assert!((0..32).all(|i| out[i] == (i + (i ^ 16)) as f32), "{out:?}");
}

#[test]
fn a_block_above_its_launch_bounds_fails() {
    let emu = lib();
    let mut out = vec![0f32; 128];
    run(
        emu,
        "bounded_to_64_threads",
        (2, 64, 0),
        None,
        &mut out,
        None,
    )
    .unwrap();
    let err = fails(emu, "bounded_to_64_threads", (1, 128, 0), &mut out);
    assert!(
        err.contains("__launch_bounds__") && err.contains("128"),
        "{err}"
    );
    let err = fails(emu, "race_missing_barrier", (1, 2048, 0), &mut out);
    assert!(err.contains("1024"), "{err}");
    let err = fails(emu, "race_missing_barrier", (0, 32, 0), &mut out);
    assert!(err.contains("empty launch"), "{err}");
}

#[test]
fn shared_memory_limits_are_enforced() {
    let emu = lib();
    let n = 16 * 1024; // 64 KB of f32
    let mut out = vec![0f32; n];
    let smem = (n * 4) as u32;
    let err = run(
        emu,
        "dynamic_shared",
        (1, 256, smem),
        None,
        &mut out,
        Some(n as i32),
    )
    .unwrap_err();
    assert!(err.contains("48 KB"), "{err}");
    emu.set_max_dynamic_smem("dynamic_shared", n * 4);
    run(
        emu,
        "dynamic_shared",
        (1, 256, smem),
        None,
        &mut out,
        Some(n as i32),
    )
    .unwrap();
    assert!((0..n).all(|i| out[i] == (n - 1 - i) as f32));
    emu.set_max_dynamic_smem("dynamic_shared", 240 << 10);
    let mut big = vec![0f32; 60 << 8];
    let err = run(
        emu,
        "dynamic_shared",
        (1, 256, 240 << 10),
        None,
        &mut big,
        Some(1),
    )
    .unwrap_err();
    assert!(err.contains("227 KB"), "{err}");

    let emu = broken("big_static_shared.cu");
    let mut out = vec![0f32; 32];
    let err = fails(&emu, "static_shared_64k", (1, 32, 0), &mut out);
    assert!(err.contains("65536 bytes of static"), "{err}");
}

/// A tensor-core product is warp-wide: called by half a warp it fails the launch, naming a
/// lane that did not take part; called by every lane it computes A·B (all-ones operands: 16 in
/// each of the 16 x 8 outputs, each lane holding its four).
#[test]
fn a_tensor_core_product_needs_the_whole_warp() {
    let mut out = vec![0f32; 64 * 4];
    let e = fails(lib(), "mma_in_divergent_code", (1, 64, 0), &mut out);
    assert!(e.contains("does not take part"), "{e}");
    run(lib(), "mma_whole_warp", (1, 64, 0), None, &mut out, None).unwrap();
    assert!(out.iter().all(|&v| v == 16.0), "{out:?}");
}

#[test]
fn the_launch_log_counts_launches_blocks_and_threads() {
    let emu = broken("broken.cu");
    let mut out = vec![0f32; 64 * 8];
    for _ in 0..3 {
        run(
            &emu,
            "bounded_to_64_threads",
            (8, 64, 0),
            None,
            &mut out,
            None,
        )
        .unwrap();
    }
    let log = emu.launch_log(true);
    assert_eq!(
        log,
        vec![("bounded_to_64_threads".to_string(), 3, 24, 24 * 64)]
    );
    assert!(emu.launch_log(false).is_empty(), "reset");
}
