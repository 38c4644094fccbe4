//! A warmed-up step allocates nothing of its own (counted with a wrapping global allocator).
//!
//! The one allocation left is rayon's: a job sent into the pool from outside it goes through a
//! global injector queue that allocates a new block once every 63 jobs. A step injects two (norm
//! pass and update pass), so about one allocation per 32 steps remains; anything of ours (per step
//! or per tensor) would show up as at least one per step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fusedopt::*;

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the contract;
// counting allocations touches only an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwards the caller's layout unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steps_do_not_allocate() {
    let mut b = ParamSet::builder();
    b.group("nodecay", GroupOptions::no_decay()).unwrap();
    for i in 0..200 {
        let group = if i % 4 == 0 { "nodecay" } else { "default" };
        b.add_to(group, &format!("p{i}"), &[1000 + i], &vec![0.5; 1000 + i])
            .unwrap();
    }
    let mut set = b.build(Device::Cpu).unwrap();
    set.grads_arena_mut().unwrap().fill(0.01);
    let options = OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        ..Default::default()
    };
    let mut opt =
        Optimizer::with_options(set, Adam::adamw(Flavor::PyTorch), 1e-3, options).unwrap();
    for _ in 0..5 {
        opt.step().unwrap(); // warm the thread pool
    }
    let steps: usize = 200;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..steps {
        opt.step().unwrap();
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "allocations in {steps} steps: {allocations} ({} per step)",
        allocations as f64 / steps as f64
    );
    // rayon's: one per 63 injected jobs, two jobs a step, and one more where the block boundary
    // falls (the warm-up leaves the injector part-way through a block). Anything of ours would
    // be at least one per step: 200 here.
    let rayon = (2 * steps).div_ceil(63) + 1;
    assert!(
        allocations <= rayon,
        "{steps} steps allocated {allocations} times (rayon's injector accounts for {rayon})"
    );
}
