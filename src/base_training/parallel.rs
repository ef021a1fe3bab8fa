//! Data-parallel training: one process (or thread) per device, gradients averaged every step.
//!
//! The launch follows the conventions people already use: `torchrun`'s variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or Slurm's (SLURM_PROCID, SLURM_NTASKS,
//! SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT from the batch script). Across processes the
//! gradients go through NCCL (the `nccl` build); rank 0 hands its NCCL id to the others through
//! a small TCP rendezvous at MASTER_ADDR:MASTER_PORT. [`ThreadGroup`] runs N ranks as threads
//! of one process with the same arithmetic, which is how the equivalence is tested here.

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// What a training step needs from its peers.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces every tensor by its mean over the ranks (same shapes on every rank).
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()>;
}

/// A single process: nothing to average.
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
}

struct Exchange {
    /// Each rank's flattened tensors of the current reduction.
    slots: Mutex<Vec<Option<Vec<Vec<f32>>>>>,
    barrier: Barrier,
}

/// N ranks as threads of one process. Every rank sums the deposits in rank order, so all ranks
/// get bit-identical means.
#[derive(Clone)]
pub struct ThreadGroup {
    rank: usize,
    world: usize,
    exchange: Arc<Exchange>,
}

impl ThreadGroup {
    /// One communicator per rank, to be moved into the ranks' threads.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let exchange = Arc::new(Exchange {
            slots: Mutex::new(vec![None; world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                world,
                exchange: exchange.clone(),
            })
            .collect()
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()> {
        let flat = tensors
            .iter()
            .map(|t| {
                Ok(t.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?)
            })
            .collect::<Result<Vec<Vec<f32>>>>()?;
        let lock = || {
            self.exchange
                .slots
                .lock()
                .map_err(|_| Error::Config("a training rank panicked".into()))
        };
        lock()?[self.rank] = Some(flat);
        self.exchange.barrier.wait();
        let mean: Vec<Vec<f32>> = {
            let slots = lock()?;
            let mut sum: Option<Vec<Vec<f32>>> = None;
            for slot in slots.iter() {
                let part = slot
                    .as_ref()
                    .ok_or_else(|| Error::Config("a rank did not deposit".into()))?;
                match &mut sum {
                    None => sum = Some(part.clone()),
                    Some(acc) => {
                        for (a, p) in acc.iter_mut().zip(part) {
                            a.iter_mut().zip(p).for_each(|(a, p)| *a += p);
                        }
                    }
                }
            }
            let n = self.world as f32;
            let mut sum = sum.unwrap_or_default();
            sum.iter_mut()
                .for_each(|v| v.iter_mut().for_each(|x| *x /= n));
            sum
        };
        // Nobody deposits the next reduction before everyone has read this one.
        self.exchange.barrier.wait();
        for (t, m) in tensors.iter_mut().zip(mean) {
            *t = Tensor::from_vec(m, t.dims(), t.device())?.to_dtype(t.dtype())?;
        }
        Ok(())
    }
}

/// Where this process sits in a data-parallel launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank within the node: the CUDA device ordinal.
    pub local_rank: usize,
    /// Rendezvous address (rank 0's host); needed when `world_size > 1`.
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// Which convention the variables came from.
    pub launcher: &'static str,
}

