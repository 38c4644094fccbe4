//! Hostile peers at the rendezvous: strangers that connect to rank 0's port (an HTTP probe, a
//! connect-and-close, a silent socket, a peer trickling bytes) are ignored, and none of them can
//! hold rank 0 past its deadline.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use fusedopt::comm::rendezvous::{Rendezvous, RendezvousConfig};
use fusedopt::Result;

fn config(rank: usize, world_size: usize, port: u16, timeout: Duration) -> RendezvousConfig {
    RendezvousConfig {
        rank,
        world_size,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout,
    }
}

/// Runs rank 0 on a free port while `others(port)` runs beside it; again on another port when the
/// chosen one was taken before rank 0 could listen (tests run in parallel).
fn with_rank0<T: Send>(
    world_size: usize,
    timeout: Duration,
    others: impl Fn(u16) -> T + Sync,
) -> (Result<Rendezvous>, T, Duration) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let start = Instant::now();
        let (zero, rest) = std::thread::scope(|s| {
            let zero = s.spawn(|| Rendezvous::connect(&config(0, world_size, port, timeout)));
            let rest = others(port);
            (zero.join().unwrap(), rest)
        });
        let elapsed = start.elapsed();
        if matches!(&zero, Err(e) if e.to_string().contains("cannot listen")) {
            continue;
        }
        return (zero, rest, elapsed);
    }
    panic!("no free port in 5 tries");
}

fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("rank 0 never listened: {e}"),
        }
    }
}

#[test]
fn strangers_at_the_port_are_ignored() {
    let timeout = Duration::from_secs(10);
    let (zero, one, _) = with_rank0(2, timeout, |port| {
        // Strangers first: each connects before the real rank does.
        let mut http = connect(port);
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        drop(connect(port)); // connect and close
        let _silent = connect(port); // says nothing, stays open
        let mut garbage = connect(port);
        garbage.write_all(&[0xff; 64]).unwrap();
        let one = Rendezvous::connect(&config(1, 2, port, timeout));
        drop(http);
        one
    });
    let (mut zero, mut one) = (zero.unwrap(), one.unwrap());
    let gathered = std::thread::scope(|s| {
        let z = s.spawn(|| zero.all_gather(b"zero").unwrap());
        let o = one.all_gather(b"one").unwrap();
        (z.join().unwrap(), o)
    });
    assert_eq!(gathered.0, vec![b"zero".to_vec(), b"one".to_vec()]);
    assert_eq!(gathered.0, gathered.1);
}

/// A stranger trickling one byte at a time must not hold rank 0 past its deadline when a rank is
/// missing; rank 0 fails in about its timeout and names the missing rank.
#[test]
fn a_trickling_peer_cannot_hold_rank_0_past_its_deadline() {
    let timeout = Duration::from_millis(1500);
    let (zero, (), elapsed) = with_rank0(2, timeout, |port| {
        let mut s = connect(port);
        let end = Instant::now() + timeout * 3;
        // A well-formed hello from "rank 1", one byte every 100 ms: it would take 3.2 s.
        let mut bytes = 24u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"FUSEDRV1");
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        for b in bytes {
            if Instant::now() > end || s.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let err = zero.unwrap_err();
    assert!(err.to_string().contains("[1]"), "{err}");
    // A hang guard, not a performance claim: well short of the trickle's 3 × timeout.
    assert!(
        elapsed < timeout * 2 + Duration::from_millis(500),
        "{elapsed:?}"
    );
}

/// The same against a joining rank: a rank 0 that answers with a trickle cannot hold it either.
#[test]
fn a_trickling_rank_0_cannot_hold_a_joining_rank_past_its_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let timeout = Duration::from_millis(1000);
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let (mut peer, _) = listener.accept().unwrap();
            // A welcome frame announcing 1000 bytes, sent one byte every 100 ms.
            let mut bytes = 1000u64.to_le_bytes().to_vec();
            bytes.resize(40, 0);
            for b in bytes {
                if peer.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let err = Rendezvous::connect(&config(1, 2, port, timeout)).unwrap_err();
        let at = start.elapsed();
        assert!(err.to_string().contains("timed out"), "{err}");
        // The trickler runs 4 s; the rank gives up at its deadline.
        assert!(at < Duration::from_millis(3000), "{at:?}");
    });
}
