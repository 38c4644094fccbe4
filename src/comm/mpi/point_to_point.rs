//! Point to point, for the parameter server: bytes with a tag, outside the collectives' order.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ::mpi::point_to_point::{Destination, Source};
use ::mpi::request::StaticScope;
use ::mpi::topology::Communicator as _;
use ::mpi::traits::Equivalence;

use super::requests::{wait, Lent};
use super::{fail, MpiCommunicator};
use crate::error::{Error, Result};

impl MpiCommunicator {
    /// Sends `bytes` to rank `to` with `tag`, waiting at most the timeout for it to leave. A
    /// timeout fails this send only (the peer may be gone; the buffer is leaked) and does not
    /// abort the group.
    pub(crate) fn send(&self, to: usize, tag: i32, bytes: Vec<u8>) -> Result<()> {
        self.check_not_aborted()?;
        if to >= self.world.size {
            return Err(fail(format!("no rank {to} of {}", self.world.size)));
        }
        let _held = self.world.lock()?;
        let deadline = crate::comm::deadline(self.timeout);
        let data = Lent::new(bytes);
        // SAFETY: the buffer is lent once, to this one request.
        let request = self
            .comm
            .process_at_rank(to as i32)
            .immediate_send_with_tag(StaticScope, unsafe { data.lend() }, tag);
        wait(request, deadline, || {
            format!(
                "MPI rank {} waited {:?} for rank {to} to take a message",
                self.world.rank, self.timeout
            )
        })
        .inspect_err(|_| self.world.timed_out.store(true, Ordering::Relaxed))?;
        // SAFETY: the request completed (on a timeout `wait` returned and the buffer is leaked).
        let _ = unsafe { data.take() };
        Ok(())
    }

    /// Claims this communicator for one parameter-server worker; `false` if one has it.
    pub(crate) fn claim_worker(&self) -> bool {
        !self.worker.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn release_worker(&self) {
        self.worker.store(false, Ordering::Release);
    }

    /// The next message for this rank from `from` (any rank when `None`), waiting at most the
    /// timeout: its sender, tag and bytes. The MPI lock is taken only to look, so other threads
    /// of this process go on meanwhile.
    pub(crate) fn receive(&self, from: Option<usize>) -> Result<(usize, i32, Vec<u8>)> {
        let deadline = crate::comm::deadline(self.timeout);
        loop {
            self.check_not_aborted()?;
            {
                let _held = self.world.lock()?;
                let probed = match from {
                    Some(r) => self
                        .comm
                        .process_at_rank(r as i32)
                        .immediate_matched_probe(),
                    None => self.comm.any_process().immediate_matched_probe(),
                };
                if let Some((message, status)) = probed {
                    let (source, tag) = (status.source_rank(), status.tag());
                    let len = usize::try_from(status.count(u8::equivalent_datatype()))
                        .map_err(|_| fail("a message of unknown length"))?;
                    // A large message arrives while its sender makes progress: the receive is
                    // non-blocking and waited for like the rest.
                    let data = Lent::new(vec![0u8; len]);
                    // SAFETY: the buffer is lent once, to this one request.
                    let request =
                        message.immediate_matched_receive_into(StaticScope, unsafe { data.lend() });
                    self.wait(request, deadline)?;
                    // SAFETY: the request completed (on a timeout the buffer is leaked).
                    let bytes = unsafe { data.take() };
                    return Ok((usize::try_from(source).unwrap_or(usize::MAX), tag, bytes));
                }
            }
            if Instant::now() >= deadline {
                let reason = format!(
                    "MPI rank {} waited {:?} for a message from {}",
                    self.world.rank,
                    self.timeout,
                    from.map_or("any rank".to_string(), |r| format!("rank {r}"))
                );
                self.world.timed_out.store(true, Ordering::Relaxed);
                self.mark_aborted(&reason, true);
                return Err(Error::Timeout(reason));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
