//! The parameter server with worker threads: one worker misbehaves; the others must go on and
//! the server must equal a replay of the pushes it applied.

use std::sync::Mutex;

use fusedopt::parallel::parameter_server::Pushed;
use fusedopt::parallel::{ParameterServer, Staleness};
use fusedopt::{Device, Error};

use crate::synchronous::Fault;
use crate::{optimizer, values, Row, TENSORS, TIMEOUT};

/// The parameter server with three worker threads, one of which misbehaves after two pushes.
pub(crate) fn rows(rows: &mut Vec<Row>) {
    let faults: [(&'static str, Fault); 4] = [
        ("a worker's backward returns an error", Fault::Error),
        ("a worker panics", Fault::Panic),
        ("a worker stalls", Fault::Stall),
        ("a worker is killed (its thread ends)", Fault::Killed),
    ];
    for (name, fault) in faults {
        let run = || -> fusedopt::Result<(bool, String)> {
            let server =
                ParameterServer::new(optimizer(Device::Cpu, false)?, Staleness::Unbounded)?;
            let applied: Mutex<Vec<(u64, usize, usize)>> = Mutex::new(Vec::new());
            let pushes_each = 6;
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..3usize)
                    .map(|worker| {
                        let (server, applied) = (&server, &applied);
                        s.spawn(move || -> fusedopt::Result<()> {
                            let mut w = server.worker()?;
                            for k in 0..pushes_each {
                                if worker == 1 && k == 2 {
                                    match fault {
                                        Fault::Error => {
                                            return Err(Error::Communicator("drill".into()))
                                        }
                                        Fault::Panic => panic!("drill: a worker panicked"),
                                        Fault::Stall => std::thread::sleep(TIMEOUT),
                                        Fault::Killed => return Ok(()),
                                        Fault::Nccl(..) => {}
                                    }
                                }
                                w.pull()?;
                                for (i, &(t, n)) in TENSORS.iter().enumerate() {
                                    let g = values((1000 * worker + 10 * k + i) as u64, n);
                                    w.params_mut().set_grad(t, &g)?;
                                }
                                if let Pushed::Applied { version, .. } = w.push()? {
                                    if let Ok(mut a) = applied.lock() {
                                        a.push((version, worker, k));
                                    }
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                // The faulty worker's error or panic ends only that worker.
                for h in handles {
                    let _ = h.join();
                }
            });
            let mut applied = applied.into_inner().unwrap_or_default();
            applied.sort();
            let stats = server.stats()?;
            let others_done = [0, 2]
                .iter()
                .all(|w| applied.iter().filter(|a| a.1 == *w).count() == pushes_each);
            let mut replay = optimizer(Device::Cpu, false)?;
            for &(_, worker, k) in &applied {
                for (i, &(t, n)) in TENSORS.iter().enumerate() {
                    replay
                        .params_mut()
                        .set_grad(t, &values((1000 * worker + 10 * k + i) as u64, n))?;
                }
                replay.step()?;
            }
            let served = server.into_optimizer()?;
            let consistent =
                served.params().read_masters_arena()? == replay.params().read_masters_arena()?;
            Ok((
                others_done && consistent,
                format!(
                    "{}; {} pushes applied; the server {} a replay of them",
                    if others_done {
                        "the other workers finished"
                    } else {
                        "THE OTHERS STOPPED"
                    },
                    stats.applied,
                    if consistent { "equals" } else { "DIFFERS FROM" }
                ),
            ))
        };
        let (ok, outcome) = run().unwrap_or_else(|e| (false, format!("THE DRILL FAILED: {e}")));
        rows.push(Row {
            group: "parameter server, worker threads".into(),
            fault: name,
            outcome,
            ok,
        });
    }
}
