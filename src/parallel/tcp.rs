//! A [`Communicator`] between processes over TCP, for tensor-parallel groups whose ranks are
//! separate processes (`--world-size`, `--rank`, `--master-addr`, `--master-port`).
//!
//! Rank 0 listens on the master port; every other rank connects to it (retrying until the
//! group's timeout, since the ranks start in any order) and introduces itself. Rank 0 checks
//! that every rank agrees on the world size and the model, then answers each with the group's
//! KV pool shape, so all ranks size their caches alike. Collectives go through rank 0 (a
//! star): it adds or concatenates the parts in rank order and sends the result back. This
//! is the CPU's way between processes and the rendezvous a GPU communicator would use to pass
//! its unique id; it is not a fast interconnect.
//!
//! Frames are `[tag u32][length u64][payload]`, little-endian; floats travel as their bits.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{CommError, Communicator};

const HELLO: u32 = 0x4845_4c4f;
const WELCOME: u32 = 0x5745_4c43;
const REFUSED: u32 = 0x5245_4655;
const DATA: u32 = 0x4441_5441;
const ABORT: u32 = 0x4142_5254;

/// What a rank tells rank 0 when it joins, and what rank 0 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupParams {
    /// Identifies the model (every rank must load the same one).
    pub model_fingerprint: u64,
    /// KV pool of every rank: pages and tokens per page (rank 0 decides).
    pub num_pages: u64,
    pub page_size: u64,
}

fn io_err(what: &str, e: std::io::Error) -> CommError {
    CommError::Aborted(format!("{what}: {e}"))
}

fn write_frame(s: &mut TcpStream, tag: u32, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&tag.to_le_bytes());
    head[4..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)
}

/// The largest frame a rank accepts from another rank of its group.
const MAX_FRAME: u64 = 1 << 34;
/// How long rank 0 waits for a new connection to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one frame of at most `max` payload bytes into `buf`; returns its tag.
fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>, max: u64) -> std::io::Result<u32> {
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let tag = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(head[4..].try_into().expect("8 bytes"));
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    buf.resize(len as usize, 0);
    s.read_exact(buf)?;
    Ok(tag)
}

fn f32s_to_bytes(v: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(v.len() * 4);
    v.iter()
        .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
}

fn bytes_to_f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
}

struct Links {
    /// Rank 0: a stream per other rank (index = rank - 1). Other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    aborted: Option<String>,
}

/// One process's end of a TCP group.
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

