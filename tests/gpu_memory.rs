//! Out of device memory at any allocation of a parameter set or an optimizer: a typed error, and
//! everything allocated up to then is freed. Alone in its test binary, because it reads the
//! device's allocated bytes (the emulated driver's counters and fault injection: emulated GPU only).

mod common;

use common::*;
use fusedopt::*;

/// The emulated driver's fault injection: the allocation after `after` more fails (-1: off).
fn inject_oom() -> impl Fn(i64) {
    // SAFETY: the emulated libcuda.so is already loaded (same name, same library); the control
    // function has this C signature there.
    let lib = unsafe { libloading::Library::new("libcuda.so") }.expect("the emulated driver");
    let f: unsafe extern "C" fn(*const std::ffi::c_char, i64) -> i32 =
        // SAFETY: the symbol is the emulated driver's fault control, of this signature.
        *unsafe { lib.get(b"fusedopt_emu_inject") }.expect("the emulated driver's faults");
    std::mem::forget(lib);
    // SAFETY: the function reads the NUL-terminated name only.
    move |after| unsafe {
        f(c"oom".as_ptr(), after);
    }
}

#[test]
fn out_of_device_memory_is_a_typed_error_and_frees_everything() {
    let test = "out_of_device_memory_is_a_typed_error_and_frees_everything";
    if !gpu_or_skip(test) || !emulated_gpu_or_skip(test, "injects faults into the emulated driver")
    {
        return;
    }
    let tensors = awkward_tensors(60);
    let build = || -> Result<Optimizer> {
        let mut b = ParamSet::builder();
        for t in &tensors {
            b.add(&t.name, &[t.values.len()], &t.values)?;
        }
        let set = b.build(Device::Cuda(0))?;
        let options = OptimizerOptions {
            state_dtype: DType::BF16,
            ..Default::default()
        };
        Optimizer::with_options(set, Adam::amsgrad(Flavor::PyTorch), 1e-3, options)
    };
    let live = emulated_counter("live_bytes");
    // Frees are stream-ordered: wait for them before counting. Held for the whole test, so every
    // parameter set and optimizer uses (and frees on) this runtime's stream: a runtime opened
    // anew would have a stream of its own, and waiting on it would not wait for those frees.
    let runtime = fusedopt::cuda::runtime::CudaRuntime::shared(0).unwrap();
    let settle = || runtime.stream().synchronize().unwrap();
    drop(build().unwrap()); // loads the kernels once
    settle();
    let baseline = live();
    let oom = inject_oom();
    let mut refused = 0;
    for after in 0.. {
        oom(after);
        let outcome = build();
        oom(-1);
        match outcome {
            Err(Error::OutOfDeviceMemory { .. }) => refused += 1,
            Ok(opt) => {
                drop(opt);
                settle();
                assert_eq!(live(), baseline);
                break;
            }
            Err(e) => panic!("allocation {after} failed with {e}, not OutOfDeviceMemory"),
        }
        settle();
        assert_eq!(
            live(),
            baseline,
            "allocation {after} failed: device memory leaked"
        );
    }
    // Masters, gradients, three state buffers, the plan and the step scalars at least.
    assert!(refused >= 7, "only {refused} allocations");
}