impl LaunchEnv {
    pub fn single() -> Self {
        LaunchEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: None,
            master_port: None,
            launcher: "single process",
        }
    }

    /// From the process environment.
    pub fn from_process() -> Result<Self> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_vars(&vars)
    }

    /// From `torchrun`'s variables, else Slurm's, else a single process. Inconsistent values
    /// (rank outside the world, a world without a rendezvous address) are errors naming the
    /// variable.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self> {
        let number = |key: &str| -> Result<Option<usize>> {
            match vars.get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::Input(format!("{key}={v:?}: expected a non-negative integer"))
                }),
            }
        };
        let (rank, world, local, launcher) = if vars.contains_key("WORLD_SIZE") {
            let world = number("WORLD_SIZE")?.unwrap_or(1);
            let rank = number("RANK")?.ok_or_else(|| {
                Error::Input(
                    "WORLD_SIZE is set but RANK is not (launch with torchrun's variables)".into(),
                )
            })?;
            (rank, world, number("LOCAL_RANK")?.unwrap_or(0), "torchrun")
        } else if vars.contains_key("SLURM_NTASKS") && vars.contains_key("SLURM_PROCID") {
            let world = number("SLURM_NTASKS")?.unwrap_or(1);
            let rank = number("SLURM_PROCID")?.unwrap_or(0);
            (rank, world, number("SLURM_LOCALID")?.unwrap_or(0), "slurm")
        } else {
            return Ok(Self::single());
        };
        if world == 0 {
            return Err(Error::Input("WORLD_SIZE / SLURM_NTASKS is 0".into()));
        }
        if rank >= world {
            return Err(Error::Input(format!(
                "rank {rank} is outside a world of {world} ({launcher} variables)"
            )));
        }
        let master_addr = vars.get("MASTER_ADDR").map(|s| s.trim().to_string());
        let master_port =
            match vars.get("MASTER_PORT") {
                None => None,
                Some(p) => Some(p.trim().parse::<u16>().map_err(|_| {
                    Error::Input(format!("MASTER_PORT={p:?}: expected a port number"))
                })?),
            };
        if world > 1 && (master_addr.as_deref().unwrap_or("").is_empty() || master_port.is_none()) {
            return Err(Error::Input(format!(
                "a world of {world} needs MASTER_ADDR and MASTER_PORT (rank 0's host and a free port)"
            )));
        }
        Ok(LaunchEnv {
            rank,
            world_size: world,
            local_rank: local,
            master_addr,
            master_port,
            launcher,
        })
    }
}

const RENDEZVOUS_MAGIC: &[u8; 8] = b"PFSTRDV1";