impl TcpComm {
    /// Rank 0: listens on `bind`, waits up to `timeout` for the other `world - 1` ranks and
    /// welcomes each with `params` (a rank with another world size or model is refused and
    /// the group fails, naming it).
    pub fn listen(
        bind: &str,
        world: usize,
        params: GroupParams,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let listener =
            TcpListener::bind(bind).map_err(|e| io_err(&format!("cannot listen on {bind}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("listener", e))?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let mut buf = Vec::new();
        while peers.iter().any(Option::is_none) {
            let (mut s, addr) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(CommError::Aborted(format!(
                            "rank(s) {} did not join within {:.0}s (listening on {bind})",
                            missing.join(", "),
                            timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(io_err("accept", e)),
            };
            s.set_nonblocking(false).map_err(|e| io_err("socket", e))?;
            s.set_nodelay(true).map_err(|e| io_err("socket", e))?;
            s.set_read_timeout(Some(HELLO_TIMEOUT.min(timeout)))
                .map_err(|e| io_err("socket", e))?;
            // a connection that is not one of our ranks (a port scan, a probe) is dropped
            // without stopping the others from joining
            let tag = match read_frame(&mut s, &mut buf, 64) {
                Ok(tag) => tag,
                Err(e) => {
                    tracing::warn!("ignoring a connection from {addr}: {e}");
                    continue;
                }
            };
            let words: Vec<u64> = buf
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            if tag != HELLO || words.len() != 3 {
                tracing::warn!("ignoring a connection from {addr}: not a rank's hello");
                let _ = s.shutdown(Shutdown::Both);
                continue;
            }
            s.set_read_timeout(Some(timeout))
                .map_err(|e| io_err("socket", e))?;
            let (rank, their_world, fingerprint) = (words[0] as usize, words[1] as usize, words[2]);
            let problem = if their_world != world {
                Some(format!(
                    "rank {rank} at {addr} was started with world size {their_world}, rank 0 with {world}"
                ))
            } else if rank == 0 || rank >= world {
                Some(format!("a process at {addr} claims rank {rank} of {world}"))
            } else if peers[rank - 1].is_some() {
                Some(format!(
                    "two processes claim rank {rank} (the second from {addr})"
                ))
            } else if fingerprint != params.model_fingerprint {
                Some(format!(
                    "rank {rank} at {addr} loaded a different model than rank 0, or runs it \
                     with another --dtype or --kv-cache-dtype"
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                let _ = write_frame(&mut s, REFUSED, p.as_bytes());
                return Err(CommError::Aborted(p));
            }
            let mut reply = Vec::new();
            for w in [params.model_fingerprint, params.num_pages, params.page_size] {
                reply.extend_from_slice(&w.to_le_bytes());
            }
            write_frame(&mut s, WELCOME, &reply).map_err(|e| io_err("welcome", e))?;
            tracing::info!("rank {rank} joined from {addr}");
            peers[rank - 1] = Some(s);
        }
        Ok(Self {
            rank: 0,
            world,
            timeout,
            links: Mutex::new(Links {
                peers: peers.into_iter().map(|p| p.expect("all joined")).collect(),
                buf,
                scratch: Vec::new(),
                aborted: None,
            }),
        })
    }

    /// Rank `rank` > 0: connects to rank 0 at `master` (retrying until `timeout`), and
    /// returns the group's parameters from rank 0's welcome.
    pub fn connect(
        master: &str,
        rank: usize,
        world: usize,
        model_fingerprint: u64,
        timeout: Duration,
    ) -> Result<(Self, GroupParams), CommError> {
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            let attempt = master
                .to_socket_addrs()
                .and_then(|mut a| {
                    a.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })
                })
                .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)));
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(io_err(
                        &format!(
                            "rank {rank} could not reach rank 0 at {master} within {:.0}s",
                            timeout.as_secs_f64()
                        ),
                        e,
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        s.set_nodelay(true).map_err(|e| io_err("socket", e))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| io_err("socket", e))?;
        let mut hello = Vec::new();
        for w in [rank as u64, world as u64, model_fingerprint] {
            hello.extend_from_slice(&w.to_le_bytes());
        }
        write_frame(&mut s, HELLO, &hello).map_err(|e| io_err("hello", e))?;
        let mut buf = Vec::new();
        let tag =
            read_frame(&mut s, &mut buf, 4096).map_err(|e| io_err("waiting for rank 0", e))?;
        match tag {
            WELCOME if buf.len() == 24 => {}
            REFUSED => {
                return Err(CommError::Aborted(format!(
                    "rank 0 refused rank {rank}: {}",
                    String::from_utf8_lossy(&buf)
                )))
            }
            _ => {
                return Err(CommError::Aborted(format!(
                    "{master} is not rank 0 of a tensor-parallel group"
                )))
            }
        }
        let w = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let params = GroupParams {
            model_fingerprint: w(0),
            num_pages: w(1),
            page_size: w(2),
        };
        let comm = Self {
            rank,
            world,
            timeout,
            links: Mutex::new(Links {
                peers: vec![s],
                buf,
                scratch: Vec::new(),
                aborted: None,
            }),
        };
        Ok((comm, params))
    }

    /// Between steps: why another rank's process is gone (its connection closed, or it sent
    /// something outside a collective), if it is.
    fn check_peers(&self) -> Option<String> {
        let mut l = self.links.lock();
        if let Some(a) = &l.aborted {
            return Some(a.clone());
        }
        for (i, s) in l.peers.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            let _ = s.set_nonblocking(true);
            let r = s.peek(&mut b);
            let _ = s.set_nonblocking(false);
            let peer = if self.rank == 0 { i + 1 } else { 0 };
            match r {
                Ok(0) => return Some(format!("rank {peer} closed its connection")),
                Ok(_) => return Some(format!("rank {peer} sent data outside a step")),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Some(format!("rank {peer}: {e}")),
            }
        }
        None
    }

    /// Runs `f` on the links unless the group already failed; a failure stops the group.
    fn with_links<T>(
        &self,
        blocking_wait: bool,
        f: impl FnOnce(&mut Links, usize) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let mut l = self.links.lock();
        if let Some(a) = &l.aborted {
            return Err(CommError::Aborted(a.clone()));
        }
        if !blocking_wait {
            for s in &l.peers {
                let _ = s.set_read_timeout(Some(self.timeout));
            }
        }
        match f(&mut l, self.rank) {
            Ok(v) => Ok(v),
            Err(e) => {
                let reason = e.reason().to_string();
                let abort_msg = reason.as_bytes().to_vec();
                l.aborted = Some(reason);
                for s in &mut l.peers {
                    let _ = write_frame(s, ABORT, &abort_msg);
                    let _ = s.shutdown(Shutdown::Both);
                }
                Err(e)
            }
        }
    }
}

/// Reads a DATA frame from `peer` (rank `from`), turning an ABORT or a closed connection into
/// the group's failure reason.
fn recv(s: &mut TcpStream, buf: &mut Vec<u8>, from: usize) -> Result<(), CommError> {
    let aborted = |reason: String| Err(CommError::Aborted(reason));
    match read_frame(s, buf, MAX_FRAME) {
        Ok(DATA) => Ok(()),
        Ok(ABORT) => aborted(String::from_utf8_lossy(buf).into_owned()),
        Ok(tag) => Err(CommError::Invalid(format!(
            "rank {from} sent an unexpected frame {tag:#x}"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            aborted(format!("rank {from} is gone (connection closed)"))
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            aborted(format!("rank {from} did not answer in time"))
        }
        Err(e) => aborted(format!("rank {from}: {e}")),
    }
}

fn send(s: &mut TcpStream, payload: &[u8], to: usize) -> Result<(), CommError> {
    write_frame(s, DATA, payload)
        .map_err(|e| CommError::Aborted(format!("sending to rank {to}: {e}")))
}

/// Rank 0's last move in a collective: `values` to every other rank.
fn send_all(
    peers: &mut [TcpStream],
    values: &[f32],
    scratch: &mut Vec<u8>,
) -> Result<(), CommError> {
    f32s_to_bytes(values, scratch);
    for (i, s) in peers.iter_mut().enumerate() {
        send(s, scratch, i + 1)?;
    }
    Ok(())
}

/// Another rank's part of a collective, sent to rank 0.
fn to_root(root: &mut TcpStream, local: &[f32], scratch: &mut Vec<u8>) -> Result<(), CommError> {
    f32s_to_bytes(local, scratch);
    send(root, scratch, 0)
}

/// Rank 0's result of a collective (exactly `out.len()` values), into `out`.
fn from_root(
    root: &mut TcpStream,
    out: &mut [f32],
    rx: &mut Vec<u8>,
    what: &str,
) -> Result<(), CommError> {
    recv(root, rx, 0)?;
    if rx.len() != out.len() * 4 {
        return Err(CommError::Invalid(format!(
            "{what}: rank 0 sent another length"
        )));
    }
    out.iter_mut()
        .zip(bytes_to_f32s(rx))
        .for_each(|(o, x)| *o = x);
    Ok(())
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.with_links(false, |l, rank| {
            let Links {
                peers,
                buf: rx,
                scratch,
                ..
            } = l;
            if rank != 0 {
                to_root(&mut peers[0], buf, scratch)?;
                return from_root(&mut peers[0], buf, rx, "all_reduce");
            }
            for (i, s) in peers.iter_mut().enumerate() {
                recv(s, rx, i + 1)?;
                if rx.len() != buf.len() * 4 {
                    return Err(CommError::Invalid(format!(
                        "all_reduce: rank {} sent another length",
                        i + 1
                    )));
                }
                buf.iter_mut()
                    .zip(bytes_to_f32s(rx))
                    .for_each(|(b, x)| *b += x);
            }
            send_all(peers, buf, scratch)
        })
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        self.with_links(false, |l, rank| {
            let Links {
                peers,
                buf: rx,
                scratch,
                ..
            } = l;
            if rank != 0 {
                to_root(&mut peers[0], local, scratch)?;
                return from_root(&mut peers[0], out, rx, "all_gather");
            }
            out[..local.len()].copy_from_slice(local);
            let mut at = local.len();
            for (i, s) in peers.iter_mut().enumerate() {
                recv(s, rx, i + 1)?;
                let n = rx.len() / 4;
                if at + n > out.len() {
                    return Err(CommError::Invalid(format!(
                        "all_gather: rank {} sent too much",
                        i + 1
                    )));
                }
                out[at..at + n]
                    .iter_mut()
                    .zip(bytes_to_f32s(rx))
                    .for_each(|(o, x)| *o = x);
                at += n;
            }
            if at != out.len() {
                return Err(CommError::Invalid(format!(
                    "all_gather: {at} values for {}",
                    out.len()
                )));
            }
            send_all(peers, out, scratch)
        })
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        if root != 0 {
            return Err(CommError::Invalid(
                "the TCP group broadcasts from rank 0 only".into(),
            ));
        }
        // the other ranks wait for rank 0's next step without a timeout (an idle server)
        let waiting = self.rank != 0;
        if waiting {
            let l = self.links.lock();
            let _ = l.peers[0].set_read_timeout(None);
        }
        self.with_links(waiting, |l, rank| {
            if rank == 0 {
                for (i, s) in l.peers.iter_mut().enumerate() {
                    send(s, buf, i + 1)?;
                }
            } else {
                recv(&mut l.peers[0], buf, 0)?;
            }
            Ok(())
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut token = [0f32; 1];
        self.all_reduce_sum(&mut token)
    }

    fn peer_lost(&self) -> Option<String> {
        self.check_peers()
    }

    fn abort(&self, reason: &str) {
        let mut l = self.links.lock();
        if l.aborted.is_some() {
            return;
        }
        l.aborted = Some(reason.to_string());
        let msg = reason.as_bytes().to_vec();
        for s in &mut l.peers {
            let _ = write_frame(s, ABORT, &msg);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GroupParams {
        GroupParams {
            model_fingerprint: 7,
            num_pages: 64,
            page_size: 16,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn ranks_in_threads_agree_over_tcp() {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let t = Duration::from_secs(20);
        let out: Vec<(Vec<f32>, Vec<f32>, Vec<u8>)> = std::thread::scope(|s| {
            let mut hs = Vec::new();
            for rank in 0..3 {
                let addr = addr.clone();
                hs.push(s.spawn(move || {
                    let comm = if rank == 0 {
                        TcpComm::listen(&addr, 3, params(), t).unwrap()
                    } else {
                        let (c, p) = TcpComm::connect(&addr, rank, 3, 7, t).unwrap();
                        assert_eq!(p, params());
                        c
                    };
                    let r = rank as f32;
                    let mut sum = vec![r, 1.0];
                    comm.all_reduce_sum(&mut sum).unwrap();
                    let mut all = vec![0.0; 6];
                    comm.all_gather(&vec![r; rank + 1], &mut all).unwrap();
                    let mut msg = if rank == 0 { b"step".to_vec() } else { vec![] };
                    comm.broadcast(&mut msg, 0).unwrap();
                    comm.barrier().unwrap();
                    (sum, all, msg)
                }));
            }
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, all, msg) in out {
            assert_eq!(sum, vec![3.0, 3.0]);
            assert_eq!(all, vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
            assert_eq!(msg, b"step");
        }
    }

    #[test]
    fn a_rank_that_never_joins_or_loads_another_model_is_named() {
        let addr = format!("127.0.0.1:{}", free_port());
        let e = TcpComm::listen(&addr, 3, params(), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) 1, 2 did not join"), "{e}");

        let addr = format!("127.0.0.1:{}", free_port());
        let a = addr.clone();
        let t = Duration::from_secs(10);
        let joiner =
            std::thread::spawn(move || TcpComm::connect(&a, 1, 2, 8, t).err().unwrap().to_string());
        let e = TcpComm::listen(&addr, 2, params(), t)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("different model"), "{e}");
        assert!(joiner.join().unwrap().contains("refused"));
    }

    #[test]
    fn a_stray_connection_does_not_stop_the_ranks_from_joining() {
        let addr = format!("127.0.0.1:{}", free_port());
        let a = addr.clone();
        let t = Duration::from_secs(10);
        let joiner = std::thread::spawn(move || {
            // a port scan first: connects, sends garbage claiming a huge frame, leaves
            let mut stray = loop {
                match TcpStream::connect(&a) {
                    Ok(s) => break s,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let _ = stray.write_all(&[0xff; 12]);
            drop(stray);
            let (c, _) = TcpComm::connect(&a, 1, 2, 7, t).unwrap();
            let mut v = [2.0f32];
            c.all_reduce_sum(&mut v).unwrap();
            v[0]
        });
        let comm = TcpComm::listen(&addr, 2, params(), t).unwrap();
        let mut v = [1.0f32];
        comm.all_reduce_sum(&mut v).unwrap();
        assert_eq!((v[0], joiner.join().unwrap()), (3.0, 3.0));
    }

    #[test]
    fn a_closed_rank_fails_the_next_collective() {
        let addr = format!("127.0.0.1:{}", free_port());
        let a = addr.clone();
        let t = Duration::from_secs(10);
        let joiner = std::thread::spawn(move || {
            let (c, _) = TcpComm::connect(&a, 1, 2, 7, t).unwrap();
            drop(c);
        });
        let comm = TcpComm::listen(&addr, 2, params(), t).unwrap();
        joiner.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(comm.peer_lost().unwrap().contains("rank 1 closed"));
        let mut msg = b"x".to_vec();
        let _ = comm.broadcast(&mut msg, 0);
        let e = comm.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(e.contains("rank 1"), "{e}");
    }
}
