//! Non-blocking MPI requests waited for with a deadline, and the buffers lent to them.

use std::time::{Duration, Instant};

use ::mpi::request::Request;

use crate::error::{Error, Result};

/// Waits for `request` until `deadline`. On a timeout the request is forgotten (MPI cannot
/// cancel a collective; the caller must leak the buffers lent to it) and `reason` says why.
pub(super) fn wait<R: ?Sized>(
    mut request: Request<'static, R>,
    deadline: Instant,
    reason: impl FnOnce() -> String,
) -> Result<()> {
    let mut spins = 0u32;
    loop {
        match request.test() {
            Ok(_) => return Ok(()),
            Err(r) => request = r,
        }
        if Instant::now() >= deadline {
            std::mem::forget(request);
            return Err(Error::Timeout(reason()));
        }
        // Spin briefly for latency, then yield the core (a 2-core machine runs 4 ranks).
        spins = spins.saturating_add(1);
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A buffer lent to MPI for one non-blocking collective: given back once the request has
/// completed, leaked if it never does (MPI may still write into it).
pub(super) struct Lent<T> {
    ptr: *mut [T],
}

impl<T> Lent<T> {
    pub(super) fn new(v: Vec<T>) -> Self {
        Lent {
            ptr: Box::into_raw(v.into_boxed_slice()),
        }
    }

    /// The buffer, for the one request it is lent to.
    ///
    /// # Safety
    /// At most one reference from this `Lent` may be live at a time, and none after `take`.
    pub(super) unsafe fn lend(&self) -> &'static mut [T] {
        // SAFETY: `ptr` came from `Box::into_raw` and is freed only by `take`; the caller keeps
        // the reference unique.
        unsafe { &mut *self.ptr }
    }

    /// The buffer back, once the request it was lent to has completed.
    ///
    /// # Safety
    /// The request must have completed, so that neither MPI nor a reference from `lend` uses it.
    pub(super) unsafe fn take(self) -> Vec<T> {
        // SAFETY: `ptr` came from `Box::into_raw` and, per the caller, nothing else uses it.
        unsafe { Box::from_raw(self.ptr) }.into_vec()
    }
}