/// Hands `payload` (rank 0's NCCL id) to every other rank: rank 0 listens at `addr` and
/// answers `world - 1` connections, each rank > 0 connects (retrying until `timeout`, as rank 0
/// may start later) and reads it. Both sides check the world size, so mismatched launches fail
/// instead of hanging in NCCL.
pub fn rendezvous(
    addr: &str,
    rank: usize,
    world: usize,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let net = |what: &str, e: std::io::Error| -> Error {
        Error::Input(format!("rendezvous at {addr}: {what}: {e}"))
    };
    if rank == 0 {
        let payload = payload
            .ok_or_else(|| Error::Config("rank 0 has nothing to hand out".into()))?
            .to_vec();
        let listener = TcpListener::bind(addr).map_err(|e| net("cannot listen", e))?;
        let deadline = Instant::now() + timeout;
        listener
            .set_nonblocking(true)
            .map_err(|e| net("listener", e))?;
        let mut served = 0;
        while served + 1 < world {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| net("connection", e))?;
                    let mut hello = [0u8; 16];
                    stream
                        .read_exact(&mut hello)
                        .map_err(|e| net("greeting", e))?;
                    let their_world = u64::from_le_bytes(hello[8..16].try_into().unwrap());
                    if &hello[..8] != RENDEZVOUS_MAGIC || their_world != world as u64 {
                        return Err(Error::Input(format!(
                            "rendezvous at {addr}: a peer reports a world of {their_world}, this launch has {world}"
                        )));
                    }
                    let mut msg = Vec::with_capacity(16 + payload.len());
                    msg.extend_from_slice(RENDEZVOUS_MAGIC);
                    msg.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                    msg.extend_from_slice(&payload);
                    stream
                        .write_all(&msg)
                        .map_err(|e| net("sending the id", e))?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(Error::Input(format!(
                            "rendezvous at {addr}: {served} of {} ranks connected within {}s",
                            world - 1,
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(net("accept", e)),
            }
        }
        return Ok(payload);
    }
    let deadline = Instant::now() + timeout;
    let target = addr
        .to_socket_addrs()
        .map_err(|e| net("cannot resolve", e))?
        .next()
        .ok_or_else(|| Error::Input(format!("rendezvous at {addr}: no address")))?;
    let mut stream = loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(net("rank 0 did not answer", e)),
        }
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| net("connection", e))?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(RENDEZVOUS_MAGIC);
    hello.extend_from_slice(&(world as u64).to_le_bytes());
    stream.write_all(&hello).map_err(|e| net("greeting", e))?;
    let mut head = [0u8; 16];
    stream
        .read_exact(&mut head)
        .map_err(|e| net("reading the id", e))?;
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
    // An NCCL id is 128 bytes; anything much larger is not a pfstorer rank 0.
    if &head[..8] != RENDEZVOUS_MAGIC || len > 4096 {
        return Err(Error::Input(format!(
            "rendezvous at {addr}: the answer is not from a pfstorer rank 0"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    stream
        .read_exact(&mut payload)
        .map_err(|e| net("reading the id", e))?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn launch_environment_from_torchrun_and_slurm() {
        assert_eq!(
            LaunchEnv::from_vars(&vars(&[])).unwrap(),
            LaunchEnv::single()
        );
        let torchrun = LaunchEnv::from_vars(&vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            (torchrun.rank, torchrun.world_size, torchrun.local_rank),
            (5, 8, 1)
        );
        assert_eq!(torchrun.master_addr.as_deref(), Some("node0"));
        assert_eq!(torchrun.master_port, Some(29500));
        assert_eq!(torchrun.launcher, "torchrun");
        let slurm = LaunchEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "12345"),
        ]))
        .unwrap();
        assert_eq!((slurm.rank, slurm.world_size, slurm.local_rank), (3, 16, 3));
        assert_eq!(slurm.launcher, "slurm");
        // torchrun's variables win when both are present (torchrun inside an allocation).
        let both = LaunchEnv::from_vars(&vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
        ]))
        .unwrap();
        assert_eq!((both.rank, both.world_size), (0, 1));
    }

    #[test]
    fn inconsistent_launch_variables_are_refused() {
        let cases = [
            (vec![("RANK", "4"), ("WORLD_SIZE", "4")], "outside a world"),
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2")], "MASTER_ADDR"),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT",
            ),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "is 0"),
        ];
        for (pairs, expected) in cases {
            let err = LaunchEnv::from_vars(&vars(&pairs)).unwrap_err().to_string();
            assert!(err.contains(expected), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn rendezvous_hands_rank_zeros_id_to_every_rank() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let id: Vec<u8> = (0..128u32).map(|i| (i * 7 % 251) as u8).collect();
        let world = 4;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (addr, id) = (addr.clone(), id.clone());
                std::thread::spawn(move || {
                    let payload = (rank == 0).then_some(id.as_slice());
                    rendezvous(&addr, rank, world, payload, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), id);
        }
    }

    #[test]
    fn rendezvous_refuses_a_mismatched_world() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let server = {
            let addr = addr.clone();
            std::thread::spawn(move || {
                rendezvous(&addr, 0, 2, Some(&[1, 2, 3]), Duration::from_secs(20))
            })
        };
        let client = rendezvous(&addr, 1, 3, None, Duration::from_secs(20));
        let err = server.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("world of 3"), "{err}");
        assert!(client.is_err());
    }

    #[test]
    fn thread_group_averages_in_rank_order() {
        let world = 3;
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let r = comm.rank() as f32;
                    let mut ts = vec![
                        Tensor::new(&[r, 2.0 * r], &Device::Cpu).unwrap(),
                        Tensor::new(&[[r + 1.0]], &Device::Cpu).unwrap(),
                    ];
                    // Twice: the exchange is reusable.
                    comm.all_reduce_mean(&mut ts).unwrap();
                    comm.all_reduce_mean(&mut ts).unwrap();
                    (
                        ts[0].to_vec1::<f32>().unwrap(),
                        ts[1].to_vec2::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (a, b) = h.join().unwrap();
            assert_eq!(a, vec![1.0, 2.0]);
            assert_eq!(b, vec![vec![2.0]]);
        }
    }
}

