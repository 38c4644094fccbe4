//! The launch plan covers every arena element exactly once, in its tensor's group, and every tensor
//! starts aligned.

mod common;

use common::*;
use fusedopt::params::ALIGN_ELEMS;
use fusedopt::plan::LaunchPlan;

#[test]
fn every_element_is_covered_once_by_its_group() {
    for tensors in [awkward_tensors(1), many_tensors(2, 1000)] {
        let set = build(&tensors);
        let layout = set.layout();
        for chunk in [16, 48, 4096, 1 << 15, 1 << 20] {
            let plan = LaunchPlan::new(layout, chunk);
            let mut owner = vec![usize::MAX; layout.arena_len()];
            for c in 0..plan.num_chunks() {
                for s in plan.segments_of(c) {
                    assert!(s.start / chunk == c && (s.start + s.len - 1) / chunk == c);
                    for e in &mut owner[s.start..s.start + s.len] {
                        assert_eq!(*e, usize::MAX, "element covered twice");
                        *e = s.group;
                    }
                }
            }
            assert!(
                owner.iter().all(|&g| g != usize::MAX),
                "element not covered"
            );
            for t in layout.tensors() {
                assert_eq!(t.offset % ALIGN_ELEMS, 0, "{} unaligned", t.name);
                assert!(owner[t.range()].iter().all(|&g| g == t.group));
            }
        }
    }
}

#[test]
fn tensors_do_not_overlap_and_padding_stays_zero() {
    let tensors = many_tensors(4, 200);
    let set = build(&tensors);
    let mut seen = vec![false; set.layout().arena_len()];
    for t in set.layout().tensors() {
        for s in &mut seen[t.range()] {
            assert!(!*s);
            *s = true;
        }
    }
    for (i, &used) in seen.iter().enumerate() {
        if !used {
            assert_eq!(set.masters_arena().unwrap()[i], 0.0);
        }
    }
}

#[test]
fn gpu_chunk_size_fills_the_card_within_bounds() {
    use fusedopt::plan::cuda_chunk_elems;
    for sms in [1, 80, 108, 132] {
        for total in [0, 1, 4097, 1 << 20, 350_000_000, 1 << 34] {
            let c = cuda_chunk_elems(total, sms);
            assert!(
                (1 << 12..=1 << 16).contains(&c),
                "{total} on {sms} SMs: {c}"
            );
            assert_eq!(c % ALIGN_ELEMS, 0);
            // Unless clamped, the plan has at least eight chunks per SM.
            if c > 1 << 12 && c < 1 << 16 {
                assert!(total.div_ceil(c) >= sms * 4, "{total} on {sms} SMs: {c}");
            }
        }
    }
    // A 350M-parameter model on an H100 (132 SMs) uses the largest chunk; a small one the smallest.
    assert_eq!(cuda_chunk_elems(350_000_000, 132), 1 << 16);
    assert_eq!(cuda_chunk_elems(100_000, 132), 1 << 12);
}