/// NCCL across processes (one per GPU), in the `nccl` build.
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::{rendezvous, Communicator, LaunchEnv};
    use crate::error::{Error, Result};
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{Device, Storage, Tensor};
    use std::time::Duration;

    /// How long ranks wait for each other at the rendezvous.
    const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

    pub struct NcclGroup {
        comm: Comm,
        device: Device,
    }

    impl NcclGroup {
        /// Joins the launch: rank 0 makes the NCCL id and hands it out at
        /// MASTER_ADDR:MASTER_PORT, then every rank initialises its communicator on `device`.
        pub fn connect(env: &LaunchEnv, device: &Device) -> Result<Self> {
            let Device::Cuda(cuda) = device else {
                return Err(Error::Input(
                    "data-parallel training runs on CUDA devices (--device cuda)".into(),
                ));
            };
            let nccl = |e: candle_core::cuda_backend::cudarc::nccl::result::NcclError| {
                Error::Config(format!("NCCL: {e:?}"))
            };
            let addr = format!(
                "{}:{}",
                env.master_addr.as_deref().unwrap_or("127.0.0.1"),
                env.master_port.unwrap_or(29500)
            );
            let mine = if env.rank == 0 {
                let id = Id::new().map_err(nccl)?;
                Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
            } else {
                None
            };
            let bytes = rendezvous(
                &addr,
                env.rank,
                env.world_size,
                mine.as_deref(),
                RENDEZVOUS_TIMEOUT,
            )?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                return Err(Error::Input(format!(
                    "rendezvous at {addr}: an NCCL id of {} bytes",
                    bytes.len()
                )));
            }
            for (dst, src) in internal.iter_mut().zip(&bytes) {
                *dst = *src as std::ffi::c_char;
            }
            let comm = Comm::from_rank(
                cuda.cuda_stream(),
                env.rank,
                env.world_size,
                Id::uninit(internal),
            )
            .map_err(nccl)?;
            Ok(NcclGroup {
                comm,
                device: device.clone(),
            })
        }
    }

    impl Communicator for NcclGroup {
        fn rank(&self) -> usize {
            self.comm.rank()
        }

        fn world_size(&self) -> usize {
            self.comm.world_size()
        }

        fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()> {
            // One reduction over all tensors, flattened into one f32 buffer.
            let flat: Vec<Tensor> = tensors
                .iter()
                .map(|t| t.to_dtype(candle_core::DType::F32)?.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let flat = Tensor::cat(&flat, 0)?.contiguous()?;
            let n = flat.elem_count();
            let stream = self.comm.stream();
            let mut sum = stream
                .alloc_zeros::<f32>(n)
                .map_err(|e| Error::Config(format!("CUDA: {e:?}")))?;
            {
                let (storage, layout) = flat.storage_and_layout();
                let Storage::Cuda(cuda) = &*storage else {
                    return Err(Error::Config("NCCL reduction of a non-CUDA tensor".into()));
                };
                let slice = cuda.as_cuda_slice::<f32>()?;
                let slice = slice.slice(layout.start_offset()..layout.start_offset() + n);
                self.comm
                    .all_reduce(&slice, &mut sum, &ReduceOp::Avg)
                    .map_err(|e| Error::Config(format!("NCCL all-reduce: {e:?}")))?;
            }
            let host = stream
                .clone_dtoh(&sum)
                .map_err(|e| Error::Config(format!("CUDA: {e:?}")))?;
            let mean = Tensor::from_vec(host, n, &self.device)?;
            let mut offset = 0;
            for t in tensors.iter_mut() {
                let count = t.elem_count();
                *t = mean
                    .narrow(0, offset, count)?
                    .reshape(t.dims())?
                    .to_dtype(t.dtype())?;
                offset += count;
            }
            Ok(())
        }
    }
}
